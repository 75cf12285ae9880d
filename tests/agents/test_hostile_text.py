"""Text PostgreSQL cannot store (NUL, lone surrogates) in every position of a turn: the turn runs, is saved with
U+FFFD in their place, and every request sent keeps its ledger row."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

import pytest
from pydantic_ai import FunctionToolset, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from agentrt.agents.simple_chat import (
    ChatResult,
    ToolEvent,
    create_simple_chat_agent,
    simple_chat,
    simple_chat_stream,
)
from agentrt.services.conversations import PostgresConversationStore
from agentrt.services.ledger import get_request_tracker
from agentrt.tools.dependencies import SessionDependencies
from tests.agents.conftest import account_id
from tests.factories import content_rows, ledger_rows

HOSTILE = 'nul\x00 lone\ud800 escaped\udcff end'
STORED = 'nul\ufffd lone\ufffd escaped\ufffd end'

_tools = FunctionToolset[SessionDependencies]()


@_tools.tool_plain
def read_blob() -> str:
    """A tool whose result holds text PostgreSQL cannot store."""
    return f'blob: {HOSTILE}'


def _respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Ask for `read_blob` once, then answer with hostile text of the model's own."""
    if not any(isinstance(p, ToolReturnPart) for m in messages[-1:] for p in m.parts):
        return ModelResponse(parts=[ToolCallPart('read_blob', {}, tool_call_id='blob-1')])
    return ModelResponse(parts=[TextPart(f'answer: {HOSTILE}')])


async def _stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
    response = _respond(messages, info)
    for part in response.parts:
        if isinstance(part, TextPart):
            yield part.content
        elif isinstance(part, ToolCallPart):
            yield {0: DeltaToolCall(part.tool_name, '{}', tool_call_id=part.tool_call_id)}


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_hostile_text_everywhere_is_saved_replaced_and_every_request_keeps_its_row(
    demo_data: None, streamed: bool
) -> None:
    model = FunctionModel(_respond, stream_function=_stream, model_name='gpt-4o-mini')
    kwargs = dict(session_id='hostile', account='acme-health', model=model, toolsets=[_tools])
    result: ChatResult | None
    if streamed:
        async with simple_chat_stream(f'question: {HOSTILE}', **kwargs) as stream:  # type: ignore[arg-type]
            text = ''.join([delta async for delta in stream])
        result = stream.result
        # The deltas are the text the store saves: a caller writing them to a UTF-8 file or socket does not fail.
        assert text == f'answer: {STORED}'
    else:
        result = await simple_chat(f'question: {HOSTILE}', **kwargs)  # type: ignore[arg-type]
    assert result is not None and result.usage.requests == 2
    assert result.output == f'answer: {STORED}', 'the output is what the store saved'

    await get_request_tracker().flush()
    rows = await ledger_rows(chat_session_id='hostile')
    assert [row['status'] for row in rows] == ['complete', 'complete'], 'one row per request sent'
    prompts = [c['body'] for row in rows for c in await content_rows(row['id']) if c['kind'] == 'prompt']
    assert len(prompts) == 2
    sent = json.loads(prompts[1])['messages']
    # The user's message was normalised at the boundary: the model and the ledger saw what the store keeps.
    assert sent[0]['parts'][0]['content'] == f'question: {STORED}'
    # The tool's result went to the model as the store saves it (`SendableText`): a lone surrogate in it failed a real
    # provider's request as it was built.
    assert sent[-1]['parts'][0]['content'] == f'blob: {STORED}'

    store = PostgresConversationStore(await account_id('acme-health'))
    conversation = await store.load('hostile')
    assert conversation is not None and len(conversation.messages) == 4
    first = conversation.messages[0]
    assert isinstance(first, ModelRequest) and isinstance(first.parts[0], UserPromptPart)
    assert first.parts[0].content == f'question: {STORED}'
    returned = conversation.messages[2].parts[0]
    assert isinstance(returned, ToolReturnPart) and returned.content == f'blob: {STORED}'
    answer = conversation.messages[3].parts[0]
    assert isinstance(answer, TextPart) and answer.content == f'answer: {STORED}'


