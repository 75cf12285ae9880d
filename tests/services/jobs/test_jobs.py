"""Durable post-turn jobs (AGENTRT_BACKGROUND=queue) on the test PostgreSQL: queued by id after a turn, coalesced,
run by a worker; a worker killed mid-job (SIGKILL) has its job run again by another, counted once; a turn whose jobs
were never queued is repaired by reconcile."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text

from agentrt.agents.simple_chat import simple_chat
from agentrt.db.engine import current_settings
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services import jobs as jobs_module
from agentrt.services.background import get_supervisor
from agentrt.services.conversations import _turns
from agentrt.services.jobs import close_queue, reconcile_post_turn_work, retry_stalled_jobs, run_worker
from agentrt.services.ledger import get_request_tracker
from tests.agents.cli.helpers import invoke
from tests.factories import ledger_rows, scalar

QUESTION = 'Find cardiologists in Seattle'
_PROCRASTINATE_TABLES = 'procrastinate_events, procrastinate_periodic_defers, procrastinate_jobs, procrastinate_workers'
_ROLLUP_LOCK = 'SELECT pg_advisory_xact_lock(1919904876, 0)'  # services/ledger/_rollups.py: 'roll', exclusive
HEARTBEAT_S, STALLED_S = 0.25, 1.0  # the killed worker's AGENTRT_JOBS_HEARTBEAT_SECONDS and _STALLED_SECONDS


@pytest.fixture
async def queue(demo_data: None, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """The queue mode, an empty queue, the rollup at every turn (AGENTRT_USAGE_ROLLUP_SECONDS=0)."""
    settings = current_settings()
    monkeypatch.setattr(settings, 'background', 'queue')
    monkeypatch.setattr(settings, 'usage_rollup_seconds', 0.0)
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text(f'TRUNCATE {_PROCRASTINATE_TABLES} RESTART IDENTITY CASCADE'))
    yield
    await get_supervisor().join()
    await close_queue()


async def _chat(session_id: str) -> None:
    await simple_chat(QUESTION, session_id=session_id, account='acme-health')
    await get_request_tracker().flush()
    await get_supervisor().join()  # the task that queues the turn's jobs


async def _jobs() -> list[tuple[str, str]]:
    async with get_db_session(account=Unscoped.OWNER) as session:
        rows = await session.execute(text('SELECT task_name, status::text FROM procrastinate_jobs ORDER BY id'))
        return [(str(name), str(status)) for name, status in rows]


async def _rolled_up_requests() -> int:
    return int(await scalar('SELECT coalesce(sum(requests), 0) FROM usage_daily_rollups'))


async def _title(session_id: str) -> Any:
    return await scalar('SELECT title FROM conversations WHERE conversation_id = :c', c=session_id)


def _titles_left_to_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    """The turns' saves cannot make the title and summary (as when a turn's messages do not reach back to the start
    of a long conversation), so the post-turn work is due them."""
    monkeypatch.setattr(_turns, 'summary_source', lambda *args, **kwargs: None)


async def test_a_title_and_summary_stored_by_the_save_queue_no_job(queue: None) -> None:
    await _chat('saved')
    assert await _jobs() == [('agentrt.usage_rollup', 'todo')]
    assert await _title('saved')


async def test_turns_queue_their_jobs_once_and_a_worker_runs_them(queue: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _titles_left_to_the_background(monkeypatch)
    await _chat('queued')
    await _chat('queued')  # no summary due yet (every 5 turns), and the pending rollup covers this turn too
    assert await _jobs() == [('agentrt.conversation_summary', 'todo'), ('agentrt.usage_rollup', 'todo')]
    assert await _title('queued') is None and await _rolled_up_requests() == 0

    await run_worker(concurrency=2, burst=True)

    assert await _title('queued')
    assert await _rolled_up_requests() == len(await ledger_rows()) == 6
    assert await _jobs() == []  # succeeded jobs are deleted


async def test_reconcile_queues_the_work_of_a_turn_saved_by_a_process_that_died_before_queueing(
    queue: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def died(*args: Any, **kwargs: Any) -> None:
        return None  # the turn is saved; the process dies before its jobs are queued

    monkeypatch.setattr(jobs_module, 'defer_post_turn_work', died)
    _titles_left_to_the_background(monkeypatch)
    await _chat('orphan')
    assert await _jobs() == [] and await _title('orphan') is None and await _rolled_up_requests() == 0

    report = await reconcile_post_turn_work(idle_seconds=0)
    assert report.summaries_queued == 1 and report.rollup_buckets >= 1
    assert (await reconcile_post_turn_work(idle_seconds=0)).summaries_queued == 0  # already pending: not twice
    await run_worker(concurrency=2, burst=True)

    assert await _title('orphan')
    assert await _rolled_up_requests() == len(await ledger_rows()) == 3


def _worker(database_url: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        'DATABASE_URL': database_url.replace('postgresql+asyncpg://', 'postgresql://'),
        'AGENTRT_AUTO_MIGRATE': 'false',
        'AGENTRT_JOBS_HEARTBEAT_SECONDS': str(HEARTBEAT_S),
        'AGENTRT_JOBS_STALLED_SECONDS': str(STALLED_S),
    }
    command = [sys.executable, '-m', 'agentrt.agents.cli', 'worker', '--concurrency', '1']
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def _wait_for(predicate: Any, seconds: float, what: str) -> None:
    try:
        async with asyncio.timeout(seconds):
            while not await predicate():  # noqa: ASYNC110 - polling the database is the wait
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f'timed out waiting for {what}') from None


async def test_a_job_whose_worker_is_killed_mid_job_is_run_again_by_another_and_counted_once(
    queue: None, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _titles_left_to_the_background(monkeypatch)
    await _chat('killed')  # queues a summary and a rollup
    # Hold the rollup's lock, so the first worker's rollup is mid-job (waiting inside its transaction) when killed.
    release = asyncio.Event()
    locked = asyncio.Event()

    async def hold_rollup_lock() -> None:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await session.execute(text(_ROLLUP_LOCK))
            locked.set()
            await release.wait()

    holder = asyncio.create_task(hold_rollup_lock())
    await locked.wait()
    first = _worker(database_url)
    try:

        async def rollup_running() -> bool:
            return ('agentrt.usage_rollup', 'doing') in await _jobs()

        await _wait_for(rollup_running, 60, 'the first worker to start the rollup')
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
        if first.stderr is not None:
            first.stderr.close()
    # Stalled once its worker's last heartbeat (at most HEARTBEAT_S before the kill) is STALLED_S old: polled for, not
    # waited out with a fixed sleep.
    async with asyncio.timeout(30):
        while not (retried := await retry_stalled_jobs(seconds_since_heartbeat=STALLED_S)):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    assert retried == 1
    release.set()
    await holder

    # The other worker: `agentrt worker --burst`, in this process (the killed one above is the command's subprocess
    # run); the queue is the process's, so this test's hold on it is given up first.
    await close_queue()
    second = await invoke(
        'worker', '--burst', env={'DATABASE_URL': database_url.replace('postgresql+asyncpg://', 'postgresql://')}
    )
    assert second.exit_code == 0, second.stderr[-2000:]
    assert await _jobs() == []
    assert await _rolled_up_requests() == len(await ledger_rows()) == 3  # each ledger row counted once
    assert await _title('killed')
