"""Chat turns across database faults: a server restart costs only the turns in flight while it was down, and killed
backends never leave a broken connection in the pool. Each scenario runs on a PostgreSQL of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import psutil
import pytest
from pydantic_ai import RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.toolsets import FunctionToolset
from sqlalchemy import event, make_url, text

from agentrt.agents.chat_turn import CANCELLED_START_WAIT_S
from agentrt.agents.errors import DatabaseDisconnectedError, DatabaseUnavailableError
from agentrt.agents.simple_chat import ChatResult, simple_chat, simple_chat_stream
from agentrt.db import engine
from agentrt.db.engine import current_settings, get_engine, pool_status
from agentrt.db.errors import ConfigError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.db.settings import Settings
from agentrt.services.background import drain_supervisor
from agentrt.services.conversations import ConcurrentTurnError
from agentrt.services.ledger import get_request_tracker
from agentrt.tools.dependencies import SessionDependencies
from tests.factories import ledger_rows, past_its_deadlock_check
from tests.pgbouncer import bouncer_for
from tests.private_database import CountingModel, PrivateDatabase

QUESTION = 'Find cardiologists in Seattle'


@pytest.fixture
def private(private_database: PrivateDatabase) -> PrivateDatabase:
    """The run's private server, with the default settings: pool 10 + 10, idle connections pinged after 5 s."""
    return private_database


async def _turns(count: int, model: CountingModel, tag: str) -> list[ChatResult | BaseException]:
    async def one(index: int) -> ChatResult:
        return await simple_chat(QUESTION, session_id=f'{tag}-{index}', account='acme-health', model=model)

    return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)


def _failures(results: list[Any]) -> list[BaseException]:
    return [r for r in results if isinstance(r, BaseException)]


async def _all_connections_back() -> int:
    """Wait up to 30 s for every connection to be back in the pool; the number still checked out (0 when all are).

    One whose operation failed or was cancelled while the server was down is checked in by a shielded close that may
    still be finishing (closing an overflow connection awaits), and a background task (the account's usage roll-up)
    may hold one: a loaded machine is slow to finish them; a leaked connection never comes back.
    """
    for _ in range(600):
        if pool_status().checked_out == 0:
            break
        await asyncio.sleep(0.05)
    return pool_status().checked_out


async def _restart(private: PrivateDatabase) -> None:
    """Restart the server (fast mode: every backend terminated); it is back when this returns."""
    await asyncio.to_thread(private.server.restart)


async def test_a_restart_between_turns_costs_no_turn(private: PrivateDatabase) -> None:
    model = CountingModel()
    async with private.active():
        # The restarts find the pool holding connections used moments ago (no idle ping would test them).
        assert not _failures(await _turns(10, model, 'warm'))
        await _restart(private)
        for index in range(20):
            await simple_chat(QUESTION, session_id=f'after-{index}', account='acme-health', model=model)
        await _restart(private)
        assert not _failures(await _turns(50, model, 'concurrent-after'))
        await private.settle()
        rows = await ledger_rows()
    assert len(rows) == model.requests and all(row['status'] == 'complete' for row in rows)