async def test_a_failed_request_with_hostile_error_text_keeps_its_row(demo_data: None) -> None:
    def fail(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise RuntimeError(f'provider said: {HOSTILE}')

    with pytest.raises(RuntimeError):
        await simple_chat('hello', session_id='hostile-error', account='acme-health', model=FunctionModel(fail))
    await get_request_tracker().flush()
    rows = await ledger_rows(chat_session_id='hostile-error')
    assert [row['status'] for row in rows] == ['error']
    assert rows[0]['error_message'] == f'provider said: {STORED}'


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_an_agent_name_with_nul_and_a_model_name_with_a_lone_surrogate_keep_every_row(
    demo_data: None, streamed: bool
) -> None:
    """The agent's name comes from user code and the model's from a user's model string: the ledger rows of the
    turn are written with U+FFFD in their place (before, the database refused each row and the spool kept it for
    good), and the turn is saved."""
    agent = create_simple_chat_agent()
    agent.name = '\x00front\x00desk\x00'
    model = FunctionModel(_respond, stream_function=_stream, model_name='gpt\ud800-mini\udc80')
    kwargs = dict(session_id='hostile-names', account='acme-health', model=model, toolsets=[_tools], agent=agent)
    if streamed:
        async with simple_chat_stream('hello', **kwargs) as stream:  # type: ignore[arg-type]
            text = ''.join([delta async for delta in stream])
        assert text == f'answer: {STORED}' and stream.result is not None
    else:
        assert (await simple_chat('hello', **kwargs)).output == f'answer: {STORED}'  # type: ignore[arg-type]

    tracker = get_request_tracker()
    await tracker.flush()
    rows = await ledger_rows(chat_session_id='hostile-names')
    assert [row['status'] for row in rows] == ['complete', 'complete'], 'one row per request sent, none spooled'
    assert {row['agent_name'] for row in rows} == {'\ufffdfront\ufffddesk\ufffd'}
    assert {(row['model'], row['response_model']) for row in rows} == {('gpt\ufffd-mini\ufffd', 'gpt\ufffd-mini\ufffd')}
    assert all(row['streamed'] is streamed for row in rows)
    assert [len(await content_rows(row['id'])) for row in rows] == [2, 2], 'prompt and response of each request'
    assert not tracker.spool.has_pending()
    conversation = await PostgresConversationStore(await account_id('acme-health')).load('hostile-names')
    assert conversation is not None and len(conversation.messages) == 4
    answer = conversation.messages[3]
    assert isinstance(answer, ModelResponse) and answer.model_name == 'gpt\ufffd-mini\ufffd'


async def test_streamed_deltas_and_tool_events_hold_only_text_utf8_can_encode(demo_data: None) -> None:
    """A provider's JSON can carry `"\\ud83d"` (half an emoji cut at a chunk boundary) in the answer and in a tool
    call's name. `simple_chat_stream` handed it on as a lone surrogate: a caller writing the deltas to a UTF-8
    file or socket failed with `UnicodeEncodeError`. Deltas and tool events carry U+FFFD, as the store saves them."""
    tools = FunctionToolset[SessionDependencies]()

    @tools.tool_plain(name='echo\ud83d')
    def echo(text: str) -> str:
        """Return `text`."""
        return text

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        if not any(isinstance(p, ToolReturnPart) for m in messages[-1:] for p in m.parts):
            yield {0: DeltaToolCall('echo\ud83d', json.dumps({'text': 'half \ud83d'}), tool_call_id='call\udc00')}
            return
        yield 'Found Dr \ud83d'
        yield ' in Seattle \udc00.'

    events: list[ToolEvent] = []
    written = io.BytesIO()
    async with simple_chat_stream(
        'hi',
        session_id='hostile-deltas',
        account='acme-health',
        model=FunctionModel(stream_function=stream, model_name='gpt-4o-mini'),
        toolsets=[tools],
        on_tool_event=events.append,
    ) as chat:
        async for delta in chat:
            written.write(delta.encode('utf-8'))  # what a caller does with a socket: it raised here
    assert written.getvalue().decode('utf-8') == 'Found Dr \ufffd in Seattle \ufffd.'
    assert chat.result is not None and chat.result.output == 'Found Dr \ufffd in Seattle \ufffd.'
    assert [(e.tool_name, e.tool_call_id, e.finished) for e in events] == [
        ('echo\ufffd', 'call\ufffd', False),
        ('echo\ufffd', 'call\ufffd', True),
    ]


_finder = FunctionToolset[SessionDependencies]()


@_finder.tool_plain
def find(query: str) -> str:
    """Look something up."""
    return f'{len(query)} characters looked up'


_ESCAPED_KEY = 'sk\\u002dproj\\u002dQz7xK2mN9pL4vB8cR1tY6wE3aS5dF0gH2jK4lZ6xC8'


def _escaping_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Arguments as the model wrote them, JSON escapes in the secret; then an extra argument named as a secret."""
    calls = sum(isinstance(part, ToolCallPart) for message in messages for part in message.parts)
    if calls == 0:
        return ModelResponse(parts=[ToolCallPart('find', args='{"query": "' + _ESCAPED_KEY + '"}', tool_call_id='a')])
    if calls == 1:
        args = '{"query": "x", "api_key": "rv12345zzQUOTED"}'
        return ModelResponse(parts=[ToolCallPart('find', args=args, tool_call_id='b')])
    return ModelResponse(parts=[TextPart('done')])


async def test_secrets_a_model_hid_behind_json_escapes_or_quoted_in_a_retry_are_not_stored(demo_data: None) -> None:
    # The ledger's bodies kept `sk\u002dproj\u002d...` whole (the rules read the arguments' text as written), and the
    # retry prompt of an extra `api_key` argument quoted its value (QA).
    model = FunctionModel(_escaping_model, model_name='gpt-4o-mini')
    result = await simple_chat(
        'look it up', session_id='escaped', account='acme-health', model=model, toolsets=[_finder]
    )
    assert result.output == 'done'
    await get_request_tracker().flush()
    rows = await ledger_rows(chat_session_id='escaped')
    bodies = [c['body'] for row in rows for c in await content_rows(row['id'])]
    assert len(rows) == 3 and len(bodies) == 6
    stored = '\n'.join(bodies)
    assert 'Qz7xK2mN9pL4' not in stored and 'rv12345zzQUOTED' not in stored, stored
    assert 'extra_forbidden' in stored  # the retry prompt is there, its quoted value redacted
