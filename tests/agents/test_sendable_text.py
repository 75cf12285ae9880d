"""What a turn sends to a real provider holds no NUL and no lone surrogate: a tool's result, the caller's
instructions and a model's answer resent are mended to U+FFFD, as the store saves them (`SendableText`).

A lone surrogate in a tool's result made the request fail as it was built, with a raw `UnicodeEncodeError` (or
pydantic's serialization error), plain and streamed (QA).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_ai import FunctionToolset, RunContext
from pydantic_ai.models import override_allow_model_requests
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
from agentrt.services.conversations import PostgresConversationStore
from agentrt.services.ledger import get_request_tracker
from agentrt.tools.dependencies import SessionDependencies
from tests.agents.conftest import account_id
from tests.factories import ledger_rows
from tests.fake_openai import FakeOpenAI, Reply

HOSTILE = 'abc \ud800 def\x00ghi \udfff'
MENDED = 'abc \ufffd def\ufffdghi \ufffd'

tools = FunctionToolset[SessionDependencies]()


class Record(BaseModel):
    name: str
    lines: list[str]


@dataclasses.dataclass
class Row:
    name: str
    lines: list[str]


@tools.tool
async def read_file(ctx: RunContext[SessionDependencies], kind: str) -> Any:
    """Text as a broken file gives it (undecodable bytes, a NUL)."""
    return {
        'text': HOSTILE,
        'json': {'name': HOSTILE, HOSTILE: [HOSTILE, 1]},
        # pydantic-ai serialises these itself: a lone surrogate failed it ("surrogates not allowed"), a NUL went out
        'model': Record(name=HOSTILE, lines=[HOSTILE]),
        'dataclass': Row(name=HOSTILE, lines=[HOSTILE]),
        'set': {HOSTILE},
    }[kind]


STORED_RESULT = {
    'text': MENDED,
    'json': {'name': MENDED, MENDED: [MENDED, 1]},
    'model': {'name': MENDED, 'lines': [MENDED]},
    'dataclass': {'name': MENDED, 'lines': [MENDED]},
    'set': [MENDED],
}


def _script(kind: str) -> Any:
    def answer(body: dict[str, Any]) -> Reply:
        if not any(message['role'] == 'tool' for message in body['messages']):
            return Reply(tool_calls=[('read_file', {'kind': kind})])
        return Reply(text='the file says ' + HOSTILE)  # a provider's JSON can hold "\ud800" too

    return answer


@pytest.mark.parametrize('kind', ['text', 'json', 'model', 'dataclass', 'set'])
@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_tools_result_and_the_instructions_reach_the_provider_as_the_store_saves_them(
    demo_data: None, streamed: bool, kind: str
) -> None:
    session_id = f'sendable-{kind}-{streamed}'
    turn: dict[str, Any] = {
        'session_id': session_id,
        'account': 'acme-health',
        'toolsets': [tools],
        'instructions': 'Be brief. ' + HOSTILE,
    }
    with override_allow_model_requests(True), FakeOpenAI(_script(kind)).running() as fake:
        turn['model'] = OpenAIChatModel('gpt-4o-mini', provider=OpenAIProvider(base_url=fake.base_url, api_key='sk-x'))
        for message in ('read it', 'and again'):  # the second turn resends the first's tool result and answer
            if streamed:
                async with simple_chat_stream(message, **turn) as stream:
                    output = ''.join([delta async for delta in stream])
            else:
                output = (await simple_chat(message, **turn)).output
            assert output == 'the file says ' + MENDED
    sent = json.dumps(fake.requests)
    assert '\\ud800' not in sent and '\\udfff' not in sent and '\\u0000' not in sent
    assert len(fake.requests) == 3 and all('\\ufffd' in json.dumps(request) for request in fake.requests)
    await get_request_tracker().flush()
    rows = await ledger_rows(chat_session_id=session_id)
    assert [row['status'] for row in rows] == ['complete'] * 3
    stored = await PostgresConversationStore(await account_id('acme-health')).load(session_id)
    assert stored is not None and len(stored.messages) == 6
    returned = stored.messages[2].parts[0].content  # type: ignore[union-attr]
    assert returned == STORED_RESULT[kind]
