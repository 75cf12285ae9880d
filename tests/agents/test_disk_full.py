"""A turn while PostgreSQL's disk is full: one documented error saying so, nothing of the turn saved, the ledger rows
kept, and the next turn goes through once there is room.

PostgreSQL raises SQLSTATE 53100 (`could not extend file "base/5/16460": No space left on device`) when a table cannot
grow. Filling a file system under the shared test server is not practical, so a trigger raises that very error on
the write that met it when measured (the turn's save, into `conversation_entries`); the driver, the runtime and the
ledger see what a full disk gives them. Before, it was an internal error (`agentrt chat` exit 70, HTTP 500 with a
traceback per turn).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from sqlalchemy import text

from agentrt.agents.errors import DatabaseUnavailableError
from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import get_request_tracker
from tests.factories import ledger_rows

QUESTION = 'Find cardiologists in Seattle'
_FULL = 'could not extend file "base/5/16460": No space left on device'


async def _owner(*statements: str) -> None:
    async with get_db_session(account=Unscoped.OWNER) as session:
        for statement in statements:
            await session.execute(text(statement))


@pytest_asyncio.fixture
async def full_disk(demo_data: None) -> AsyncIterator[None]:
    """Saving a conversation meets a full disk until the test drops the trigger (`_room_again`)."""
    await _owner(
        'CREATE FUNCTION agentrt_test_disk_full() RETURNS trigger LANGUAGE plpgsql '
        f"AS $$ BEGIN RAISE EXCEPTION '{_FULL}' USING ERRCODE = 'disk_full', HINT = 'Check free disk space.'; END $$",
        'CREATE TRIGGER agentrt_test_disk_full BEFORE INSERT ON conversation_entries '
        'FOR EACH ROW EXECUTE FUNCTION agentrt_test_disk_full()',
    )
    try:
        yield
    finally:
        await _room_again()


async def _room_again() -> None:
    await _owner(
        'DROP TRIGGER IF EXISTS agentrt_test_disk_full ON conversation_entries',
        'DROP FUNCTION IF EXISTS agentrt_test_disk_full()',
    )


async def _turn(session_id: str, streamed: bool) -> str:
    if not streamed:
        return (await simple_chat(QUESTION, session_id=session_id, account='acme-health')).output
    async with simple_chat_stream(QUESTION, session_id=session_id, account='acme-health') as stream:
        return ''.join([delta async for delta in stream])


async def _count(sql: str) -> int:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return int((await session.execute(text(sql))).scalar_one())


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_turn_meeting_a_full_disk_says_so_and_saves_nothing(full_disk: None, streamed: bool) -> None:
    with pytest.raises(DatabaseUnavailableError, match='ran out of disk space') as raised:
        await _turn('full', streamed)
    message = str(raised.value)
    assert 'No space left on device' in message and 'free space on the file system of' in message
    assert 'did not complete' in message and 'INSERT' not in message and '\n' not in message
    await get_request_tracker().flush()
    requests = await ledger_rows(chat_session_id='full')
    assert requests and all(row['status'] == 'complete' for row in requests), 'the requests it made are billed'
    assert await _count('SELECT count(*) FROM conversations') == 0
    assert await _count('SELECT count(*) FROM conversation_entries') == 0
    assert await _count('SELECT count(*) FROM conversation_turns') == 0, 'the conversation is not left claimed'

    await _room_again()
    assert (await _turn('full', streamed)).startswith('I found ')
    await get_request_tracker().flush()
    again = await ledger_rows(chat_session_id='full')
    assert len({row['id'] for row in again}) == len(again) == 2 * len(requests), 'each request billed once'
    assert await _count('SELECT count(*) FROM conversations') == 1


async def test_a_full_disk_under_a_server_is_one_503_warning_line_without_a_traceback(
    clean_database: None, caplog: pytest.LogCaptureFixture
) -> None:
    """`agentrt serve` answers each turn while the disk is full with 503 `database_unavailable`, logged as one WARNING
    naming the disk (it was a 500 and a 60-line traceback per turn)."""
    from agentrt.api.errors import public_error

    with pytest.raises(DatabaseUnavailableError) as raised:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await session.execute(text(f"DO $$ BEGIN RAISE EXCEPTION '{_FULL}' USING ERRCODE = 'disk_full'; END $$"))
    with caplog.at_level(logging.INFO, logger='agentrt.api'):
        public = public_error(raised.value, where='POST /api/v1/chat')
    assert (public.status, public.type) == (503, 'database_unavailable')
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is None, 'one line, no traceback'
    assert 'ran out of disk space' in record.getMessage()


@pytest.mark.parametrize('streamed', [False, True], ids=['json', 'streamed'])
async def test_over_http_a_full_disk_says_the_databases_disk_is_full_without_its_path(
    full_disk: None, streamed: bool
) -> None:
    # The CLI said the disk was full; a client got "the database is unavailable; try again shortly", as for an outage
    # of seconds, while every turn would fail until space was freed.
    import httpx2

    from agentrt.api.app import create_app
    from agentrt.services.api_keys import create_api_key

    async with get_db_session(account=Unscoped.ADMIN) as session:
        key = (await create_api_key(session=session, account='acme-health')).token
    transport = httpx2.ASGITransport(app=create_app(manage_runtime=False), raise_app_exceptions=False)
    headers = {'Authorization': f'Bearer {key}'}
    async with httpx2.AsyncClient(transport=transport, base_url='http://test', timeout=60) as client:
        if streamed:
            message = {'id': 'm1', 'role': 'user', 'parts': [{'type': 'text', 'text': QUESTION}]}
            body = {'trigger': 'submit-message', 'id': 'full-http', 'messages': [message]}
            response = await client.post('/api/v1/chat', json=body, headers=headers)
            # The answer streamed before the save met the full disk: the error is the stream's last word.
            assert response.status_code == 200
            [error] = [line for line in response.text.splitlines() if line.startswith('data: {"type":"error"')]
            text_shown = json.loads(error.removeprefix('data: '))['errorText']
        else:
            response = await client.post(
                '/api/v1/conversations/full-http/turns', json={'message': QUESTION}, headers=headers
            )
            assert (response.status_code, response.headers['retry-after']) == (503, '5'), response.text
            error_body = response.json()
            assert error_body['type'] == 'database_unavailable'
            text_shown = error_body['detail']
    assert text_shown.startswith("the database's disk is full: nothing of this request was saved"), text_shown
    assert 'data' not in text_shown.replace('database', '') and '/' not in text_shown, 'no path of the server'
    assert await _count('SELECT count(*) FROM conversation_entries') == 0
