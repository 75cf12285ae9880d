"""The demo planner reads tool results from pydantic-ai 2.68 messages: a retried call is a problem, not a result."""

from __future__ import annotations

from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import ModelRequestParameters
from pydantic_ai.models.function import AgentInfo

from agentrt.agents.demo_model import NO_SCHEMAS, SCHEMAS_LINE, demo_model, next_response

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


def _search_filters(*prompts: str) -> dict[str, object]:
    """The main search's filters for the last of `prompts`, the earlier ones answered in the history before it."""
    messages: list[ModelMessage] = []
    for prompt in prompts[:-1]:
        messages += [ModelRequest(parts=[UserPromptPart(prompt)]), ModelResponse(parts=[TextPart('an answer')])]
    messages.append(ModelRequest(parts=[UserPromptPart(prompts[-1])]))
    calls = next_response(messages, _info())
    assert isinstance(calls, list) and calls[0].tool_call_id == f't{len(prompts)}-search'
    filters = calls[0].args_as_dict()['filters']
    assert isinstance(filters, dict)
    return filters


def test_a_follow_up_keeps_the_previous_questions_other_criteria() -> None:
    # "and in Denver?" after "Dermatologists in Boston" searched every Denver provider, as if asked alone.
    assert _search_filters('Dermatologists in Boston', 'and in Denver?') == {
        'specialty': 'Dermatology',
        'city': 'Denver',
    }
    assert _search_filters('Cardiologists in Seattle who accept Medicare', 'and in Boston?') == {
        'specialty': 'Cardiology',
        'insurance': 'Medicare',
        'city': 'Boston',
    }
    # Carried over a chain of follow-ups; a criterion named again replaces the earlier one.
    assert _search_filters('Dermatologists in Boston', 'and in Denver?', 'what about Aetna?') == {
        'specialty': 'Dermatology',
        'city': 'Denver',
        'insurance': 'Aetna',
    }
    # A question of its own is planned on its own, as a first question is.
    assert _search_filters('Dermatologists in Boston', 'Pediatricians in Denver who accept Aetna') == {
        'specialty': 'Pediatrics',
        'insurance': 'Aetna',
        'city': 'Denver',
    }
    assert _search_filters('Dermatologists in Boston') == {'specialty': 'Dermatology', 'city': 'Boston'}


async def test_a_streamed_demo_request_counts_its_input_as_a_plain_one_does() -> None:
    # FunctionModel's stream counted 50 input tokens whatever was sent, so a streamed demo chat's ledger rows and
    # token line stayed flat as the conversation grew.
    model = demo_model()
    messages: list[ModelMessage] = [
        ModelRequest(parts=[UserPromptPart('an earlier question ' * 200)]),
        ModelResponse(parts=[TextPart('an earlier answer')]),
        ModelRequest(parts=[UserPromptPart(QUESTION)], instructions=f'{SCHEMAS_LINE} medical_providers.'),
    ]
    parameters = ModelRequestParameters(allow_text_output=True)
    plain = await model.request(messages, None, parameters)
    async with model.request_stream(messages, None, parameters) as stream:
        events = [event async for event in stream]
    assert events, 'the stream sent nothing'
    assert stream.usage.input_tokens == plain.usage.input_tokens > 600
    assert stream.usage.output_tokens > 0


def test_the_demo_model_answers_on_the_event_loop_not_in_a_worker_thread() -> None:
    """pydantic-ai runs a model function that is not a coroutine function in one of AnyIO's worker threads, which
    only the root task's end stops: a `sys.exit()` in another task during a demo turn left `asyncio.run` with that
    thread alive, and the interpreter waited for it at exit for ever (QA). The plain answer, and the stream's count of
    its input, are coroutine functions (the stream an async generator)."""
    import inspect

    from agentrt.agents.demo_model import _INPUT_COUNTER

    model = demo_model()
    assert inspect.iscoroutinefunction(model.function) and inspect.iscoroutinefunction(_INPUT_COUNTER.function)
    assert inspect.isasyncgenfunction(model.stream_function)
