"""`TaskSupervisor`: tasks get ids and open their own sessions; failures, shutdown, bursts and limits."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from logfire.testing import CaptureLogfire
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.engine import pool_status
from agentrt.db.models import Account
from agentrt.db.session import Unscoped, get_db_session, get_side_session
from agentrt.services import background
from agentrt.services.background import (
    BackgroundQueueFull,
    SupervisorClosed,
    TaskSupervisor,
    drain_supervisor,
    get_supervisor,
)
from tests.conftest import TEST_MAX_OVERFLOW, TEST_POOL_SIZE
from tests.programs import untraced_env

LOGGER = 'agentrt.background'


@pytest_asyncio.fixture(autouse=True)
async def _isolated(capfire: CaptureLogfire) -> AsyncIterator[None]:
    """Configure logfire locally (capfire exports nowhere) and never leave a process supervisor behind."""
    yield
    await drain_supervisor(5)


async def _create_account(slug: str = 'acme') -> int:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        account = Account(slug=slug, name='Before')
        session.add(account)
        await session.flush()
        return account.id


async def _account_name(account_id: int) -> str | None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(select(Account.name).where(Account.id == account_id))).scalar_one_or_none()


async def rename_account(account_id: int, new_name: str) -> None:
    """The right pattern: the task gets an id and opens its own session."""
    async with get_side_session(account=Unscoped.ADMIN) as session:
        await session.execute(update(Account).where(Account.id == account_id).values(name=new_name))


async def sleep_in_database(seconds: float) -> None:
    async with get_side_session(account=Unscoped.ADMIN, statement_timeout_ms=60_000) as session:
        await session.execute(text('SELECT pg_sleep(:s)'), {'s': seconds})


async def test_task_spawned_in_a_handler_completes_with_its_own_session() -> None:
    account_id = await _create_account()
    supervisor = TaskSupervisor()

    async def handler() -> None:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            account = (await session.execute(select(Account).where(Account.id == account_id))).scalar_one()
            supervisor.spawn(rename_account, account.id, 'After', name='rename')
            # The task starts while this session is still busy, and goes on after it has closed.
            await session.execute(text('SELECT pg_sleep(0.05)'))

    await handler()
    await supervisor.join()
    assert await _account_name(account_id) == 'After'
    assert supervisor.stats().completed == 1
    assert pool_status().checked_out == 0


async def test_legacy_pattern_of_sharing_the_handlers_session_fails() -> None:
    account_id = await _create_account()

    async def legacy_rename(session: AsyncSession, account_id: int) -> None:
        await session.execute(update(Account).where(Account.id == account_id).values(name='After'))

    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(select(Account).where(Account.id == account_id))
        task = asyncio.create_task(legacy_rename(session, account_id))
    # The task ran while the handler's session was committing and closing.
    with pytest.raises(InvalidRequestError, match=r'no further SQL|concurrent operations|closed'):
        await task
    assert await _account_name(account_id) == 'Before'
    assert pool_status().checked_out == 0


async def test_legacy_pattern_run_later_loses_its_work_and_holds_a_connection() -> None:
    account_id = await _create_account()
    handler_done = asyncio.Event()

    async def late_legacy_rename(session: AsyncSession, account_id: int) -> None:
        # Once the handler's session has closed (a fixed 50 ms wait raced the commit and close on a loaded machine).
        await handler_done.wait()
        await session.execute(update(Account).where(Account.id == account_id).values(name='After'))

    async with get_db_session(account=Unscoped.ADMIN) as session:
        task = asyncio.create_task(late_legacy_rename(session, account_id))
    handler_done.set()
    await task
    # The closed session quietly began a new transaction that nobody commits, on a connection nobody returns.
    assert pool_status().checked_out == 1
    assert await _account_name(account_id) == 'Before'
    await session.close()
    assert pool_status().checked_out == 0


async def test_spawn_refuses_sessions_and_orm_objects() -> None:
    supervisor = TaskSupervisor()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        with pytest.raises(TypeError, match='pass ids'):
            supervisor.spawn(rename_account, session, 'x')
        with pytest.raises(TypeError, match='pass ids'):
            supervisor.spawn(rename_account, account_id=Account(slug='a', name='A'), new_name='x')
    assert supervisor.stats().spawned == 0


async def test_failing_task_is_logged_with_duration_and_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    ids = [await _create_account(f'a{i}') for i in range(3)]
    supervisor = TaskSupervisor()

    async def explode(account_id: int) -> None:
        async with get_side_session(account=Unscoped.ADMIN) as session:
            await session.execute(text('SELECT 1'))
        raise RuntimeError(f'boom for {account_id}')

    supervisor.spawn(explode, ids[0], name='explode')
    for account_id in ids:
        supervisor.spawn(rename_account, account_id, 'After', name='rename')
    await supervisor.join()
    gc.collect()

    assert [await _account_name(i) for i in ids] == ['After'] * 3
    assert supervisor.stats().failed == 1 and supervisor.stats().completed == 3
    [failure] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failure.name == LOGGER and 'background task explode failed after' in failure.getMessage()
    # The traceback is on the record as redacted text (`exc_text`, agentrt.services.log_redaction), not `exc_info`.
    assert (
        'Traceback' in (failure.exc_text or '')
        and 'RuntimeError: boom for' in caplog.text
        and 'Traceback' in caplog.text
    )
    completions = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len([m for m in completions if m.startswith('background task rename completed in')]) == 3
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG and 'started' in r.getMessage()]) == 4
    # Nobody awaited the failing task, yet asyncio has nothing to complain about.
    assert not [r for r in caplog.records if r.name == 'asyncio']
    assert pool_status().checked_out == 0


# A user's own program, with no logging set up: Python's last-resort handler prints what the supervisor logs at
# WARNING and above. The outage is as a session reports one (a DatabaseUnavailableError from the driver's error).
USER_PROGRAM = """
import asyncio
import agentrt.agents.simple_chat  # what a user's program imports (it puts the log redaction on the runtime's loggers)
from agentrt.db.errors import DatabaseUnavailableError
from agentrt.services.background import get_supervisor

