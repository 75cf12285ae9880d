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
from tests.factories import content_rows, ledger_rows
from tests.fake_openai import FakeOpenAI, Reply

HOSTILE = 'abc \ud800 def\x00ghi \udfff'
MENDED = 'abc \ufffd def\ufffdghi \ufffd'

tools = FunctionToolset[SessionDependencies]()


class Record(BaseModel):
    name: str
    lines: list[str]


class Keyed(BaseModel):
    extra: dict  # type: ignore[type-arg]  # untyped: pydantic serialises its keys as it does a plain dict's


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
        # a lone surrogate in a key beside an object pydantic serialises failed the turn: "cannot be sent" (QA)
        'key beside a dataclass': {'n': {HOSTILE: 1}, 'row': Row(name='r', lines=[])},
        'key in a model': Keyed(extra={HOSTILE: HOSTILE}),
    }[kind]


STORED_RESULT = {
    'text': MENDED,
    'json': {'name': MENDED, MENDED: [MENDED, 1]},
    'model': {'name': MENDED, 'lines': [MENDED]},
    'dataclass': {'name': MENDED, 'lines': [MENDED]},
    'set': [MENDED],
    'key beside a dataclass': {'n': {MENDED: 1}, 'row': {'name': 'r', 'lines': []}},
    'key in a model': {'extra': {MENDED: MENDED}},
}


def _script(kind: str) -> Any:
    def answer(body: dict[str, Any]) -> Reply:
        if not any(message['role'] == 'tool' for message in body['messages']):
            return Reply(tool_calls=[('read_file', {'kind': kind})])
        return Reply(text='the file says ' + HOSTILE)  # a provider's JSON can hold "\ud800" too

    return answer


@pytest.mark.parametrize('kind', list(STORED_RESULT))
@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_tools_result_and_the_instructions_reach_the_provider_as_the_store_saves_them(
    demo_data: None, streamed: bool, kind: str
) -> None:
    session_id = f'sendable-{kind.replace(" ", "-")}-{streamed}'
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


odd_tools = FunctionToolset[SessionDependencies]()


@odd_tools.tool
async def read_odd(ctx: RunContext[SessionDependencies], kind: str) -> Any:
    """A result pydantic-ai cannot send (an exception object), or can (bytes that are not UTF-8, as base64)."""
    deep: Any = 'bottom'
    for _ in range(300):  # past the 255 levels pydantic serialises
        deep = [deep]
    return {'exception': ValueError('boom'), 'bytes': b'\xff\xfe\x00raw', 'deep': deep}[kind]


def _odd_script(kind: str) -> Any:
    def answer(body: dict[str, Any]) -> Reply:
        if not any(message['role'] == 'tool' for message in body['messages']):
            return Reply(tool_calls=[('read_odd', {'kind': kind})])
        return Reply(text='done')

    return answer


@pytest.mark.parametrize(('kind', 'type_name'), [('exception', 'ValueError'), ('deep', 'list')])
@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_tools_result_that_cannot_be_sent_is_an_error_naming_the_tool(
    demo_data: None, caplog: pytest.LogCaptureFixture, streamed: bool, kind: str, type_name: str
) -> None:
    # Was pydantic's bare PydanticSerializationError ("Unable to serialize unknown type", or for a result nested past
    # 255 levels "Maximum serialization depth exceeded"), raised from the runtime's measure of the context, naming
    # neither the tool nor what to return instead (QA).
    turn: dict[str, Any] = {'session_id': f'odd-{kind}-{streamed}', 'account': 'acme-health', 'toolsets': [odd_tools]}
    with override_allow_model_requests(True), FakeOpenAI(_odd_script(kind)).running() as fake:
        turn['model'] = OpenAIChatModel('gpt-4o-mini', provider=OpenAIProvider(base_url=fake.base_url, api_key='sk-x'))
        with pytest.raises(TypeError) as raised:
            if streamed:
                async with simple_chat_stream('read it', **turn) as stream:
                    [delta async for delta in stream]
            else:
                await simple_chat('read it', **turn)
    message = str(raised.value)
    assert f"tool 'read_odd' returned a value of type {type_name} that cannot be sent to the model" in message, message
    if kind == 'deep':  # "return text, numbers, lists, ..." for a list said nothing of what was wrong with it (QA)
        assert 'nested deeper than the 255 levels pydantic serialises' in message, message
    else:
        assert 'return text, numbers, lists, dicts, pydantic models or dataclasses' in message
    assert len(fake.requests) == 1  # the result never went out
    assert await PostgresConversationStore(await account_id('acme-health')).load(f'odd-{kind}-{streamed}') is None
    # The request it stopped is an error row with its prompt: the ledger's dump of the deep result failed as well, with
    # a traceback of five chained errors on stderr, and the row was recorded without contents (QA).
    await get_request_tracker().flush()
    rows = await ledger_rows(chat_session_id=f'odd-{kind}-{streamed}')
    [failed] = [row for row in rows if row['status'] == 'error']
    assert {row['kind'] for row in await content_rows(failed['id'])} >= {'prompt', 'error'}
    assert 'could not take the contents' not in caplog.text