async def test_a_login_refused_after_the_start_is_a_configuration_error_not_a_raw_driver_error(
    private: PrivateDatabase,
) -> None:
    # The login role made NOLOGIN (or its password rotated) under a running process: each new connection was refused
    # and surfaced as a raw sqlalchemy DBAPIError ("role ... is not permitted to log in"): HTTP 500 internal_error,
    # CLI exit 70 "a bug".
    model = CountingModel()
    async with private.active():
        assert not _failures(await _turns(2, model, 'before'))
        admin = await asyncpg.connect(private.server.url())
        try:
            await admin.execute('ALTER ROLE postgres NOLOGIN')
            await admin.execute(
                'SELECT pg_terminate_backend(pid) FROM pg_stat_activity '
                "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
            # The next checkout logs in again. `Pool.dispose()` counts the pool as empty: a connection out at that
            # moment (the usage roll-up, a background task) came back to a count one too low, and `checked_out` read
            # -1 for the rest of the pool's life, failing the later tests' checks on this runtime (1 run in 18).
            assert await _all_connections_back() == 0
            get_engine().sync_engine.pool.dispose()
            with pytest.raises(ConfigError) as refused:
                async with get_db_session(account=Unscoped.ADMIN) as session:
                    await session.execute(text('SELECT 1'))
            message = str(refused.value)
            assert message.startswith(f'PostgreSQL at 127.0.0.1:{private.server.port}/postgres refused the login: ')
            assert 'role "postgres" is not permitted to log in' in message and 'DATABASE_URL' in message, message
            with pytest.raises(ConfigError):
                await simple_chat(QUESTION, session_id='refused', account='acme-health', model=model)
        finally:
            await admin.execute('ALTER ROLE postgres LOGIN')
            await admin.close()
        assert not _failures(await _turns(2, model, 'after'))
        await private.settle()
        rows = await ledger_rows()
    assert len(rows) == model.requests and all(row['status'] == 'complete' for row in rows)


async def test_a_restart_during_turns_costs_only_the_turns_in_flight(
    private: PrivateDatabase, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = CountingModel()
    async with private.active():
        # The 100 turns start at once; the event loop's admission runs a few at a time and the last one waits for the
        # CPU of the 99 before it, about 5 s of it for demo turns: a process with a sixth of a core (load 13 on 2) has
        # it refused with RuntimeBusyError after AGENTRT_TURN_QUEUE_SECONDS (30 s), and so are the 10 turns queued
        # behind them. That is admission doing its job under load, not the restart's cost this test is about: here a
        # turn may wait as long as the test may run (pytest-timeout's limit), so only the restart can fail a turn.
        monkeypatch.setattr(current_settings(), 'turn_queue_seconds', float(request.config.getini('timeout')))
        in_flight = asyncio.ensure_future(_turns(100, model, 'in-flight'))
        await asyncio.sleep(0.3)
        await _restart(private)
        after = await _turns(10, model, 'after')  # started once the server was back
        results = await in_flight
        # The message of a turn that failed while the server was down can be sent again at once: its
        # conversation's claim was released once the server was back, not left to expire.
        failed = [index for index, result in enumerate(results) if isinstance(result, BaseException)][:10]
        await private.settle()
        again = [
            await simple_chat(QUESTION, session_id=f'in-flight-{index}', account='acme-health', model=model)
            for index in failed
        ]
        await private.settle()
        rows = await ledger_rows()
        # Every connection comes back to the pool.
        assert await _all_connections_back() == 0
    assert not _failures(after)
    assert len(again) == len(failed)
    failures = _failures(results)
    assert all(isinstance(error, DatabaseUnavailableError) for error in failures), failures
    # Billing stays exact: one row per model request, whether its turn failed or not.
    assert len(rows) == model.requests
    assert len({row['id'] for row in rows}) == len(rows)


async def test_a_restart_behind_pgbouncer_costs_only_the_turns_in_flight(private: PrivateDatabase) -> None:
    """The runtime through PgBouncer (transaction mode, README's `server_login_retry = 1`), in the pooler mode. A
    restart of PostgreSQL behind it ends PgBouncer's connections to the server, not the runtime's to PgBouncer: the
    operations in flight are lost ("server conn crashed?") and new ones refused while PgBouncer's logins fail, each
    an outage error, and nothing is left broken in either pool."""
    bouncer = bouncer_for(make_url(private.server.url()), pool_size=8)
    bouncer.write_ini([*bouncer.ini_lines(), 'server_login_retry = 1'])
    bouncer.start()
    model = CountingModel()
    try:
        async with private.active():
            saved, engine._runtime = engine._runtime, None
            try:
                # sslmode=disable, as the private server's own runtime: with libpq's default (prefer) asyncpg asks
                # for TLS first, and a connect cancelled in that exchange (the restart) leaves a future of asyncpg's
                # whose exception nobody retrieves ("unexpected connection_lost() call"), which fails the run.
                url = f'{bouncer.url()}?sslmode=disable'
                await engine.init_database(Settings(database_url=url, pooler='pgbouncer'), migrate=False)
                assert not _failures(await _turns(10, model, 'warm'))
                await _restart(private)
                for index in range(20):  # between turns: PgBouncer connects anew, no turn is refused
                    await simple_chat(QUESTION, session_id=f'after-{index}', account='acme-health', model=model)
                in_flight = asyncio.ensure_future(_turns(50, model, 'in-flight'))
                await asyncio.sleep(0.3)
                await _restart(private)
                results = await in_flight
                # PgBouncer refuses clients for server_login_retry (1 s) after a login failed while the server was
                # down; past it, turns and the failed turns sent again (their claims released) all go through.
                await asyncio.sleep(1.5)
                after = await _turns(10, model, 'after-restart')
                failed = [index for index, result in enumerate(results) if isinstance(result, BaseException)][:10]
                again = [
                    await simple_chat(QUESTION, session_id=f'in-flight-{index}', account='acme-health', model=model)
                    for index in failed
                ]
                await private.settle()
                rows = await ledger_rows()
                assert await _all_connections_back() == 0
            finally:
                await engine.close_database()
                engine._runtime = saved
    finally:
        bouncer.stop()
    assert not _failures(after)
    assert len(again) == len(failed)
    failures = _failures(results)
    assert all(isinstance(error, DatabaseUnavailableError) for error in failures), failures
    assert len(rows) == model.requests  # one ledger row per model request, whether its turn failed or not
    assert len({row['id'] for row in rows}) == len(rows)


@pytest.mark.parametrize(
    ('in_url', 'setting'),
    [(False, 'DB_CONNECT_TIMEOUT'), (True, 'connect_timeout of DATABASE_URL')],
    ids=['env', 'url'],
)
async def test_a_server_that_does_not_answer_is_a_connect_timeout_naming_its_setting(
    private: PrivateDatabase, in_url: bool, setting: str
) -> None:
    # A hung postmaster (SIGSTOP here; a stalled VM or a saturated host alike) accepts the TCP connection and never
    # answers: the error read "cannot connect to PostgreSQL at ...: TimeoutError", naming neither the wait nor the
    # setting, where the start's own check says "did not answer within 10s".
    url = private.server.url(sslmode='disable', **({'connect_timeout': '1'} if in_url else {}))
    saved, engine._runtime = engine._runtime, None
    try:
        await engine.init_database(Settings(database_url=url, connect_timeout=10 if in_url else 1), migrate=False)
        await get_engine().dispose()  # the next session connects anew
        postmaster = int((private.server.data / 'postmaster.pid').read_text().split()[0])
        os.kill(postmaster, signal.SIGSTOP)
        try:
            with pytest.raises(DatabaseUnavailableError) as raised:
                async with get_db_session(account=Unscoped.ADMIN) as session:
                    await session.execute(text('SELECT 1'))
        finally:
            os.kill(postmaster, signal.SIGCONT)
        await engine.close_database()
    finally:
        engine._runtime = saved
    message = str(raised.value)
    assert message.startswith('cannot connect to PostgreSQL at ') and 'TimeoutError' not in message, message
    assert f'no answer within 1s ({setting})' in message, message


async def test_killed_backends_never_leave_a_broken_connection_in_the_pool(private: PrivateDatabase) -> None:
    model = CountingModel()
    killer = await asyncpg.connect(private.server.url(), server_settings={'application_name': 'killer'})
    kills = 0
    broken: list[Any] = []  # every connection that raised a disconnect (strong references: ids stay unique)
    handed_out_broken = 0

    def on_error(context: Any) -> None:
        if context.is_disconnect and context.connection is not None:
            broken.append(context.connection.connection.dbapi_connection)

    def on_invalidate(dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
        # A connection discarded without SQLAlchemy's statement machinery (`driver_transaction`: the turn's start and
        # save, the ledger writer) raises no `handle_error`; the pool sees it invalidated.
        broken.append(dbapi_connection)

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        nonlocal handed_out_broken
        handed_out_broken += any(dbapi_connection is seen for seen in broken)

    async def kill_backends(stop: asyncio.Event) -> None:
        # Backends in use (in a statement or a transaction): each kill hits the turn using that connection.
        nonlocal kills
        while not stop.is_set():
            kills += await killer.fetchval(
                'SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity '
                "WHERE application_name = 'agentrt' AND state <> 'idle'"
            )
            await asyncio.sleep(0.02)

    async with private.active():
        sync_engine = get_engine().sync_engine
        event.listen(sync_engine, 'handle_error', on_error)
        event.listen(sync_engine, 'invalidate', on_invalidate)
        event.listen(sync_engine, 'checkout', on_checkout)
        try:
            stop = asyncio.Event()
            killing = asyncio.ensure_future(kill_backends(stop))
            results = await _turns(40, model, 'killed')
            stop.set()
            await killing
            await killer.close()
            after = await _turns(10, model, 'after-kills')
            await private.settle()
        finally:
            event.remove(sync_engine, 'handle_error', on_error)
            event.remove(sync_engine, 'invalidate', on_invalidate)
            event.remove(sync_engine, 'checkout', on_checkout)
        still_out = await _all_connections_back()
        status = pool_status()
        rows = await ledger_rows()
    assert kills > 0 and broken
    failures = _failures(results)
    # Each failed turn failed with the documented error, on a kill of the connection it was using: the driver's
    # signs of a terminated backend, asyncpg's InternalClientError included (a kill between two statements of a
    # transaction), and no connection that had failed was ever handed out again.
    assert all(isinstance(error, DatabaseDisconnectedError) for error in failures), failures
    assert all(_killed(error) for error in failures), [_primary(error) for error in failures]
    assert handed_out_broken == 0
    assert not _failures(after)
    assert still_out == 0 and status.size == 10
    assert len(rows) == model.requests


_KILL_SIGNS = {
    'AdminShutdownError',
    'ConnectionDoesNotExistError',
    'InternalClientError',
    'ConnectionResetError',
    'BrokenPipeError',
}


def _primary(error: BaseException) -> list[str]:
    """The error and what it was raised from (not what was being handled meanwhile)."""
    names: list[str] = []
    current: BaseException | None = error
    while current is not None and len(names) < 10:
        names.append(type(current).__name__)
        current = current.__cause__ or getattr(current, 'orig', None)
    return names


def _killed(error: BaseException) -> bool:
    return bool(_KILL_SIGNS & set(_primary(error)))


_WAITING_ON_DIRECTORY = text(
    'SELECT count(pg_cancel_backend(pid)) FROM pg_locks '
    "WHERE NOT granted AND relation = 'directory_entries'::regclass "
    'AND database = (SELECT oid FROM pg_database WHERE datname = current_database())'
)


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_tool_query_given_up_on_is_a_database_error_and_the_conversation_is_free(
    demo_data: None, streamed: bool
) -> None:
    # The directory tools' queries wait on a lock another session holds; PostgreSQL gives up on them (an operator's
    # cancel here, as a lock or statement timeout does): the turn fails with the documented error, not a raw driver
    # error, nothing is saved, its model request is billed once and the conversation can take the next turn at once.

    async def turn() -> str:
        if not streamed:
            return (await simple_chat(QUESTION, session_id='locked', account='acme-health')).output
        async with simple_chat_stream(QUESTION, session_id='locked', account='acme-health') as stream:
            return ''.join([delta async for delta in stream])

    async with get_db_session(account=Unscoped.OWNER) as holder:
        await holder.execute(text('LOCK TABLE directory_entries IN ACCESS EXCLUSIVE MODE'))
        running = asyncio.ensure_future(turn())
        cancelled = 0
        async with get_db_session(account=Unscoped.OWNER) as operator:
            while not running.done():
                cancelled += (await operator.execute(_WAITING_ON_DIRECTORY)).scalar_one()
                await asyncio.sleep(0.01)
        with pytest.raises(DatabaseUnavailableError, match='cancelled a statement') as raised:
            await running
    assert cancelled and 'SELECT' not in str(raised.value)
    await get_request_tracker().flush()
    assert [row['status'] for row in await ledger_rows(chat_session_id='locked')] == ['complete']  # the one request
    async with get_db_session(account=Unscoped.ADMIN) as session:
        assert (await session.execute(text('SELECT count(*) FROM conversations'))).scalar_one() == 0
    assert (await turn()).startswith('I found ')  # the claim was released: the message can be sent again


_RENAME = text("UPDATE accounts SET name = name || ' *' WHERE slug = :slug")


class _Deadlock:
    """A tool that updates two accounts' rows in one transaction while the test updates them in the other order (when
    `contended`): the test's session waits first, past its deadlock check; the tool's closes the cycle, so PostgreSQL
    ends the tool's transaction."""

    def __init__(self, *, contended: bool = True) -> None:
        self.contended = contended
        self.tool_has_first = asyncio.Event()
        self.toolset = FunctionToolset[SessionDependencies]()
        self.toolset.tool(self.rename_both)

    async def rename_both(self, ctx: RunContext[SessionDependencies]) -> str:
        """Mark both accounts."""
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await session.execute(_RENAME, {'slug': 'acme-health'})
            self.tool_has_first.set()
            if self.contended:
                await past_its_deadlock_check('UPDATE accounts')  # the other session, for this row
            await session.execute(_RENAME, {'slug': 'green-grocer'})  # closes the cycle: PostgreSQL ends this side
        return 'renamed'

    async def other_session(self) -> None:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await self.tool_has_first.wait()
            await session.execute(_RENAME, {'slug': 'green-grocer'})
            await session.execute(_RENAME, {'slug': 'acme-health'})  # waits for the tool's transaction


def _call_the_tool(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    if any(isinstance(part, ToolReturnPart) for message in messages for part in message.parts):
        return ModelResponse(parts=[TextPart('renamed')])
    return ModelResponse(parts=[ToolCallPart('rename_both', {})])


async def test_a_tool_query_ended_by_a_deadlock_is_a_database_error_saying_a_retry_helps(demo_data: None) -> None:
    # A tool's transaction and another session update the same rows in opposite orders: PostgreSQL breaks the
    # deadlock by ending the tool's (SQLSTATE 40P01). The turn fails with the documented error (CLI exit 3, HTTP 503),
    # not a raw driver error (exit 70, 500); nothing is saved and the message can be sent again at once.
    deadlock = _Deadlock()
    other = asyncio.ensure_future(deadlock.other_session())
    with pytest.raises(DatabaseUnavailableError, match='deadlock') as raised:
        await simple_chat(
            'mark them',
            session_id='deadlocked',
            account='acme-health',
            model=FunctionModel(_call_the_tool),
            toolsets=[deadlock.toolset],
        )
    await other
    message = str(raised.value)
    assert 'retrying it normally succeeds' in message and 'UPDATE' not in message and '\n' not in message
    async with get_db_session(account=Unscoped.ADMIN) as session:
        assert (await session.execute(text('SELECT count(*) FROM conversations'))).scalar_one() == 0
        marked = await session.execute(text("SELECT count(*) FROM accounts WHERE name LIKE '% *'"))
        assert marked.scalar_one() == 2  # the other session's marks only: the tool's were rolled back
    again = _Deadlock(contended=False)  # nobody else holds the rows now: sent again, the same turn goes through
    answer = await simple_chat(
        'mark them',
        session_id='deadlocked',
        account='acme-health',
        model=FunctionModel(_call_the_tool),
        toolsets=[again.toolset],
    )
    assert answer.output == 'renamed'
    await get_request_tracker().flush()  # its ledger rows written in this test's database, not left to a later one


def _stopping_the_server(private: PrivateDatabase) -> FunctionModel:
    """A model that stops the server (cleanly: a turn's claim, committed, survives it) and then answers."""

    async def stop_the_server(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await asyncio.to_thread(private.server.stop, 'fast')
        return ModelResponse(parts=[TextPart('too late to save')])

    return FunctionModel(stop_the_server)


async def test_shutting_down_with_the_database_down_does_not_wait_to_release_a_claim(
    private: PrivateDatabase,
) -> None:
    # A turn that failed because PostgreSQL went away leaves its claim to be released once the server is back. A
    # process ending meanwhile (a one-shot `agentrt chat`) must not spend its drain budget waiting for that: the
    # claim's lease frees the conversation anyway, and the refusal says for how long.
    model = _stopping_the_server(private)
    async with private.active():
        try:
            with pytest.raises(DatabaseUnavailableError):
                await simple_chat(QUESTION, session_id='held', account='acme-health', model=model)
            started = time.monotonic()
            report = await drain_supervisor(timeout=30)
            waited = time.monotonic() - started
        finally:
            await asyncio.to_thread(private.server.start)
        assert report is not None and report.cancelled == 0 and report.abandoned == 0, report  # it let go by itself
        # Well under the drain's budget (a loaded machine takes seconds to fail a connection; 3 s was tight).
        assert waited < 10, f'the drain waited {waited:.1f}s for a claim the database could not release'
        with pytest.raises(ConcurrentTurnError) as refused:  # still held, and the refusal says until when
            await simple_chat(QUESTION, session_id='held', account='acme-health')
        assert refused.value.expires_in_s is not None and 0 < refused.value.expires_in_s <= 60
        # Its model request was spooled while the server was down: replayed here, into this database (the spool is
        # the process's, and a later write would replay it into whichever database is then the process's).
        await get_request_tracker().replay_spool()
        assert [row['status'] for row in await ledger_rows(chat_session_id='held')] == ['complete']


async def test_the_next_turn_after_an_outage_is_not_refused_by_the_claim_the_failed_turn_could_not_release(
    private: PrivateDatabase,
) -> None:
    # A long conversation whose turn failed because PostgreSQL went away: the turn's claim, committed, outlived it,
    # and its release is retried in the background with a backoff of up to 2 s. The user's next message, sent as
    # soon as the server was back, was refused ("another turn holds conversation 'long' for up to 58 s more") though
    # no turn was running: the process's own abandoned claim is taken over instead.
    async with private.active():
        model = CountingModel()
        for _ in range(3):
            await simple_chat(QUESTION, session_id='long', account='acme-health', model=model)
        try:
            with pytest.raises(DatabaseUnavailableError):
                await simple_chat(
                    QUESTION, session_id='long', account='acme-health', model=_stopping_the_server(private)
                )
            await asyncio.sleep(1.6)  # the release's backoff grows past a server's start (0.1 s, then 0.2, 0.4...)
        finally:
            await asyncio.to_thread(private.server.start)
        after = await simple_chat('and in Boston?', session_id='long', account='acme-health', model=model)
        assert after.conversation_usage.requests == 3 * 4, 'the failed turn saved nothing, the next one was saved'
        await private.settle()
        await get_request_tracker().replay_spool()  # the failed turn's request, spooled while the server was down
        rows = await ledger_rows(chat_session_id='long')
        held = await _scalar('SELECT count(*) FROM conversation_turns')
    assert len(rows) == model.requests + 1 and len({row['id'] for row in rows}) == len(rows)
    assert held == 0


@contextmanager
def _frozen(private: PrivateDatabase) -> Iterator[None]:
    """Freeze the private server (its postmaster and every backend: a stalled VM, a saturated host) for the block."""
    postmaster = psutil.Process(int((private.server.data / 'postmaster.pid').read_text().split()[0]))
    frozen = [postmaster, *postmaster.children()]
    for process in frozen:
        process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for process in frozen:
            process.send_signal(signal.SIGCONT)


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_turn_cancelled_during_its_start_on_a_frozen_server_ends_within_seconds_and_frees_the_conversation(
    private: PrivateDatabase, streamed: bool
) -> None:
    # The turn's start (tenant, claim, history) ran shielded to its end, so that a claim it committed as the caller
    # was cancelled is given back: on a server that does not answer, a caller's 5 s timeout ended after 35 s (the
    # statement's wait), where a turn cancelled later ends within about 3 s (QA). Now the start runs on without its
    # caller, and the claim it took, or may have, is released once it ends: the next turn of the conversation runs.
    async def turn(message: str, model: CountingModel) -> ChatResult:
        if not streamed:
            return await simple_chat(message, session_id='frozen', account='acme-health', model=model)
        async with simple_chat_stream(message, session_id='frozen', account='acme-health', model=model) as stream:
            async for _ in stream:
                pass
        assert stream.result is not None
        return stream.result

    async with private.active():
        model = CountingModel()
        first = await turn(QUESTION, model)  # the pool's connections are made, and used within their ping interval
        await private.settle()
        with _frozen(private):
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1):
                    await turn('and in Boston?', model)
            waited = time.monotonic() - started
        # Not refused as concurrent by the cancelled start's claim, whether that start committed it before this turn
        # claimed, as it claimed, or not yet (then that start is refused): its claim is this process's to take over
        # from the moment its turn left it (test_turn_race.py orders each case with gates).
        after = await turn('and in Denver?', model)
        for _ in range(400):  # the left start's claim is released in the background once its server answers
            if await _scalar('SELECT count(*) FROM conversation_turns') == 0:
                break
            await asyncio.sleep(0.05)
        held = await _scalar('SELECT count(*) FROM conversation_turns')
    # 1 s of timeout, then at most CANCELLED_START_WAIT_S for the start (and a loaded machine's slack).
    assert waited < 1 + CANCELLED_START_WAIT_S + 2, f'the cancelled turn ended after {waited:.1f}s'
    assert after.conversation_usage.requests == 2 * first.conversation_usage.requests, 'nothing of the cancelled turn'
    assert held == 0


async def _scalar(sql: str) -> Any:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(text(sql))).scalar_one()
