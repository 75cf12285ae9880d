"""A retry's rejected input is cut short before it is sent and saved (`agentrt.agents.retry_inputs`).

pydantic-ai's retry quoted the whole rejected value: a 1,000,000-character `query` (capped at 200) made the next
request's prompt 2 MB and the conversation stored the megabyte twice (QA).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic_ai import ModelResponse, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agentrt.agents.retry_inputs import SHOWN, shorten_retry
from agentrt.agents.simple_chat import simple_chat
from agentrt.services.conversations import PostgresConversationStore
from agentrt.services.ledger import get_request_tracker
from agentrt.services.message_json import message_adapter
from tests.agents.conftest import account_id
from tests.factories import content_rows, ledger_rows

HUGE = 1_000_000


async def test_an_oversized_argument_is_cut_short_in_the_retry_the_model_gets_and_the_store_saves(
    demo_data: None,
) -> None:
    retries: list[str] = []

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:  # search_directory allows 200 characters for `query`
            arguments = {'query': 'q' * HUGE, 'schema_name': 'medical_providers'}
            return ModelResponse(parts=[ToolCallPart('search_directory', json.dumps(arguments))])
        retries.append(messages[-1].parts[0].model_response_str())  # type: ignore[union-attr]
        return ModelResponse(parts=[TextPart('done')])

    session_id = 'retry-inputs-huge-query'
    result = await simple_chat('hi', session_id=session_id, account='acme-health', model=FunctionModel(respond))
    assert result.output == 'done'
    [retry] = retries
    assert 'String should have at most 200 characters' in retry
    assert f'{"q" * SHOWN}... ({HUGE:,} characters)' in retry and len(retry) < 2 * SHOWN + 500

    await get_request_tracker().flush()
    rows = await ledger_rows(chat_session_id=session_id)
    prompts = [row for content in [await content_rows(row['id']) for row in rows] for row in content]
    second_prompt = max(row['size_bytes'] for row in prompts if row['kind'] == 'prompt')
    assert second_prompt < HUGE + 10_000  # the resent call only: it was 2,003,011 bytes
    stored = await PostgresConversationStore(await account_id('acme-health')).load(session_id)
    assert stored is not None
    saved = sum(len(message_adapter.dump_json(message)) for message in stored.messages)
    assert saved < HUGE + 10_000  # the model's own call only: the retry held the megabyte again
    assert 'qqqq' * (SHOWN // 4 + 1) not in message_adapter.dump_json(stored.messages[2]).decode()


def test_only_long_inputs_and_keys_of_a_retry_are_cut() -> None:
    from pydantic_ai.messages import ToolReturnPart

    errors: list[Any] = [
        {'type': 'missing', 'loc': ['query'], 'msg': 'Field required', 'input': {'pad': 'p' * 5000}},
        {'type': 'extra_forbidden', 'loc': ['k' * 1000], 'msg': 'Extra inputs are not permitted', 'input': 1},
        {'type': 'string_too_long', 'loc': ['query'], 'msg': 'String should have at most 200 characters', 'input': 'a'},
    ]
    part = ToolReturnPart('search_directory', errors, tool_call_id='c1', outcome='retried')
    shorten_retry(part)
    first, second, third = part.content
    assert first['input'].startswith('{"pad":"ppp') and first['input'].endswith('... (5,010 characters)')
    assert second['loc'] == ['k' * SHOWN + '... (1,000 characters)'] and second['input'] == 1
    assert third is errors[2]
    answer = ToolReturnPart('search_directory', [{'input': 'x' * 5000}], tool_call_id='c2')
    shorten_retry(answer)  # a tool's own result is its own business
    assert answer.content == [{'input': 'x' * 5000}]
