"""Shared test factories: ledger records and rows, run identity, a fast-retrying ledger configuration, row readers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic_ai.models import Model, StreamedResponse
from pydantic_ai.models.wrapper import WrapperModel
from sqlalchemy import event, insert, text

from agentrt.agents.demo_model import demo_model
from agentrt.db.engine import get_engine
from agentrt.db.models.ledger import LLMRequestRow
from agentrt.db.session import Unscoped, get_db_session
from agentrt.db.transaction_setup import PreludeConnection
from agentrt.services.ledger import LedgerConfig, LedgerRecord, RetryPolicy, new_request_id, utc_now
from agentrt.tools.dependencies import SessionDependencies


def ledger_record(
    *,
    success: bool = True,
    started_at: datetime | None = None,
    cost: str | Decimal | None = None,
    **fields: Any,
) -> LedgerRecord:
    """One model request as the ledger records it: the one ledger-row builder of the suite.

    Defaults describe a small successful `gpt-4o-mini` request that started now, with a prompt and a response
    body; `success=False` makes it an error. `cost` sets `total_cost`. Any other `LedgerRecord` field can be given.
    """
    started = started_at or utc_now()
    values: dict[str, Any] = {
        'id': new_request_id(),
        'model': 'gpt-4o-mini',
        'streamed': False,
        'status': 'complete' if success else 'error',
        'success': success,
        'latency_ms': 12.5,
        'started_at': started,
        'finished_at': started + timedelta(seconds=1),
        'input_tokens': 10,
        'output_tokens': 5,
        'total_tokens': 15,
        'total_cost': None if cost is None else Decimal(cost),
        'raw_contents': [('prompt', b'{"messages": []}'), ('response', b'{"parts": []}')],
    }
    values.update(fields)
    return LedgerRecord(**values)


async def write_ledger_row(record: LedgerRecord, *, recorded_at: datetime | None = None) -> None:
    """Insert the record's `llm_requests` row directly, in its own session (no tracker, no contents).

    `recorded_at` (when the row reached the database) defaults to a moment after the request started.
    """
    row = {**record.to_row(), 'recorded_at': recorded_at or record.started_at + timedelta(milliseconds=15)}
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(insert(LLMRequestRow), [row])


def fast_config(tmp_path: Path, **overrides: Any) -> LedgerConfig:
    """A configuration with a private spool file and retries measured in milliseconds."""
    options: dict[str, Any] = {
        'spool_path': tmp_path / 'spool' / 'llm-ledger.jsonl',
        'retry': RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, attempt_timeout=10),
    }
    options.update(overrides)
    return LedgerConfig(**options)


def chat_deps(session_id: str = 'chat-1', account_id: int = 7, agent_instance_id: int = 70) -> SessionDependencies:
    """Identity for a run (the accounts need not exist: the ledger has no foreign key to them)."""
    return SessionDependencies(
        session_id=session_id,
        account_id=account_id,
        account_slug=f'acct-{account_id}',
        agent_instance_id=agent_instance_id,
        agent_instance_slug=f'agent-{agent_instance_id}',
        agent_type='simple_chat',
    )


async def ledger_rows(**where: Any) -> list[dict[str, Any]]:
    """Ledger rows, oldest first, optionally filtered by equality on columns."""
    clause = ' AND '.join(f'{name} = :{name}' for name in where) or 'TRUE'
    async with get_db_session(account=Unscoped.ADMIN) as session:
        result = await session.execute(
            text(f'SELECT * FROM llm_requests WHERE {clause} ORDER BY started_at, id'),
            where,
        )
        return [dict(row) for row in result.mappings()]


async def content_rows(request_id: Any = None) -> list[dict[str, Any]]:
    """Content rows, for one request or all."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        if request_id is None:
            result = await session.execute(text('SELECT * FROM llm_request_contents ORDER BY request_id, kind'))
        else:
            result = await session.execute(
                text('SELECT * FROM llm_request_contents WHERE request_id = :id ORDER BY kind'), {'id': request_id}
            )
        return [dict(row) for row in result.mappings()]


