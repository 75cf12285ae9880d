"""The writer's statement (`_writes.py`): every column of a row and of its contents stored exactly as given, on the
driver connection (the tracker's own transaction) as on a session or a Core connection; errors as the driver raises
them classified as a session's were."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import asyncpg
import pytest

from agentrt.db.driver import DriverTransaction, driver_transaction
from agentrt.db.errors import DatabaseDisconnectedError, DatabaseUnavailableError
from agentrt.db.session import Unscoped, get_side_session, scoped_connection
from agentrt.services.ledger import LedgerRecord, is_transient_db_error
from agentrt.services.ledger._record import ROW_FIELDS, ContentItem
from agentrt.services.ledger._writes import SessionFactory, write_ledger_rows
from tests.factories import content_rows, ledger_rows


@asynccontextmanager
async def _driver() -> AsyncIterator[DriverTransaction]:
    async with driver_transaction(account=Unscoped.LEDGER) as transaction:
        yield transaction


OPENERS: dict[str, SessionFactory] = {
    'driver': _driver,
    'session': lambda: get_side_session(account=Unscoped.LEDGER),
    'connection': lambda: scoped_connection(account=Unscoped.LEDGER),
}


def _every_column() -> LedgerRecord:
    """A row with every column set to a value that would not survive a lossy conversion."""
    started = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=timezone(timedelta(hours=-7)))  # not UTC: the instant counts
    return LedgerRecord(
        id=uuid.uuid4(),
        model='model-é-漢',
        streamed=True,
        status='error',
        success=False,
        latency_ms=1234.5678901234,
        started_at=started,
        finished_at=started + timedelta(seconds=3, microseconds=1),
        run_id='r' * 64,
        run_step=2**31 - 1,
        conversation_id='c' * 200,
        chat_session_id='s-ü',
        account_id=2**62,
        account_slug='acme',
        agent_instance_id=2**40 + 1,
        agent_instance_slug='front-desk',
        agent_type='chat',
        agent_name='Front desk 🤖',
        provider='openai',
        response_model='gpt-x-2026',
        input_tokens=2**40,
        output_tokens=7,
        cache_read_tokens=3,
        cache_write_tokens=2,
        reasoning_tokens=1,
        total_tokens=2**40 + 7,
        usage_reported=False,
        input_cost=Decimal('0.000000000000123456789012345678901234567890'),
        output_cost=Decimal('12345678901234567890.5'),
        total_cost=Decimal('1E-30'),
        price_source='genai-prices 0.0.1',
        time_to_first_token_ms=0.1,
        finish_reason='length',
        error_type='ModelHTTPError',
        error_message='quota\nexceeded: "x"',
        error_status_code=429,
        provider_response_id='resp_1',
        trace_id='0123456789abcdef' * 2,
    )


def _only_required() -> LedgerRecord:
    """A row with every optional column NULL and every other at its default."""
    now = datetime.now(UTC)
    return LedgerRecord(
        id=uuid.uuid4(),
        model='m',
        streamed=False,
        status='complete',
        success=True,
        latency_ms=0.0,
        started_at=now,
        finished_at=now,
    )


@pytest.mark.parametrize('opener', OPENERS)
async def test_every_column_of_rows_and_contents_is_stored_as_given(opener: str) -> None:
    full, bare = _every_column(), _only_required()
    rows = [full.to_row(), bare.to_row()]  # one statement: arrays with values and NULLs side by side
    contents = [
        ContentItem.build('prompt', 'nul \x00 and lone \ud800 surrogate', 1 << 20).to_row(full.id),
        ContentItem('response', '{"é": "漢 🤖"}', 2**40, True, 2**31 - 1).to_row(full.id),
        ContentItem('error', '', 0, False, 0).to_row(full.id),
    ]

    assert await write_ledger_rows(OPENERS[opener], rows, contents) == 2
    assert await write_ledger_rows(OPENERS[opener], rows, contents) == 0  # exactly once

    stored = {row['id']: row for row in await ledger_rows()}
    for row in rows:
        assert {name: stored[row['id']][name] for name in ROW_FIELDS} == row
        for name in ROW_FIELDS:  # the same types too (a Decimal is not read back as a float, a time not as text)
            assert row[name] is None or isinstance(stored[row['id']][name], type(row[name])), name
    assert stored[full.id]['started_at'].utcoffset() == timedelta(0)  # the same instant, read back in UTC
    by_kind = {content['kind']: content for content in await content_rows(full.id)}
    assert [{name: by_kind[c['kind']][name] for name in c} for c in contents] == contents
    assert by_kind['prompt']['body'] == 'nul \\u0000 and lone \\ud800 surrogate'  # as ContentItem made it storable


@pytest.mark.parametrize(
    ('error', 'transient'),
    [
        # What `driver_transaction` raises: asyncpg's exceptions as they are, or the database layer's translations.
        (asyncpg.exceptions.LockNotAvailableError('canceling statement due to lock timeout'), True),
        (asyncpg.exceptions.QueryCanceledError('canceling statement due to statement timeout'), True),
        (asyncpg.exceptions.SerializationError('could not serialize access'), True),
        (asyncpg.exceptions.DeadlockDetectedError('deadlock detected'), True),
        (asyncpg.exceptions.TooManyConnectionsError('sorry, too many clients already'), True),
        (DatabaseDisconnectedError('the connection to PostgreSQL was lost'), True),
        (DatabaseUnavailableError('cannot connect to PostgreSQL'), True),
        (asyncpg.exceptions.UniqueViolationError('duplicate key'), False),
        (asyncpg.exceptions.CheckViolationError('violates check constraint'), False),
        (asyncpg.exceptions.ForeignKeyViolationError('violates foreign key constraint'), False),
        (asyncpg.exceptions.RaiseError('no'), False),
        (asyncpg.exceptions.CharacterNotInRepertoireError('invalid byte sequence'), False),
        (asyncpg.exceptions.DataError('invalid input for query argument $1'), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_the_drivers_own_errors_are_classified(error: BaseException, transient: bool) -> None:
    assert is_transient_db_error(error) is transient


@pytest.mark.parametrize('opener', OPENERS)
async def test_a_value_the_driver_cannot_encode_is_not_retried_as_transient(opener: str) -> None:
    """A lone surrogate outside the bodies (which `ContentItem` makes storable): asyncpg refuses it before sending,
    on the driver connection as under SQLAlchemy; the error is the row's, not the database's, so the tracker splits
    its batch and spools that row at once instead of retrying it."""
    row = {**_only_required().to_row(), 'agent_name': 'bad \ud800'}
    with pytest.raises(Exception, match='surrogates not allowed') as raised:
        await write_ledger_rows(OPENERS[opener], [row])
    assert not is_transient_db_error(raised.value), repr(raised.value)
    assert await ledger_rows() == []
