"""A streamed turn whose client keeps its connection open but reads nothing (`AGENTRT_STREAM_SEND_TIMEOUT_SECONDS`):
once a piece of the stream cannot be sent in time the turn ends as a hang-up ends it (the run cancelled, its request
`cancelled` in the ledger, its budget hold given back, nothing saved, the conversation released)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx2
import pytest
import uvicorn
from fastapi import FastAPI

from agentrt.api.app import create_app
from agentrt.api.turn_stream import KEEPALIVE
from agentrt.db.engine import current_settings, pool_status
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.budgets import Period, set_budget
from agentrt.services.ledger import get_request_tracker
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, auth, chat_body, chat_scope, of_type, sse_events
from tests.factories import ledger_rows, scalar
from tests.services.budgets.helpers import period_row
from tests.services.budgets.priced_model import LongAnswerModel

STALLED = 'a streamed turn was ended as on a hang-up'
SMALL_BUFFER = 4096  # the kernel doubles it; still a few KiB where loopback's own would take megabytes


async def _serve_with_small_send_buffers(app: FastAPI) -> AsyncIterator[str]:
    """Serve `app` on loopback from a listening socket whose small send buffer its connections inherit (Linux), so
    a client that reads nothing fills the buffers with a few hundred KiB of answer, not tens of MiB."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    listener.bind(('127.0.0.1', 0))
    config = uvicorn.Config(app, lifespan='off', log_level='warning', access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f'http://127.0.0.1:{listener.getsockname()[1]}'
    finally:
        server.should_exit = True
        await task
        listener.close()


async def _stalled_client(url: str, key: str, conversation: str) -> socket.socket:
    """A connection that sends a streamed turn's request and then never reads: its receive window fills and stays
    full, while the connection stays open."""
    host, port = url.removeprefix('http://').split(':')
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)  # before connecting: the window it offers
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, (host, int(port)))
    body = json.dumps(chat_body(conversation, 'Write a long essay')).encode()
    head = (
        f'POST /api/v1/chat HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n'
        f'Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n'
    )
    await loop.sock_sendall(client, head.encode() + body)
    return client


async def _turn_over(conversation: str) -> list[str]:
    """The ledger statuses of `conversation` once its turn has ended (its claim released), polled for at most 30 s."""
    for _ in range(1500):
        await get_request_tracker().flush()
        rows = await ledger_rows(chat_session_id=conversation)
        if rows and await scalar('SELECT count(*) FROM conversation_turns') == 0:
            return [row['status'] for row in rows]
        await asyncio.sleep(0.02)
    raise AssertionError(f'the turn of {conversation} is still running')


