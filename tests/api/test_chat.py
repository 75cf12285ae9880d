"""`POST /api/v1/chat` (Vercel AI data stream) and `/api/v1/chat/ag-ui`, served by uvicorn on loopback or in-process."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx2
import pytest
from logfire.testing import CaptureLogfire
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from sqlalchemy import func, select

from agentrt.agents.demo_model import demo_model
from agentrt.api.app import create_app
from agentrt.db.engine import pool_status
from agentrt.db.models import ConversationRow, ConversationTurnRow
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.conversations import PostgresConversationStore
from agentrt.services.ledger import get_request_tracker
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, agui_body, auth, chat_body, of_type, serve, sse_events, stream_chat
from tests.factories import HeldModel, ledger_rows

QUESTION = 'Cardiologists in Seattle who accept Medicare'


async def _settled() -> None:
    """Let the ledger writes and post-turn tasks of finished turns land."""
    await get_request_tracker().flush()
    await get_supervisor().join()


async def _conversations() -> int:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(select(func.count()).select_from(ConversationRow))).scalar_one()


async def test_streamed_turns_carry_parallel_tool_calls_and_history_and_bill_each_request(
    keys: Keys, live_url: str
) -> None:
    async with httpx2.AsyncClient(base_url=live_url, timeout=30) as client:
        status, first = await stream_chat(client, keys.acme, chat_body('conv-1', QUESTION))
        # The AI SDK sends only its new message when the server holds the history.
        status2, second = await stream_chat(client, keys.acme, chat_body('conv-1', 'and in Boston?', 'm2'))
    assert status == status2 == 200
    assert first[0] == {'type': 'start'} and first[-1] == '[DONE]' and second[-1] == '[DONE]'

    # Parallel tool calls: several calls announced before the first result arrives.
    kinds = [event['type'] for event in first if isinstance(event, dict)]
    started = of_type(first, 'tool-input-start')
    assert len({event['toolCallId'] for event in started}) >= 2
    assert kinds.index('tool-output-available') > [i for i, k in enumerate(kinds) if k == 'tool-input-start'][1]
    assert {event['toolName'] for event in started} == {'search_directory', 'get_directory_entry'}
    text = ''.join(event['delta'] for event in of_type(first, 'text-delta'))
    assert 'Seattle' in text and 'Cardiology' in text
    assert of_type(first, 'finish') and not of_type(first, 'error')
    assert 'Boston' in ''.join(event['delta'] for event in of_type(second, 'text-delta'))

    await _settled()
    acme = await account_id('acme-health')
    stored = await PostgresConversationStore(acme).load('conv-1')
    assert stored is not None
    prompts = [part.content for m in stored.messages for part in m.parts if part.part_kind == 'user-prompt']
    assert prompts == [QUESTION, 'and in Boston?']  # turn 2 continued turn 1's conversation
    rows = await ledger_rows(chat_session_id='conv-1')
    assert len(rows) == stored.usage.requests == 6  # one ledger row per model request, 3 per turn
    assert {(row['status'], row['account_id'], row['streamed']) for row in rows} == {('complete', acme, True)}
    async with get_db_session(account=Unscoped.ADMIN) as session:
        title = (await session.execute(select(ConversationRow.title))).scalar_one()
    assert title  # post-turn work ran from on_complete


async def test_disconnect_mid_stream_cancels_the_run_records_it_and_saves_nothing(keys: Keys) -> None:
    app = create_app(manage_runtime=False, model=demo_model(stream_delay=0.02))
    async for url in serve(app):
        async with httpx2.AsyncClient(base_url=url, timeout=30) as client:
            status, events = await stream_chat(
                client,
                keys.acme,
                chat_body('gone', QUESTION),
                stop=lambda e: isinstance(e, dict) and e.get('type') == 'text-delta',
            )
        assert status == 200 and of_type(events, 'text-delta')
        for _ in range(200):  # the server notices the hang-up, cancels the run, and the ledger records it
            await get_request_tracker().flush()
            if [row['status'] for row in await ledger_rows()] == ['complete', 'complete', 'cancelled']:
                break
            await asyncio.sleep(0.02)
    await _settled()
    assert [row['status'] for row in await ledger_rows()] == ['complete', 'complete', 'cancelled']
    assert await _conversations() == 0
    assert pool_status().checked_out == 0
    async with get_db_session(account=Unscoped.ADMIN) as session:  # the turn's claim on the conversation was released
        assert (await session.execute(select(func.count()).select_from(ConversationTurnRow))).scalar_one() == 0


async def test_a_second_turn_on_a_busy_conversation_is_refused_before_its_stream(keys: Keys) -> None:
    model = HeldModel()
    app = create_app(manage_runtime=False, model=model)
    async for url in serve(app):
        async with httpx2.AsyncClient(base_url=url, timeout=30) as client:
            first = asyncio.create_task(stream_chat(client, keys.acme, chat_body('busy', QUESTION)))
            await model.wait_for_arrivals(1)  # the first turn holds the conversation, at its first model request
            assert await _claimed()
            second = await client.post(
                '/api/v1/chat', json=chat_body('busy', 'and in Boston?'), headers=auth(keys.acme)
            )
            model.release.set()
            status, events = await first
    assert model.arrived == 3  # the first turn's 3 requests; the refused turn never reached the model
    assert second.status_code == 409 and second.json()['type'] == 'concurrent_turn'
    assert second.headers['retry-after'] == '2'  # the other turn lasts seconds: a client that honours it waits
    assert status == 200 and events[-1] == '[DONE]' and not of_type(events, 'error')
    await _settled()
    assert len(await ledger_rows(chat_session_id='busy')) == 3  # the refused turn sent nothing


async def _claimed() -> bool:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(select(func.count()).select_from(ConversationTurnRow))).scalar_one() > 0


async def test_a_conversation_goes_on_turn_after_turn_past_the_old_lifetime_request_limit(
    keys: Keys, live_url: str
) -> None:
    # 17 turns of 3 requests, each sent the moment the last one's stream ended: 51 requests, past pydantic-ai's
    # default request_limit of 50 (which the adapters' own conversation handling applies to the conversation's
    # lifetime usage; the limits here are per turn), and never refused because the last turn still held the
    # conversation (its claim is released before the stream's last events go out).
    async with httpx2.AsyncClient(base_url=live_url, timeout=30) as client:
        for n in range(17):
            status, events = await stream_chat(
                client, keys.acme, chat_body('long', f'Cardiologists in Seattle {n}', f'm{n}')
            )
            assert status == 200 and events[-1] == '[DONE]' and not of_type(events, 'error'), (n, status, events[-3:])
            assert not await _claimed()  # free by the time the stream has ended
    stored = await PostgresConversationStore(await account_id('acme-health')).load('long')
    assert stored is not None and stored.usage.requests == 51


def _failing_model(message: str) -> FunctionModel:
    def respond(messages: list[ModelMessage], info: AgentInfo) -> object:
        raise RuntimeError(message)

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        raise RuntimeError(message)
        yield ''

    return FunctionModel(respond, stream_function=stream, model_name='failing')  # type: ignore[arg-type]


async def test_an_error_reaches_the_client_as_a_message_and_an_id_never_its_text(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    secret = 'SELECT password FROM accounts WHERE host=db.internal:5432 -- hunter2'
    app = create_app(manage_runtime=False, model=_failing_model(secret))
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    with caplog.at_level(logging.INFO, logger='agentrt.api'):
        async with httpx2.AsyncClient(transport=transport, base_url='http://test') as client:
            response = await client.post('/api/v1/chat', json=chat_body('boom', 'hello'), headers=auth(keys.acme))
    assert response.status_code == 200  # the stream had started: the error is an event in it
    assert 'hunter2' not in response.text and 'SELECT' not in response.text
    errors = of_type(sse_events(response.text), 'error')
    assert len(errors) == 1
    text = errors[0]['errorText']
    assert text.startswith('the request failed on the server (error id err_')
    error_id = text.rsplit(' ', 1)[-1].rstrip(')')
    logged = [record for record in caplog.records if error_id in record.getMessage()]
    # The whole story is in the log: the message and the traceback (redacted, as text: `exc_text`, not `exc_info`).
    assert logged and secret in logged[0].getMessage() and 'Traceback' in (logged[0].exc_text or '')
    await _settled()
    # One row: the model's error (it failed before its first chunk), not a cancellation.
    assert [(row['success'], row['status'], row['error_type']) for row in await ledger_rows()] == [
        (False, 'error', 'RuntimeError')
    ]
    assert await _conversations() == 0


async def test_a_run_that_fails_before_its_first_response_closes_no_step_it_never_opened(keys: Keys) -> None:
    """The data stream's steps pair (`start-step` ... `finish-step`, as the AI SDK's UI message stream has them): a
    run refused or failed before any model response streamed `start`, `error`, then a `finish-step` with no step
    open (pydantic-ai's adapter ends every stream with one)."""
    app = create_app(manage_runtime=False, model=_failing_model('no answer'))
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx2.AsyncClient(transport=transport, base_url='http://test') as client:
        response = await client.post('/api/v1/chat', json=chat_body('no-step', 'hello'), headers=auth(keys.acme))
    events = sse_events(response.text)
    kinds = [event['type'] if isinstance(event, dict) else event for event in events]
    assert kinds == ['start', 'error', 'finish', '[DONE]'], kinds


async def test_ag_ui_turn_streams_run_events_and_saves_the_conversation(keys: Keys, client: httpx2.AsyncClient) -> None:
    body = {
        'threadId': 'thread-1',
        'runId': 'run-1',
        'messages': [{'id': 'u1', 'role': 'user', 'content': 'Dermatologists in Boston'}],
        'tools': [],
        'context': [],
    }
    response = await client.post('/api/v1/chat/ag-ui', json=body, headers=auth(keys.acme))
    assert response.status_code == 200
    kinds = [event['type'] for event in sse_events(response.text) if isinstance(event, dict)]
    assert kinds[0] == 'RUN_STARTED' and kinds[-1] == 'RUN_FINISHED'
    assert 'TOOL_CALL_START' in kinds and 'TEXT_MESSAGE_CONTENT' in kinds
    await _settled()
    stored = await PostgresConversationStore(await account_id('acme-health')).load('thread-1')
    assert stored is not None and len(await ledger_rows(chat_session_id='thread-1')) == stored.usage.requests == 3


async def test_refused_turns_run_nothing_and_name_the_field(keys: Keys, client: httpx2.AsyncClient) -> None:
    cases = [
        (chat_body('c', ''), 'messages'),
        (chat_body('c', '   '), 'messages'),
        (chat_body('c', 'x' * 32_001), 'messages'),  # AGENTRT_MESSAGE_MAX_CHARS
        (chat_body('x' * 201, 'hi'), 'id'),
        (chat_body('tab\tid', 'hi'), 'id'),
        (chat_body('a\x00b', 'hi'), 'id'),
        (chat_body('-starts-badly', 'hi'), 'id'),
        (chat_body('c', 'hi') | {'trigger': 'regenerate-message'}, 'trigger'),
        (chat_body('c', 'hi') | {'messages': [{'id': 'a', 'role': 'assistant', 'parts': []}]}, 'messages'),
        ({'trigger': 'submit-message', 'messages': []}, 'id'),
        ({'trigger': 'submit-message', 'id': 'c', 'messages': []}, 'messages'),
        ({'trigger': 'launch', 'id': 'c', 'messages': []}, None),
    ]
    for body, field in cases:
        response = await client.post('/api/v1/chat', json=body, headers=auth(keys.acme))
        assert response.status_code == 422, (body, response.text)
        assert response.json()['error_id'].startswith('err_')
        if field is not None:
            assert response.json()['field'] == field, response.json()
    raw = [
        ('{"id": "c", "messages": [', 'application/json', 422),
        ('[1, 2]', 'application/json', 422),
        (
            '{"trigger":"submit-message","id":"c","messages":[{"id":"m","role":"user","parts":[{"type":"text","text":"\\ud800"}]}]}',
            'application/json',
            422,
        ),
        ('id=c&text=hi', 'application/x-www-form-urlencoded', 415),
        ('{"id": "c"}', 'text/plain', 415),
    ]
    for content, media_type, status in raw:
        response = await client.post(
            '/api/v1/chat', content=content, headers={**auth(keys.acme), 'content-type': media_type}
        )
        assert response.status_code == status, (content, response.text)
    response = await client.post('/api/v1/chat?agent=nope', json=chat_body('c', 'hi'), headers=auth(keys.acme))
    assert response.status_code == 422 and response.json()['type'] == 'unknown_agent'
    assert 'provider-finder' in response.json()['detail'] and 'green' not in response.json()['detail']
    response = await client.post('/api/v1/chat?agent=bad%20slug', json=chat_body('c', 'hi'), headers=auth(keys.acme))
    assert response.status_code == 422 and response.json()['field'] == 'agent'
    big = chat_body('c', 'x' * (4 * 1024 * 1024 + 1))
    response = await client.post('/api/v1/chat', json=big, headers=auth(keys.acme))
    assert response.status_code == 413
    await _settled()
    assert await ledger_rows() == [] and await _conversations() == 0


async def test_the_client_names_its_ai_sdk_version(keys: Keys, client: httpx2.AsyncClient) -> None:
    for version in ('5', '6', '7'):
        response = await client.post(
            f'/api/v1/chat?sdk_version={version}', json=chat_body(f'v{version}', 'hi'), headers=auth(keys.acme)
        )
        assert response.status_code == 200 and response.headers['x-vercel-ai-ui-message-stream'] == 'v1'
    for bad in ('4', '8', 'six'):
        response = await client.post(
            f'/api/v1/chat?sdk_version={bad}', json=chat_body('v', 'hi'), headers=auth(keys.acme)
        )
        assert response.status_code == 422 and response.json()['detail'][0]['loc'] == ['query', 'sdk_version']
        assert response.json()['field'] == 'sdk_version'


@pytest.mark.parametrize('failure', ['connection', 'behavior', 'http'])
async def test_provider_error_text_reaches_no_client_and_no_log_line_with_a_secret(
    keys: Keys, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    """JSON turns, the Vercel stream and the AG-UI stream: the client's message and every log line, redacted."""
    from tests.agents.test_error_redaction import OPENAI_KEY, RUN_ERRORS, _assert_clean, _failing

    app = create_app(manage_runtime=False, model=_failing(RUN_ERRORS[failure]))
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    ag_ui = {'threadId': f'agui-{failure}', 'runId': 'r', 'messages': [{'id': 'u', 'role': 'user', 'content': 'hi'}]}
    with caplog.at_level(logging.INFO, logger='agentrt'):
        async with httpx2.AsyncClient(transport=transport, base_url='http://test') as client:
            plain = await client.post(
                f'/api/v1/conversations/json-{failure}/turns', json={'message': 'hi'}, headers=auth(keys.acme)
            )
            streamed = await client.post('/api/v1/chat', json=chat_body(f'v-{failure}', 'hi'), headers=auth(keys.acme))
            agui = await client.post(
                '/api/v1/chat/ag-ui', json=ag_ui | {'tools': [], 'context': []}, headers=auth(keys.acme)
            )
    assert plain.status_code == 502 and plain.json()['error_id'].startswith('err_')
    [error] = of_type(sse_events(streamed.text), 'error')
    assert 'error id err_' in error['errorText']
    assert 'RUN_ERROR' in agui.text
    for shown in (plain.text, streamed.text, agui.text):
        _assert_clean(shown, OPENAI_KEY)
    assert caplog.records
    for record in caplog.records:
        _assert_clean(record.getMessage() + (record.exc_text or ''), OPENAI_KEY)
    await _settled()


async def test_ag_ui_run_and_thread_ids_are_checked_before_they_are_echoed(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    # The runId came back on RUN_STARTED and RUN_FINISHED at any length the body limit allowed, NUL and newlines too.
    def body(thread_id: str, run_id: str) -> dict[str, object]:
        return {'threadId': thread_id, 'runId': run_id, 'messages': [{'id': 'u1', 'role': 'user', 'content': 'hi'}]}

    refused = [
        (body('t1', 'r' * 201), 'runId', 'the run id is 201 characters long; the limit is 200'),
        (body('t1', 'r' * 100_000), 'runId', 'the run id is 100,000 characters long'),
        (body('t1', 'a\nb'), 'runId', 'at position 1 (U+000A, whitespace)'),
        (body('t1', 'a\x07b'), 'runId', 'at position 1 (U+0007)'),
        (body('t1', 'a\x00b'), 'runId', 'at position 1 (U+0000, NUL)'),
        (body('t1', ''), 'runId', 'the run id is empty'),
        (body('t1', '-r'), 'runId', 'at position 0'),
        (body('t' * 201, 'r1'), 'threadId', 'the conversation id is 201 characters long'),  # was 'the session id'
        (body('t\x07', 'r1'), 'threadId', 'at position 1 (U+0007)'),
    ]
    for request, field, says in refused:
        response = await client.post('/api/v1/chat/ag-ui', json=request, headers=auth(keys.acme))
        assert response.status_code == 422, response.text
        error = response.json()
        assert error['field'] == field and says in error['detail'] and error['error_id'].startswith('err_'), error
        assert len(response.text) < 1_000  # the id is not echoed in the error either
    await _settled()
    assert await ledger_rows() == [] and await _conversations() == 0
    run_id = '01a23438-8d08-711f-943d-32b9783614c0:' + 'r' * 163  # 200 characters: the longest taken
    response = await client.post('/api/v1/chat/ag-ui', json=body('t1', run_id), headers=auth(keys.acme))
    started = next(event for event in sse_events(response.text) if isinstance(event, dict))
    assert response.status_code == 200 and started['type'] == 'RUN_STARTED' and started['runId'] == run_id


async def test_ag_ui_disconnect_mid_stream_cancels_the_run_and_a_second_stream_is_refused(keys: Keys) -> None:
    """The AG-UI route holds the same turn as the Vercel one: one at a time per conversation, a hang-up cancels it."""
    model = HeldModel(demo_model(stream_delay=0.02))
    app = create_app(manage_runtime=False, model=model)
    async for url in serve(app):
        async with httpx2.AsyncClient(base_url=url, timeout=30) as client:
            first = asyncio.create_task(
                stream_chat(
                    client,
                    keys.acme,
                    agui_body('ag-gone', QUESTION),
                    stop=lambda e: isinstance(e, dict) and e.get('type') == 'TEXT_MESSAGE_CONTENT',
                    path='/api/v1/chat/ag-ui',
                )
            )
            await model.wait_for_arrivals(1)  # the first turn holds the conversation, at its first model request
            assert await _claimed()
            second = await client.post(
                '/api/v1/chat/ag-ui', json=agui_body('ag-gone', 'and in Boston?'), headers=auth(keys.acme)
            )
            model.release.set()
            status, events = await first
            assert second.status_code == 409 and second.json()['type'] == 'concurrent_turn'
            assert second.headers['retry-after'] == '2'
            assert status == 200 and of_type(events, 'TEXT_MESSAGE_CONTENT')
            for _ in range(200):
                await get_request_tracker().flush()
                if [row['status'] for row in await ledger_rows()] == ['complete', 'complete', 'cancelled']:
                    break
                await asyncio.sleep(0.02)
            # the server keeps serving: the conversation is free again and takes the next turn
            for _ in range(200):
                if not await _claimed():
                    break
                await asyncio.sleep(0.02)
            again = await client.post(
                '/api/v1/chat/ag-ui', json=agui_body('ag-gone', 'Dermatologists'), headers=auth(keys.acme)
            )
            assert again.status_code == 200 and 'RUN_FINISHED' in again.text
    await _settled()
    assert [row['status'] for row in await ledger_rows()][:3] == ['complete', 'complete', 'cancelled']
    stored = await PostgresConversationStore(await account_id('acme-health')).load('ag-gone')
    assert stored is not None and QUESTION not in str(stored.messages)  # the cancelled turn saved nothing
    assert pool_status().checked_out == 0


def _history(count: int, part: dict[str, object]) -> list[dict[str, object]]:
    """Earlier messages as a client that keeps its own copy sends them: here of a kind this server cannot read."""
    return [{'id': f'h{n}', 'role': ('user', 'assistant')[n % 2], 'parts': [part]} for n in range(count)]


async def test_a_client_sending_its_whole_history_is_read_for_its_new_message_only(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    # The AI SDK's useChat sends every message of the chat with each turn. The history is the server's, so reading
    # (validating) the earlier ones cost the event loop CPU growing with the conversation (about 1 s at turn 300 of
    # the demo), and a part kind of a newer SDK anywhere in them refused every later turn of that conversation.
    body = chat_body('whole', QUESTION, 'm-new')
    body['messages'] = _history(400, {'type': 'part-of-a-newer-sdk', 'n': 1}) + body['messages']
    status, events = await stream_chat(client, keys.acme, body)
    assert status == 200 and events[-1] == '[DONE]' and not of_type(events, 'error'), events[-3:]
    ag_ui = agui_body('whole-ag-ui', QUESTION)
    ag_ui['messages'] = [{'id': f'h{n}', 'role': 'a-newer-role', 'content': 1} for n in range(400)] + [
        {'id': 'u-new', 'role': 'user', 'content': QUESTION}
    ]
    response = await client.post('/api/v1/chat/ag-ui', json=ag_ui, headers=auth(keys.acme))
    assert response.status_code == 200 and 'RUN_FINISHED' in response.text and 'RUN_ERROR' not in response.text
    await _settled()
    for conversation in ('whole', 'whole-ag-ui'):
        stored = await PostgresConversationStore(await account_id('acme-health')).load(conversation)
        assert stored is not None
        prompts = [part.content for m in stored.messages for part in m.parts if part.part_kind == 'user-prompt']
        assert prompts == [QUESTION]

    # The new message is still checked, and a fault in it named where the client put it.
    bad = chat_body('whole', 'hi') | {'messages': [*_history(3, {'type': 'text', 'text': 'old'}), {'id': 'n'}]}
    response = await client.post('/api/v1/chat', json=bad, headers=auth(keys.acme))
    assert response.status_code == 422 and response.json()['field'].startswith('messages.3'), response.json()
    not_user = chat_body('whole', 'hi') | {'messages': _history(2, {'type': 'text', 'text': 'old'})}
    response = await client.post('/api/v1/chat', json=not_user, headers=auth(keys.acme))
    assert response.status_code == 422 and response.json()['field'] == 'messages'
    old, new = _history(3, {'type': 'text', 'text': '\ud800'}), {'id': 'n', 'role': 'user', 'parts': []}
    surrogate = json.dumps(chat_body('whole', 'hi') | {'messages': [*old, new | {'parts': old[0]['parts']}]})
    headers = {**auth(keys.acme), 'content-type': 'application/json'}
    response = await client.post('/api/v1/chat', content=surrogate, headers=headers)
    assert response.status_code == 422 and response.json()['field'] == 'messages.3.parts.0.text', response.json()
    assert 'lone surrogate' in response.json()['detail']
    utf16 = json.dumps(chat_body('whole', 'hi') | {'messages': body['messages'][-2:]}).encode('utf-16')
    response = await client.post('/api/v1/chat', content=utf16, headers=headers)
    assert response.status_code == 422 and response.json()['field'] == 'body'  # JSON is read as UTF-8 only


def _model_writing_lone_surrogates() -> FunctionModel:
    """A model whose answer holds lone surrogates, as a provider's JSON can (`"\\ud83d"`: half an emoji cut at a chunk
    boundary), after a tool call whose arguments hold one (pydantic-ai reads those as invalid JSON: no surrogate)."""

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        if len(messages) == 1:
            yield {0: DeltaToolCall(name='look_up', json_args='{"name": "Dr \\ud83d"}', tool_call_id='call-1')}
            return
        yield 'Found Dr \ud83d'
        yield ' in Seattle \udc00.'

    async def respond(messages: list[ModelMessage], info: AgentInfo) -> object:
        raise AssertionError('streamed only')

    return FunctionModel(respond, stream_function=stream, model_name='surrogates')  # type: ignore[arg-type]


@pytest.mark.parametrize('protocol', ['ai-sdk', 'ag-ui'])
async def test_a_lone_surrogate_in_the_models_answer_streams_as_a_replacement_character(
    keys: Keys, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The answer is streamed and saved with U+FFFD in place of each lone surrogate, as the store
    saves them (the stream failed on encoding the first one: 'surrogates not allowed', the page said the connection
    was lost and the server logged a traceback)."""
    app = create_app(manage_runtime=False, model=_model_writing_lone_surrogates())
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    path, body = (
        ('/api/v1/chat', chat_body('odd', 'hi'))
        if protocol == 'ai-sdk'
        else ('/api/v1/chat/ag-ui', agui_body('odd', 'hi'))
    )
    with caplog.at_level(logging.WARNING):
        async with httpx2.AsyncClient(transport=transport, base_url='http://test') as client:
            response = await client.post(path, json=body, headers=auth(keys.acme))
    assert response.status_code == 200
    events = [event for event in sse_events(response.text) if isinstance(event, dict)]
    kinds = [event['type'] for event in events]
    if protocol == 'ai-sdk':
        assert kinds[-1] == 'finish' and 'error' not in kinds, kinds
        text = ''.join(event['delta'] for event in of_type(events, 'text-delta'))
    else:
        assert kinds[-1] == 'RUN_FINISHED' and 'RUN_ERROR' not in kinds, kinds
        text = ''.join(event['delta'] for event in events if event['type'] == 'TEXT_MESSAGE_CONTENT')
    assert text == 'Found Dr \ufffd in Seattle \ufffd.'
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    await _settled()
    stored = await PostgresConversationStore(await account_id('acme-health')).load('odd')
    assert stored is not None
    assert stored.messages[-1].parts[0].content == text  # type: ignore[union-attr]


@pytest.mark.parametrize('protocol', ['ai-sdk', 'ag-ui'])
async def test_a_nul_in_the_models_answer_streams_as_a_replacement_character_and_escapes_stay_text(
    keys: Keys, protocol: str
) -> None:
    """A NUL in the answer streams as U+FFFD, as it is saved; text that only looks like an escape (a backslash, then
    `u0000` or `ud83d`) streams as it was written. The events are encoded first and walked only when their JSON shows
    `\\u0000` or a surrogate's escape, so both kinds must come out as the store has them."""

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        yield 'Dr \x00 X'
        yield ' at C:\\u0000\\ud83d.'

    async def respond(messages: list[ModelMessage], info: AgentInfo) -> object:
        raise AssertionError('streamed only')

    model = FunctionModel(respond, stream_function=stream, model_name='nul')  # type: ignore[arg-type]
    app = create_app(manage_runtime=False, model=model)
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    path, body = (
        ('/api/v1/chat', chat_body('nul', 'hi'))
        if protocol == 'ai-sdk'
        else ('/api/v1/chat/ag-ui', agui_body('nul', 'hi'))
    )
    async with httpx2.AsyncClient(transport=transport, base_url='http://test') as client:
        response = await client.post(path, json=body, headers=auth(keys.acme))
    assert response.status_code == 200
    assert '\\u0000' not in response.text.replace('\\\\u0000', '')  # no NUL escape left; the written one stays
    events = [event for event in sse_events(response.text) if isinstance(event, dict)]
    delta_type = 'text-delta' if protocol == 'ai-sdk' else 'TEXT_MESSAGE_CONTENT'
    text = ''.join(event['delta'] for event in events if event['type'] == delta_type)
    assert text == 'Dr \ufffd X at C:\\u0000\\ud83d.'
    await _settled()
    stored = await PostgresConversationStore(await account_id('acme-health')).load('nul')
    assert stored is not None
    assert stored.messages[-1].parts[0].content == text  # type: ignore[union-attr]


async def test_a_streamed_http_turn_is_a_chat_turn_span_under_its_request_its_error_redacted(
    keys: Keys, capfire: CaptureLogfire
) -> None:
    """An operator reads an HTTP turn's trace as a CLI one: `chat turn` (conversation, account), the run under it,
    and a failed turn's error, redacted. The HTTP turn had no `chat turn` span: its database work and run sat under
    the request's span with no conversation named and no error but pydantic-ai's."""
    from agentrt.agents.observability import instrument_runtime, uninstrument_runtime
    from tests.agents.test_error_redaction import OPENAI_KEY, RUN_ERRORS, _assert_clean, _failing

    instrument_runtime()
    try:
        for conversation, model in (('http-span-ok', demo_model()), ('http-span-failed', _failing(RUN_ERRORS['http']))):
            app = create_app(manage_runtime=False, model=model)
            transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx2.AsyncClient(transport=transport, base_url='http://test', timeout=30) as client:
                status, _ = await stream_chat(client, keys.acme, chat_body(conversation, QUESTION))
            assert status == 200
        await _settled()
    finally:
        uninstrument_runtime()
    spans = [s for s in capfire.exporter.exported_spans_as_dict() if s['attributes'].get('logfire.span_type') == 'span']
    turns = {s['attributes'].get('gen_ai.conversation.id'): s for s in spans if s['name'] == 'chat turn'}
    assert set(turns) == {'http-span-ok', 'http-span-failed'}, [s['name'] for s in spans]
    for turn in turns.values():
        assert turn['attributes']['agentrt.account'] == 'acme-health' and turn['attributes']['agentrt.streamed']
        under = [s['name'] for s in spans if s['parent'] and s['parent']['span_id'] == turn['context']['span_id']]
        assert 'invoke_agent simple_chat' in under and 'SELECT' in under and 'WITH' in under, under
    [error] = [e for e in turns['http-span-failed'].get('events', []) if e['name'] == 'exception']
    assert error['attributes']['exception.type'] == 'agentrt.db.errors.ModelProviderError'
    assert 'exception' not in [e['name'] for e in turns['http-span-ok'].get('events', [])]
    _assert_clean(repr(spans), OPENAI_KEY)


async def test_a_lone_surrogate_in_a_plain_turns_answer_is_returned_as_a_replacement_character(keys: Keys) -> None:
    """POST /conversations/{id}/turns returns the answer as the store saved it, U+FFFD in place of a lone surrogate."""

    async def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart('Found Dr \ud83d in Seattle \udc00.')])

    app = create_app(manage_runtime=False, model=FunctionModel(respond, model_name='surrogates'))
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx2.AsyncClient(transport=transport, base_url='http://test') as client:
        response = await client.post('/api/v1/conversations/odd/turns', json={'message': 'hi'}, headers=auth(keys.acme))
    assert response.status_code == 200, response.text
    assert response.json()['output'] == 'Found Dr \ufffd in Seattle \ufffd.'