async def rollup():
    try:
        raise FileNotFoundError(2, 'No such file or directory')
    except FileNotFoundError as exc:
        raise DatabaseUnavailableError(
            'cannot connect to PostgreSQL: no server is listening on its Unix socket'
        ) from exc

async def broken():
    raise RuntimeError('a bug')

async def main():
    get_supervisor().spawn(rollup, name='usage rollup', attributes={'agentrt.account_id': 1})
    get_supervisor().spawn(broken, name='broken')
    await get_supervisor().join()

asyncio.run(main())
"""


def test_a_task_an_outage_stops_is_one_warning_line_in_a_users_own_program(tmp_path: Path) -> None:
    # Each usage roll-up during an outage printed "background task usage rollup (...) failed after 0.001s" and ~90
    # lines of chained traceback in a user's own program: only the CLI and `agentrt serve` install the filter that
    # makes it one line (QA). Another failure keeps its traceback.
    done = subprocess.run(
        [sys.executable, '-c', USER_PROGRAM],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=untraced_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    outage = [line for line in done.stderr.splitlines() if 'usage rollup' in line or 'Unix socket' in line]
    assert outage == [
        'background task usage rollup (account 1) not done: database unavailable: cannot connect to PostgreSQL: '
        'no server is listening on its Unix socket (a later turn does it again)'
    ], done.stderr
    assert 'FileNotFoundError' not in done.stderr
    assert 'background task broken failed after' in done.stderr and done.stderr.count('Traceback') == 1


async def test_awaiting_a_failed_task_reraises_its_error() -> None:
    supervisor = TaskSupervisor()

    async def explode() -> None:
        raise ValueError('bad')

    with pytest.raises(ValueError, match='bad'):
        await supervisor.spawn(explode)


async def test_shutdown_lets_running_tasks_finish_within_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = TaskSupervisor(max_running=2)
    for _ in range(4):
        supervisor.spawn(sleep_in_database, 0.2)
    with caplog.at_level(logging.INFO, logger='agentrt.background'):
        report = await supervisor.shutdown(timeout=10)
    assert (report.completed, report.failed, report.cancelled, report.abandoned) == (4, 0, 0, 0)
    # One readable line, not "background background shut down: ShutdownReport(completed=4, ...)".
    assert re.fullmatch(
        r'tasks of background shut down: 4 completed, 0 failed, 0 cancelled, 0 rejected, 0 abandoned in \d+\.\d\d s',
        caplog.records[-1].getMessage(),
    ), caplog.records[-1].getMessage()
    assert report.seconds < 5
    assert pool_status().checked_out == 0


async def test_shutdown_cancels_what_is_still_running_and_returns_every_connection() -> None:
    supervisor = TaskSupervisor(max_running=3)
    quick = [supervisor.spawn(sleep_in_database, 0.05, name='quick') for _ in range(2)]
    stuck = [supervisor.spawn(sleep_in_database, 60, name='stuck') for _ in range(4)]
    await asyncio.wait(quick)
    await _wait_for_checked_out(3)
    assert supervisor.stats().running == 3 and supervisor.stats().queued == 1

    started = time.monotonic()
    report = await supervisor.shutdown(timeout=0.5)
    elapsed = time.monotonic() - started

    assert (report.completed, report.failed, report.cancelled, report.abandoned) == (2, 0, 4, 0)
    assert 0.5 <= elapsed < 10  # not the stuck tasks' 60 s; cancelling their statements may take seconds under load
    assert all(task.cancelled() for task in stuck)
    assert pool_status().checked_out == 0
    with pytest.raises(SupervisorClosed):
        supervisor.spawn(sleep_in_database, 0)
    assert supervisor.stats().rejected == 1


async def test_a_thousand_tasks_at_once_share_the_small_pool() -> None:
    limit = TEST_POOL_SIZE + TEST_MAX_OVERFLOW
    supervisor = TaskSupervisor(max_running=limit)
    peak = 0

    async def insert_account(i: int) -> None:
        nonlocal peak
        peak = max(peak, supervisor.stats().running)
        async with get_side_session(account=Unscoped.ADMIN) as session:
            session.add(Account(slug=f'acct-{i}', name=f'Account {i}'))

    tasks = [supervisor.spawn(insert_account, i) for i in range(1000)]
    await supervisor.join()

    stats = supervisor.stats()
    assert (stats.completed, stats.failed, stats.running, stats.queued) == (1000, 0, 0, 0)
    assert all(task.exception() is None for task in tasks)
    assert peak <= limit
    async with get_db_session(account=Unscoped.ADMIN) as session:
        assert (await session.execute(select(func.count()).select_from(Account))).scalar_one() == 1000
    assert pool_status().checked_out == 0


async def test_full_backlog_rejects_with_a_logged_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    supervisor = TaskSupervisor(max_running=1, max_queued=2)
    gate = asyncio.Event()
    running = asyncio.Event()

    async def blocker() -> None:
        running.set()
        await gate.wait()

    async def noop() -> None:
        return None

    supervisor.spawn(blocker)
    await asyncio.wait_for(running.wait(), 5)
    supervisor.spawn(noop)
    supervisor.spawn(noop)
    assert supervisor.stats().queued == 2
    with pytest.raises(BackgroundQueueFull, match='2 waiting'):
        supervisor.spawn(noop, name='one-too-many')
    assert 'background task one-too-many rejected: 2 tasks already queued' in caplog.text

    gate.set()
    await supervisor.join()
    stats = supervisor.stats()
    assert (stats.spawned, stats.completed, stats.rejected, stats.running, stats.queued) == (3, 3, 1, 0, 0)


async def test_counters_track_every_state() -> None:
    supervisor = TaskSupervisor(max_running=1)
    gate = asyncio.Event()

    async def wait_for_gate() -> None:
        await gate.wait()

    async def explode() -> None:
        raise RuntimeError('boom')

    supervisor.spawn(wait_for_gate)
    supervisor.spawn(explode)
    await asyncio.sleep(0)
    assert supervisor.stats() == supervisor.stats().__class__(
        spawned=2, running=1, queued=1, completed=0, failed=0, cancelled=0, rejected=0
    )
    gate.set()
    await supervisor.join()
    stats = supervisor.stats()
    assert (stats.spawned, stats.running, stats.queued, stats.completed, stats.failed) == (2, 0, 0, 1, 1)


async def test_each_task_gets_a_span_with_its_name_and_duration(capfire: CaptureLogfire) -> None:
    supervisor = TaskSupervisor()
    await supervisor.spawn(asyncio.sleep, 0.05, name='nap')
    [span] = [s for s in capfire.exporter.exported_spans_as_dict() if s['name'] == 'background task nap']
    assert span['attributes']['task_name'] == 'nap'
    assert span['attributes']['duration_seconds'] >= 0.05
    assert span['end_time'] > span['start_time']


async def test_a_failed_tasks_span_records_its_error_redacted(capfire: CaptureLogfire) -> None:
    # OpenTelemetry's own recording (the span's defaults) wrote the error's message and whole traceback raw: a
    # driver's error quotes the row values of a statement, a provider's error the key it was sent.
    secret = 'sk-proj-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7'

    async def fail() -> None:
        try:
            raise ValueError(f'upstream said: invalid key {secret}')
        except ValueError as exc:
            raise RuntimeError(f'summary failed, token={secret}') from exc

    with pytest.raises(RuntimeError):
        await TaskSupervisor().spawn(fail, name='leaky')
    [span] = [
        s
        for s in capfire.exporter.exported_spans
        if s.name == 'background task leaky' and (s.attributes or {}).get('logfire.span_type') == 'span'
    ]
    assert span.status.status_code.name == 'ERROR' and '[REDACTED]' in (span.status.description or '')
    [event] = [e for e in span.events if e.name == 'exception']
    assert event.attributes is not None and 'ValueError' in str(event.attributes['exception.stacktrace'])
    assert 'aB3dE5fG7hJ9' not in repr((span.status, [e.attributes for e in span.events]))


async def test_a_failing_span_never_fails_the_task(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_span(*args: object, **kwargs: object) -> None:
        raise RuntimeError('no tracer')

    monkeypatch.setattr(background._tracer, 'start_as_current_span', broken_span)
    assert await TaskSupervisor().spawn(asyncio.sleep, 0, 'done') == 'done'


async def test_one_supervisor_per_loop_until_drained() -> None:
    supervisor = get_supervisor()
    assert get_supervisor() is supervisor
    supervisor.spawn(asyncio.sleep, 0.01)

    def other_loop() -> bool:
        async def main() -> bool:
            other = get_supervisor()
            await drain_supervisor()
            return other is not supervisor

        return asyncio.run(main())

    assert await asyncio.to_thread(other_loop)
    report = await drain_supervisor(timeout=5)
    assert report is not None and report.completed == 1
    assert await drain_supervisor() is None
    assert get_supervisor() is not supervisor


async def _wait_for_checked_out(count: int) -> None:
    """Poll the pool (it has no event to wait on) until `count` connections are checked out."""
    async with asyncio.timeout(5):
        while pool_status().checked_out != count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_throttled_work_runs_at_once_then_once_at_the_end_of_the_interval() -> None:
    supervisor = TaskSupervisor()
    runs: list[str] = []

    async def work(label: str) -> None:
        runs.append(label)

    first = supervisor.spawn_throttled('key', 0.2, work, 'first')
    assert first is not None
    await first
    for n in range(5):  # within the interval: one run left pending, for the last call's work too
        assert supervisor.spawn_throttled('key', 0.2, work, f'call {n}') is None
    assert supervisor.spawn_throttled('other key', 0.2, work, 'other') is not None
    await supervisor.join()  # does not wait for the pending run
    assert sorted(runs) == ['first', 'other']
    await asyncio.sleep(0.3)
    await supervisor.join()
    assert runs[2:] == ['call 0']  # one run covers the calls that came meanwhile (the work is idempotent)
    await supervisor.shutdown()


async def test_a_pending_throttled_run_starts_when_the_supervisor_shuts_down() -> None:
    supervisor = TaskSupervisor()
    runs: list[int] = []

    async def work(n: int) -> None:
        runs.append(n)

    first = supervisor.spawn_throttled('key', 600, work, 1)
    assert first is not None
    await first  # ended: the pending run is not beside a run of its key under way (that one would be dropped)
    supervisor.spawn_throttled('key', 600, work, 2)
    started = time.monotonic()
    report = await supervisor.shutdown(timeout=5)
    assert runs == [1, 2] and report.completed == 2 and time.monotonic() - started < 10  # not the 600 s
    with pytest.raises(SupervisorClosed):
        supervisor.spawn_throttled('key', 0, work, 3)


async def test_throttled_work_refuses_sessions_like_spawn() -> None:
    supervisor = TaskSupervisor()

    async def work(value: object) -> None:
        pass

    supervisor.spawn_throttled('key', 600, work, 1)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        with pytest.raises(TypeError):
            supervisor.spawn_throttled('key', 600, work, session)
    await supervisor.shutdown()


async def test_work_left_running_when_asyncio_run_ends_is_stopped_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # `asyncio.run(simple_chat(...))` once per turn, without `shutdown_runtime()`: the loop's end cancelled the usage
    # roll-up the turn had spawned, and every run printed "background task ... cancelled after 0.005s".
    started = asyncio.Event()

    async def program() -> None:
        async def work() -> None:
            started.set()
            await asyncio.sleep(60)

        get_supervisor().spawn(work, name='left running')
        while not started.is_set():  # noqa: ASYNC110 - another loop's event: polled
            await asyncio.sleep(0.001)

    caplog.set_level(logging.INFO, logger='agentrt.background')
    await asyncio.to_thread(asyncio.run, program())
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if 'left running' in r.getMessage()]
    assert len(lines) == 1 and lines[0][0] == logging.INFO, lines
    assert 'stopped with its event loop' in lines[0][1] and 'shutdown_runtime()' in lines[0][1]


async def test_a_task_cancelled_while_its_loop_runs_on_is_still_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = TaskSupervisor()
    began = asyncio.Event()

    async def work() -> None:
        began.set()
        await asyncio.sleep(60)

    task = supervisor.spawn(work, name='cut short')
    await began.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and 'cut short' in r.getMessage()
    ]
    assert len(warnings) == 1 and 'cancelled after' in warnings[0]
    await supervisor.shutdown(1)


async def test_a_throttled_run_outlasting_its_interval_is_not_started_again_beside_itself() -> None:
    # A run longer than its interval (a roll-up draining a backlog of millions) was started again by each later call:
    # four roll-ups of one account at once for minutes, filling the supervisor's slots (QA).
    supervisor = TaskSupervisor()
    release = asyncio.Event()
    running = most = runs = 0

    async def work() -> None:
        nonlocal running, most, runs
        running, runs = running + 1, runs + 1
        most = max(most, running)
        await release.wait()
        running -= 1

    assert supervisor.spawn_throttled('key', 0, work) is not None
    for _ in range(5):  # past the interval (0 s), the first still running: one run left for its end
        await asyncio.sleep(0.02)
        assert supervisor.spawn_throttled('key', 0, work) is None
    assert (runs, most) == (1, 1)
    release.set()
    await supervisor.join()
    assert (runs, most) == (2, 1)  # the pending run started when the first ended, and covered the calls meanwhile
    await supervisor.shutdown()


async def test_at_shutdown_a_pending_throttled_run_does_not_start_beside_its_keys_run_under_way() -> None:
    # The pending run started at once beside the run still under way: two roll-ups of one account, both cut off by
    # the shutdown's timeout (QA). The work catches up by itself: the next process's run covers it.
    supervisor = TaskSupervisor()
    release = asyncio.Event()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1
        await release.wait()

    assert supervisor.spawn_throttled('key', 0, work) is not None
    await asyncio.sleep(0.02)
    assert supervisor.spawn_throttled('key', 0, work) is None  # pending for the first run's end
    stopping = asyncio.create_task(supervisor.shutdown(timeout=5))
    await asyncio.sleep(0.1)
    release.set()
    report = await stopping
    assert runs == 1 and report.completed == 1 and report.cancelled == 0
    assert supervisor._keyed == {}  # a run that ended is not kept (nor a failed one's error)