async def test_bytes_a_tool_returns_reach_the_provider_and_the_store_as_base64_text(demo_data: None) -> None:
    turn: dict[str, Any] = {'session_id': 'odd-bytes', 'account': 'acme-health', 'toolsets': [odd_tools]}
    with override_allow_model_requests(True), FakeOpenAI(_odd_script('bytes')).running() as fake:
        turn['model'] = OpenAIChatModel('gpt-4o-mini', provider=OpenAIProvider(base_url=fake.base_url, api_key='sk-x'))
        assert (await simple_chat('read it', **turn)).output == 'done'
    # Sent and saved as the same base64 text (URL-safe, pydantic's): the save read bytes as UTF-8, and failed on these
    # with pydantic's bare error, the model's request already made.
    tool_message = next(m for m in fake.requests[1]['messages'] if m['role'] == 'tool')
    assert tool_message['content'] == '__4AcmF3'
    stored = await PostgresConversationStore(await account_id('acme-health')).load('odd-bytes')
    assert stored is not None and stored.messages[2].parts[0].content == '__4AcmF3'  # type: ignore[union-attr]


def _named_script(name: str, call_id: str) -> Any:
    def answer(body: dict[str, Any]) -> Reply:
        if not any(message['role'] == 'tool' for message in body['messages']):
            return Reply(tool_calls=[(name, {'kind': 'text'})], call_id=call_id)
        return Reply(text='done')

    return answer


@pytest.mark.parametrize(
    ('name', 'call_id'), [('read\ud800file', 'call_'), ('read_file', 'c\ud800\x00')], ids=['tool name', 'call id']
)
@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_tool_calls_name_or_id_with_a_lone_surrogate_is_sent_back_mended(
    demo_data: None, streamed: bool, name: str, call_id: str
) -> None:
    # The name and id a model gave its call are resent with its result (or the retry prompt of an unknown tool): a lone
    # surrogate in them failed the next request as it was built, a raw UnicodeEncodeError (CLI exit 70, HTTP 500; QA).
    session_id = f'sendable-named-{streamed}-{call_id == "call_"}'
    turn: dict[str, Any] = {'session_id': session_id, 'account': 'acme-health', 'toolsets': [tools]}
    with override_allow_model_requests(True), FakeOpenAI(_named_script(name, call_id)).running() as fake:
        turn['model'] = OpenAIChatModel('gpt-4o-mini', provider=OpenAIProvider(base_url=fake.base_url, api_key='sk-x'))
        if streamed:
            async with simple_chat_stream('read it', **turn) as stream:
                output = ''.join([delta async for delta in stream])
        else:
            output = (await simple_chat('read it', **turn)).output
    assert output == 'done'
    sent = json.dumps(fake.requests[1], ensure_ascii=False)  # as the provider read it: text, not JSON escapes
    assert '\ud800' not in sent and '\x00' not in sent and '\ufffd' in sent
    stored = await PostgresConversationStore(await account_id('acme-health')).load(session_id)
    assert stored is not None and len(stored.messages) == 4


async def test_the_history_a_turn_loaded_is_not_read_again_and_reaches_the_provider_as_stored(
    demo_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loaded history came out of JSONB, which holds no NUL and no lone surrogate: reading it again on every turn
    # was the capability's main cost in a long conversation. What the turn adds is still read, and mended.
    from agentrt.agents import sendable_text

    read: list[Any] = []
    mend = sendable_text._mend_message
    monkeypatch.setattr(sendable_text, '_mend_message', lambda message: (read.append(message), mend(message)))
    turn: dict[str, Any] = {'session_id': 'sendable-loaded', 'account': 'acme-health', 'toolsets': [tools]}
    with override_allow_model_requests(True), FakeOpenAI(_script('text')).running() as fake:
        turn['model'] = OpenAIChatModel('gpt-4o-mini', provider=OpenAIProvider(base_url=fake.base_url, api_key='sk-x'))
        await simple_chat('read it', **turn)
        assert len(read) == 3  # the prompt, then the call and its result: the first turn has no history
        read.clear()
        second = await simple_chat('and again', **turn)
    assert second.output == 'the file says ' + MENDED
    assert [type(message).__name__ for message in read] == ['ModelRequest']  # only the new prompt: 4 were loaded
    assert read[0].parts[-1].content == 'and again'
    sent = json.dumps(fake.requests[-1], ensure_ascii=False)  # the loaded tool result and answer, as they were saved
    assert sent.count(MENDED) == 2 and '\ud800' not in sent and '\x00' not in sent
