"""A JSON (not streamed) turn whose client disconnects stops, as a streamed one does: its claim released at once, its
model request recorded `cancelled`, nothing saved; served by uvicorn on loopback, the client a real connection."""

from __future__ import annotations

import asyncio
import logging

import httpx2
import pytest
from sqlalchemy import func, select

from agentrt.api.app import create_app
from agentrt.db.engine import pool_status
from agentrt.db.models import ConversationRow, ConversationTurnRow
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import get_request_tracker
from tests.api.conftest import Keys, auth, serve
from tests.factories import HeldModel, ledger_rows

QUESTION = 'Cardiologists in Seattle who accept Medicare'


async def _count(table: type[ConversationRow] | type[ConversationTurnRow]) -> int:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(select(func.count()).select_from(table))).scalar_one()


async def _statuses() -> list[str]:
    await get_request_tracker().flush()
    return [row['status'] for row in await ledger_rows(chat_session_id='gone')]


async def test_a_json_turn_whose_client_disconnects_is_cancelled_and_frees_its_conversation(keys: Keys) -> None:
    # Before, the turn ran on with nobody waiting, holding (and renewing) its claim until the model answered or the
    # provider gave up: the client's retry got 409 all that time.
    model = HeldModel()
    app = create_app(manage_runtime=False, model=model)
    path = '/api/v1/conversations/gone/turns'
    async for url in serve(app):
        async with httpx2.AsyncClient(base_url=url, timeout=30) as leaving:
            first = asyncio.create_task(leaving.post(path, json={'message': QUESTION}, headers=auth(keys.acme)))
            await model.wait_for_arrivals(1)  # the turn holds its claim, at its first model request
            async with httpx2.AsyncClient(base_url=url, timeout=30) as other:
                refused = await other.post(path, json={'message': 'and in Boston?'}, headers=auth(keys.acme))
            assert refused.status_code == 409, refused.text
            assert 'one running now holds it until it ends' in refused.json()['detail']
            first.cancel()  # the client gives up: its connection closes with the client
            await asyncio.gather(first, return_exceptions=True)
        for _ in range(500):  # the server notices the hang-up and cancels the turn
            if await _count(ConversationTurnRow) == 0 and await _statuses() == ['cancelled']:
                break
            await asyncio.sleep(0.02)
        assert await _statuses() == ['cancelled']
        # A plain statement, not Python's text of the cancellation (anyio's `Cancelled via cancel scope 7fb8... by
        # <Task cancelling name='Task-4175' coro=<run_checked_turn(...`, a bare `CancelledError()`; QA).
        [row] = await ledger_rows(chat_session_id='gone')
        assert row['error_message'] == 'request stopped before the response was complete', row['error_message']
        assert await _count(ConversationTurnRow) == 0 and await _count(ConversationRow) == 0
        assert pool_status().checked_out == 0
        model.release.set()  # the next turn runs at once, not 409 for the lease's rest
        async with httpx2.AsyncClient(base_url=url, timeout=30) as client:
            again = await client.post(path, json={'message': QUESTION}, headers=auth(keys.acme))
        assert again.status_code == 200, again.text
        assert again.json()['output'].startswith('I found')


@pytest.mark.parametrize('path', ['/api/v1/chat', '/api/v1/chat/ag-ui', '/api/v1/conversations/gone/turns'])
async def test_a_client_that_hangs_up_while_sending_its_body_is_logged_as_such_not_as_a_server_error(
    keys: Keys, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    # The streamed routes read the body themselves: Starlette's ClientDisconnect reached the catch-all as a 500, logged
    # at ERROR with its traceback, twice (the error id's line, then uvicorn's "Exception in ASGI application"). The
    # JSON route's log line said the body was not JSON it could read.
    server_log = logging.getLogger('uvicorn.error')  # uvicorn's loggers do not propagate to the root's capture
    caplog.set_level(logging.INFO)
    try:
        async for url in serve(create_app(manage_runtime=False)):
            server_log.addHandler(caplog.handler)  # after uvicorn's start, whose logging set-up replaces its handlers
            port = int(url.rsplit(':', 1)[1])
            _, writer = await asyncio.open_connection('127.0.0.1', port)
            head = (
                f'POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {keys.acme}\r\n'
                'Content-Type: application/json\r\nContent-Length: 400\r\n\r\n'
            )
            writer.write(head.encode() + b'{"id": "gone", "mess')  # a fifth of the body, then the client is gone
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            for _ in range(500):  # the server notices when it reads on
                if any(path in record.getMessage() for record in caplog.records):
                    break
                await asyncio.sleep(0.01)
    finally:
        server_log.removeHandler(caplog.handler)
    lines = [record for record in caplog.records if path in record.getMessage()]
    assert len(lines) == 1, [record.getMessage() for record in caplog.records]
    assert lines[0].levelno == logging.INFO
    assert 'client disconnected before its request body arrived' in lines[0].getMessage()
    loud = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING or record.exc_info]
    assert loud == []
    assert await _count(ConversationTurnRow) == 0 and await ledger_rows() == []