async def test_a_client_that_reads_nothing_loses_its_turn_as_on_a_hang_up(
    keys: Keys, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Before, the stream's `send` waited for the client's window for ever: the turn held its claim (the next turn on
    # the conversation: 409), its budget hold, and its place in the pool for as long as the client kept the socket.
    monkeypatch.setattr(current_settings(), 'stream_send_timeout_seconds', 0.3)
    acme = await account_id('acme-health')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await set_budget(session=session, account='acme-health', limit_usd=Decimal('100'), period=Period('day'))
    model = LongAnswerModel(chunks=4000, pause_after=4000)  # ~1 MB of text: far more than the buffers hold
    app = create_app(manage_runtime=False, model=model)
    async for url in _serve_with_small_send_buffers(app):
        with caplog.at_level(logging.WARNING, logger='agentrt.api'):
            stalled = await _stalled_client(url, keys.acme, 'stalled')
            try:
                assert await _turn_over('stalled') == ['cancelled']
                assert model.produced_tokens < model.chunks * model.CHUNK_TOKENS, 'the answer was cut, not sent'
                assert pool_status().checked_out == 0
                window = await period_row(acme)
                assert window is not None and window['reserved_usd'] == 0
                assert await scalar('SELECT count(*) FROM budget_reservations') == 0
                assert await scalar("SELECT count(*) FROM conversations WHERE conversation_id = 'stalled'") == 0
                # The conversation is free at once, while the stalled client still holds its connection.
                model.chunks = 2
                async with httpx2.AsyncClient(base_url=url, timeout=30) as client:
                    again = await client.post(
                        '/api/v1/chat', json=chat_body('stalled', 'Write a short one'), headers=auth(keys.acme)
                    )
                assert again.status_code == 200, again.text
                events = sse_events(again.text)
                assert of_type(events, 'finish') and not of_type(events, 'error'), events
            finally:
                stalled.close()
    await get_supervisor().join()
    await get_request_tracker().flush()
    assert [row['status'] for row in await ledger_rows(chat_session_id='stalled')] == ['cancelled', 'complete']
    assert await scalar("SELECT count(*) FROM conversations WHERE conversation_id = 'stalled'") == 1
    warnings = [record.getMessage() for record in caplog.records if STALLED in record.getMessage()]
    assert warnings == [f'{STALLED}: its client read nothing for 0.3 s (AGENTRT_STREAM_SEND_TIMEOUT_SECONDS)']
    # The stream's generators were closed in the task that ran them (from another, the turn span's context could not
    # be reset: OpenTelemetry logged "Failed to detach context").
    assert not [record for record in caplog.records if record.name == 'opentelemetry.context']


async def test_a_keepalive_that_cannot_be_sent_ends_the_turn_too(
    keys: Keys, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # While the run has nothing to send (a slow tool, a model thinking) only the keepalive finds the client stalled.
    # The ASGI `send` of a client that reads nothing more: it takes the first events, then waits for ever.
    monkeypatch.setattr(current_settings(), 'stream_send_timeout_seconds', 0.2)
    monkeypatch.setattr(current_settings(), 'http_stream_keepalive_seconds', 0.05)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await set_budget(session=session, account='acme-health', limit_usd=Decimal('100'), period=Period('day'))
    model = LongAnswerModel(chunks=40, pause_after=1)  # one piece of text, then it waits for `resume`
    app = create_app(manage_runtime=False, model=model)
    body = json.dumps(chat_body('quiet', 'Write an essay')).encode()
    scope = chat_scope(keys.acme, body)
    sent = [{'type': 'http.request', 'body': body, 'more_body': False}]
    never = asyncio.Event()
    reading = True
    held = 0

    async def receive() -> dict[str, object]:
        if sent:
            return sent.pop()
        await never.wait()  # the client never hangs up
        return {'type': 'http.disconnect'}

    async def send(message: dict[str, object]) -> None:
        nonlocal reading, held
        if not reading and message.get('body') == KEEPALIVE:
            held += 1
            await never.wait()
        if b'text-delta' in message.get('body', b''):  # type: ignore[operator]
            reading = False  # the client read the first words, then nothing more

    with caplog.at_level(logging.WARNING, logger='agentrt.api'):
        await asyncio.wait_for(app(scope, receive, send), 30)  # returns: the response ended without the client
    assert held == 1 and model.paused.is_set()
    assert await _turn_over('quiet') == ['cancelled']
    assert await scalar('SELECT count(*) FROM budget_reservations') == 0
    assert await scalar("SELECT count(*) FROM conversations WHERE conversation_id = 'quiet'") == 0
    assert any(STALLED in record.getMessage() for record in caplog.records)
    model.resume.set()


async def test_a_stream_the_shutdown_cuts_off_ends_though_its_client_reads_nothing(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shutdown cancels a stream, which then sends the protocol's stopped events: to a client that reads nothing
    # that send waited for ever, and the server's shutdown with it.
    monkeypatch.setattr(current_settings(), 'stream_send_timeout_seconds', 0.2)
    monkeypatch.setattr(current_settings(), 'http_stream_keepalive_seconds', 0)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await set_budget(session=session, account='acme-health', limit_usd=Decimal('100'), period=Period('day'))
    model = LongAnswerModel(chunks=40, pause_after=1)
    app = create_app(manage_runtime=False, model=model)
    body = json.dumps(chat_body('cut-stalled', 'Write an essay')).encode()
    scope = chat_scope(keys.acme, body)
    sent = [{'type': 'http.request', 'body': body, 'more_body': False}]
    never = asyncio.Event()
    answering = asyncio.Event()

    async def receive() -> dict[str, object]:
        if sent:
            return sent.pop()
        await never.wait()
        return {'type': 'http.disconnect'}

    async def send(message: dict[str, object]) -> None:
        if answering.is_set():
            await never.wait()  # the client read the first words, then nothing more
        if b'text-delta' in message.get('body', b''):  # type: ignore[operator]
            answering.set()

    request = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(model.paused.wait(), 30)
    request.cancel()  # as uvicorn does at the end of its shutdown's grace
    await asyncio.wait_for(asyncio.gather(request, return_exceptions=True), 30)
    assert await _turn_over('cut-stalled') == ['cancelled']
    model.resume.set()
