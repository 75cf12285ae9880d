"""`agentrt worker` stopped as a deployment stops it (SIGTERM from systemd or Kubernetes, Ctrl-C in a terminal), run
as a process of its own against the test PostgreSQL: it exits 0 with one line, leaves nothing in the queue's tables
that would confuse the next worker, lets a running job finish, and, when the job takes too long or it is asked again,
puts the job back in the queue, where the next worker runs it once."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.jobs import close_queue, retry_stalled_jobs
from tests.agents.cli.helpers import invoke
from tests.factories import ledger_rows, spool_left_by_an_exited_process
from tests.services.jobs.helpers import (
    WorkerProcess,
    chat,
    queue_url,
    queued_jobs,
    rolled_up_requests,
    rollup_lock_held,
    title,
    titles_left_to_the_background,
    wait_for,
)

STOP_S = 15  # a stopped worker exits well within this (start-up excluded), and before the 20 s shutdown time
HEARTBEAT_S, STALLED_S = 0.25, 2.0  # AGENTRT_JOBS_HEARTBEAT_SECONDS and _STALLED_SECONDS of a worker cut short
# (stalled after 8 missed beats: with 1 s, a worker process descheduled 0.75 s on a loaded machine looked stalled)


async def _registered() -> bool:
    return bool(await _count('SELECT count(*) FROM procrastinate_workers'))


async def _count(sql: str) -> int:
    async with get_db_session(account=Unscoped.OWNER) as session:  # the queue's tables are the owner's
        return int((await session.execute(text(sql))).scalar_one())


async def _rollup_running() -> bool:
    return ('agentrt.usage_rollup', 'doing') in await queued_jobs()


async def _assert_nothing_left_behind() -> None:
    """No worker row (the next worker would wait for its heartbeat to go stale), no job marked running (it would
    hold its `lock` and never run again until found stalled), no advisory lock, and the worker's queue connections
    closed (this process's own closed first)."""
    await close_queue()
    assert await _count('SELECT count(*) FROM procrastinate_workers') == 0
    assert await _count("SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'") == 0
    assert not await _count(
        'SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database '
        "WHERE l.locktype = 'advisory' AND d.datname = current_database()"
    )

    async def connections_closed() -> bool:  # a backend ends a moment after its client said goodbye
        return not await _count(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'agentrt-jobs' "
            'AND datname = current_database()'
        )

    await wait_for(connections_closed, 30, "the worker's queue connections to close")


def _assert_one_line(worker: WorkerProcess, signum: int) -> None:
    assert worker.lines[-1] == f'worker stopped by {signal.Signals(signum).name}', worker.stderr
    assert not any(word in worker.stderr for word in ('Traceback', 'error:', 'ERROR')), worker.stderr


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
async def test_an_idle_worker_stopped_exits_0_with_one_line_and_leaves_nothing_behind(
    queue: None, database_url: str, signum: int
) -> None:
    worker = WorkerProcess(database_url, '--concurrency', '1')
    try:
        await wait_for(_registered, 60, 'the worker to register')
        stopped_at = time.monotonic()
        worker.signal(signum)
        assert await worker.exit_code(STOP_S) == 0, worker.stderr
    finally:
        worker.kill()
    assert time.monotonic() - stopped_at < STOP_S
    _assert_one_line(worker, signum)
    await _assert_nothing_left_behind()


async def test_sigterm_while_a_job_runs_lets_it_finish_before_exiting(
    queue: None, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    titles_left_to_the_background(monkeypatch)
    await chat('graceful')  # queues a summary and a rollup
    worker = WorkerProcess(database_url, '--concurrency', '1')
    try:
        async with rollup_lock_held():  # the rollup waits for it, mid-job
            await wait_for(_rollup_running, 60, 'the worker to start the rollup')
            worker.signal(signal.SIGTERM)
            await worker.said('stopping: waiting for 1 running job to finish (at most 20 s')
        # The lock released: the rollup goes on, finishes, and only then does the worker leave.
        assert await worker.exit_code(STOP_S) == 0, worker.stderr
    finally:
        worker.kill()
    _assert_one_line(worker, signal.SIGTERM)
    await _assert_nothing_left_behind()
    assert await queued_jobs() == []  # done, deleted
    assert await rolled_up_requests() == len(await ledger_rows()) == 3
    assert await title('graceful')


@pytest.mark.parametrize('how', ['shutdown time over', 'second signal', 'another one waiting'])
async def test_a_job_still_running_when_the_worker_must_go_is_put_back_and_run_once_by_the_next(
    queue: None, database_url: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    titles_left_to_the_background(monkeypatch)
    await chat('cut')
    shutdown_s = '20' if how == 'second signal' else '0.5'
    env = {
        'AGENTRT_JOBS_SHUTDOWN_SECONDS': shutdown_s,
        'AGENTRT_JOBS_HEARTBEAT_SECONDS': str(HEARTBEAT_S),
        'AGENTRT_JOBS_STALLED_SECONDS': str(STALLED_S),
    }
    worker = WorkerProcess(database_url, '--concurrency', '1', env=env)
    try:
        async with rollup_lock_held():  # held until the worker has gone: the rollup cannot finish
            await wait_for(_rollup_running, 60, 'the worker to start the rollup')
            if how == 'another one waiting':
                # A turn meanwhile queues the next rollup of the account (its queueing lock is free while the first
                # runs): the one cut short is not put back beside it (procrastinate's update would break the lock's
                # unique index and leave it marked running) but removed: the waiting one counts its rows too.
                await chat('cut')
            worker.signal(signal.SIGTERM)
            await worker.said('stopping: waiting for 1 running job')
            if how == 'second signal':
                # While it waits for the job, the worker keeps its heartbeat: never found stalled (which would have
                # another worker run the job a second time, meanwhile).
                deadline = time.monotonic() + 1.5 * STALLED_S
                while time.monotonic() < deadline:
                    assert await retry_stalled_jobs(seconds_since_heartbeat=STALLED_S) == 0
                    await asyncio.sleep(0.1)
                worker.signal(signal.SIGINT)  # Ctrl-C, or SIGTERM again: the same
            assert await worker.exit_code(STOP_S) == 0, worker.stderr
            reason = 'asked again' if how == 'second signal' else 'not done in 0.5 s'
            assert f'1 running job {reason}: put back in the queue, for the next worker' in worker.stderr
            # Back in the queue, due now, its half-done work rolled back: nothing counted.
            async with get_db_session(account=Unscoped.OWNER) as session:
                rollup = (
                    await session.execute(
                        text(
                            'SELECT status::text, coalesce(scheduled_at <= now(), true) FROM procrastinate_jobs '
                            "WHERE task_name = 'agentrt.usage_rollup'"
                        )
                    )
                ).all()
            assert [tuple(row) for row in rollup] == [('todo', True)]
            assert await rolled_up_requests() == 0
    finally:
        worker.kill()
    _assert_one_line(worker, signal.SIGTERM)
    await _assert_nothing_left_behind()

    # The next worker (`agentrt worker --burst`, in this process) runs it, once.
    await close_queue()
    after = await invoke('worker', '--burst', env={'DATABASE_URL': queue_url(database_url)})
    assert after.exit_code == 0, after.stderr[-2000:]
    assert await queued_jobs() == []
    turns = 2 if how == 'another one waiting' else 1
    assert await rolled_up_requests() == len(await ledger_rows()) == 3 * turns  # each ledger row counted once
    assert await title('cut')


async def test_a_worker_replays_at_start_the_rows_an_exited_process_spooled(
    queue: None, database_url: str, tmp_path: Path
) -> None:
    """Rows spooled while PostgreSQL was down by a process that then exited (a one-shot chat) reach the ledger when
    a worker starts, not at its first ledger write (a worker may never make one)."""
    spool = tmp_path / 'spool' / 'llm-ledger.jsonl'
    records = await asyncio.to_thread(spool_left_by_an_exited_process, spool, 3)
    worker = WorkerProcess(database_url, '--concurrency', '1', env={'AGENTRT_LEDGER_SPOOL': str(spool)})
    try:

        async def replayed() -> bool:
            return len(await ledger_rows()) == len(records)

        await wait_for(replayed, 30, 'the spooled rows to be replayed')
        worker.signal(signal.SIGTERM)
        assert await worker.exit_code(STOP_S) == 0, worker.stderr
    finally:
        worker.kill()
    assert {row['id'] for row in await ledger_rows()} == {record.id for record in records}
    assert not spool.exists() or not spool.read_text().strip()
    _assert_one_line(worker, signal.SIGTERM)
