"""The demo planner reads tool results from pydantic-ai 2.68 messages: a retried call is a problem, not a result."""

from __future__ import annotations

from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, ToolCallPart, ToolReturnPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo

from agentrt.agents.demo_model import NO_SCHEMAS, SCHEMAS_LINE, next_response

QUESTION = 'cardiologists in Seattle'


def _info(schemas: str = 'medical_providers') -> AgentInfo:
    """What the planner reads: the account's directories, listed in the instructions."""
    return AgentInfo(
        function_tools=[],
        allow_text_output=True,
        output_tools=[],
        model_settings=None,
        model_request_parameters=None,  # type: ignore[arg-type]
        instructions=f'{SCHEMAS_LINE} {schemas}.',
    )


def test_a_retried_main_search_is_reported_not_read_as_results() -> None:
    info = _info()
    calls = next_response([ModelRequest(parts=[UserPromptPart(QUESTION)])], info)
    assert isinstance(calls, list) and calls[0].tool_call_id == 't1-search'
    returns = [
        ToolReturnPart(
            call.tool_name, 'unknown filter "town"; valid filters: city', call.tool_call_id, outcome='retried'
        )
        if call.tool_call_id == 't1-search'
        else ToolReturnPart(call.tool_name, {'results': [], 'total_matches': 0}, call.tool_call_id)
        for call in calls
    ]
    messages: list[ModelMessage] = [
        ModelRequest(parts=[UserPromptPart(QUESTION)]),
        ModelResponse(parts=list[ToolCallPart](calls)),
        ModelRequest(parts=returns),
    ]
    answer = next_response(messages, info)
    assert answer == 'I could not search the medical providers directory: unknown filter "town"; valid filters: city'


def test_an_account_without_a_directory_is_answered_without_a_search() -> None:
    # What simple_chat's instructions say for an agent with no schemas configured.
    answer = next_response([ModelRequest(parts=[UserPromptPart(QUESTION)])], _info(NO_SCHEMAS))
    assert answer == 'I have no directory to search for this account.'


def test_the_whole_directory_comparison_searches_without_the_query() -> None:
    # With fewer than two criteria the planner compares with the whole directory: no filter and no keywords, or it
    # counted the entries matching the keywords and called that "the whole directory" (0 for "hi").
    calls = next_response([ModelRequest(parts=[UserPromptPart('hi')])], _info())
    assert isinstance(calls, list)
    whole = next(call for call in calls if call.tool_call_id == 't1-whole-directory')
    assert whole.args_as_dict() == {'query': None, 'schema_name': 'medical_providers', 'filters': {}, 'limit': 1}
    assert calls[0].args_as_dict()['query'] == 'hi'  # the main search keeps them