async def scalar(sql: str, **params: Any) -> Any:
    """One value from a query."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(text(sql), params)).scalar()


async def wait_until_waiting_on_a_lock(statement_start: str, seconds: float = 30) -> None:
    """Poll until a session of this database waits on a lock in a statement that starts with `statement_start`: what
    a test that makes a deadlock needs before it takes its second lock (a fixed sleep was too short under load, and
    then PostgreSQL ended the other transaction than the one the test expects)."""
    waiting = text(
        'SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() '
        "AND wait_event_type = 'Lock' AND query LIKE :start"
    )
    async with asyncio.timeout(seconds):
        while True:
            async with get_db_session(account=Unscoped.OWNER) as session:  # sees every role's sessions
                if (await session.execute(waiting, {'start': f'{statement_start}%'})).scalar_one():
                    return
            await asyncio.sleep(0.01)


async def past_its_deadlock_check(statement_start: str) -> None:
    """Wait until a session waits on a lock in a statement starting with `statement_start`, then until its deadlock
    check is over (twice `deadlock_timeout`).

    PostgreSQL checks a waiting session for a deadlock once, `deadlock_timeout` after it began waiting, and ends the
    transaction of the session whose check finds the cycle. A test that closes the cycle only after this returns is
    the one ended, whatever the load: closed sooner, which side's check came first depended on timing (the side the
    test expected to go on was ended once in a while under load).
    """
    await wait_until_waiting_on_a_lock(statement_start)
    async with get_db_session(account=Unscoped.OWNER) as session:
        timeout = text("SELECT extract(epoch FROM current_setting('deadlock_timeout')::interval)")
        seconds = float((await session.execute(timeout)).scalar_one())
    await asyncio.sleep(2 * seconds)  # no event says a waiter's check ran: its timer is the server's


@contextmanager
def listening(*listeners: tuple[str, Callable[..., Any]], target: Any = None) -> Iterator[None]:
    """SQLAlchemy event listeners (`(event name, function)`) on `target`, the runtime's engine by default, while the
    block runs; removed after it, whatever it raised."""
    target = get_engine().sync_engine if target is None else target
    for name, listener in listeners:
        event.listen(target, name, listener)
    try:
        yield
    finally:
        for name, listener in listeners:
            event.remove(target, name, listener)


def spool_left_by_an_exited_process(spool_path: Path, rows: int) -> list[LedgerRecord]:
    """`rows` ledger rows spooled to `spool_path` by a tracker whose database never answered, in an event loop (a
    process) that then ended, as a chat run while PostgreSQL was down leaves them: nothing in the database yet."""
    from agentrt.services.ledger import LLMRequestTracker

    @asynccontextmanager
    async def stuck() -> AsyncIterator[Any]:
        await asyncio.sleep(3600)  # the database never answers before the program ends
        yield

    tracker = LLMRequestTracker(LedgerConfig(spool_path=spool_path), session_factory=stuck)
    now = utc_now()
    records = [ledger_record(started_at=now, finished_at=now) for _ in range(rows)]

    async def program() -> None:
        for record in records:
            tracker.submit(record)  # queued, not awaited: asyncio.run cancels the writer, which spools them

    asyncio.run(program())
    assert len(spool_path.read_text().splitlines()) == rows
    return records


def journal_left_by_a_killed_process(spool_path: Path, records: list[LedgerRecord], *, host: str | None = None) -> Path:
    """The journal (`services/ledger/_journal.py`) a process that held `records` when it was killed left beside the
    spool `spool_path`: named for a process that ran and ended (on `host`, this host by default)."""
    from agentrt.db.processes import process_start, this_host
    from agentrt.services.ledger._journal import JOURNAL_INFIX, framed_entries, host_tag

    child = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE)
    started = process_start(child.pid)
    child.communicate(b'')
    assert started is not None
    spool_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f'{spool_path.name}{JOURNAL_INFIX}{host_tag(host or this_host())}-{child.pid}-{started:.2f}-1'
    journal = spool_path.with_name(name)
    journal.write_bytes(framed_entries([record.spool_entry(1 << 20) for record in records]))
    journal.chmod(0o600)
    return journal


@contextmanager
def slow_commit_reply(monkeypatch: Any, delay: float = 0.2, *, skip: int = 0) -> Iterator[asyncio.Event]:
    """The next COMMIT on a pooled connection (after `skip` others) is committed by the server, and its reply reaches
    the caller `delay` seconds later: the event is set as it was committed, so a test can cancel the caller while the
    reply is in flight.
    """
    committed = asyncio.Event()
    original = PreludeConnection.execute
    commits = 0

    async def execute(self: PreludeConnection, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109
        nonlocal commits
        result: str = await original(self, query, *args, timeout=timeout)
        if query.strip().rstrip(';').upper() == 'COMMIT' and not committed.is_set():
            commits += 1
            if commits > skip:
                committed.set()
                await asyncio.sleep(delay)
        return result

    monkeypatch.setattr(PreludeConnection, 'execute', execute)
    yield committed


@contextmanager
def lost_commit_reply(monkeypatch: Any) -> Iterator[None]:
    """The next COMMIT on a pooled connection is committed by the server and its reply lost: the connection closes
    under it (asyncpg's "connection was closed in the middle of operation"), as when PgBouncer or PostgreSQL restarts
    or the network cuts between the commit and its reply."""
    import asyncpg

    original = PreludeConnection.execute
    lost = False

    async def execute(self: PreludeConnection, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109
        nonlocal lost
        result: str = await original(self, query, *args, timeout=timeout)
        if query.strip().rstrip(';').upper() == 'COMMIT' and not lost:
            lost = True
            self.terminate()
            raise asyncpg.ConnectionDoesNotExistError('connection was closed in the middle of operation')
        return result

    monkeypatch.setattr(PreludeConnection, 'execute', execute)
    yield


class HeldModel(WrapperModel):
    """A model (the demo model by default) whose requests wait at their start until the test sets `release`.

    A turn is running, holding its claim and its admission place, for as long as the test wants, however fast the
    machine: `arrived` counts the requests that reached the model (`wait_for_arrivals` awaits a number of them).
    """

    def __init__(self, wrapped: Model | None = None) -> None:
        super().__init__(wrapped or demo_model())
        self.release = asyncio.Event()
        self.arrived = 0
        self._arrival = asyncio.Event()

    async def wait_for_arrivals(self, count: int, seconds: float = 30) -> None:
        """Wait until `count` requests have reached the model (and wait there for `release`)."""
        async with asyncio.timeout(seconds):
            while self.arrived < count:
                self._arrival.clear()
                await self._arrival.wait()

    async def _hold(self) -> None:
        self.arrived += 1
        self._arrival.set()
        await self.release.wait()

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        await self._hold()
        return await super().request(*args, **kwargs)

    @asynccontextmanager
    async def request_stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[StreamedResponse]:
        await self._hold()
        async with super().request_stream(*args, **kwargs) as stream:
            yield stream
