"""The jobs: their retry strategy (a failure is tried again with growing waits, as many times as README says), and a
roll-up job that ends after its batch when its worker is asked to stop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from procrastinate import RetryStrategy
from procrastinate.jobs import Job
from procrastinate.retry import RetryDecision
from sqlalchemy import insert, text

from agentrt.db.models.ledger import LLMRequestRow
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.jobs import (
    WorkerStop,
    _manager,
    _tasks,
    defer_post_turn_work,
    open_queue,
    reconcile_post_turn_work,
    run_worker,
)
from agentrt.services.jobs._tasks import _RETRY, reconcile, usage_rollup
from agentrt.services.ledger import _rollups
from tests.factories import ledger_record, scalar
from tests.services.jobs.helpers import queued_jobs, rolled_up_requests


def _decision(attempts: int, exception: BaseException) -> RetryDecision | None:
    """What becomes of a job that raised `exception` after `attempts` earlier attempts (None: it failed for good)."""
    job = Job(id=1, queue='post_turn', lock=None, queueing_lock=None, task_name='agentrt.summary', attempts=attempts)
    return _RETRY.get_retry_decision(exception=exception, job=job)


def test_a_job_that_always_fails_is_tried_five_times_with_growing_waits() -> None:
    # README: "retried with growing waits (5 attempts)"; it ran 6 times (waits of 2, 4, 8, 16 and 32 s).
    before = datetime.now(UTC)
    decisions = [_decision(attempts, RuntimeError('boom')) for attempts in range(6)]
    assert [decision is not None for decision in decisions] == [True, True, True, True, False, False]
    waits = [(d.retry_at - before).total_seconds() for d in decisions if d is not None and d.retry_at is not None]
    assert [round(wait) for wait in waits] == [2, 4, 8, 16]


def test_a_job_cut_short_by_its_workers_stop_goes_back_at_once_whatever_its_attempts() -> None:
    decision = _decision(10, asyncio.CancelledError())
    assert decision is not None and decision.retry_at is None  # due now
    assert 1 in _manager._cut_short  # its put-back does not count the run as a try
    _manager._cut_short.discard(1)  # no put-back follows here


async def test_a_job_cut_short_by_stops_is_still_tried_five_times_when_it_then_fails(
    queue: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: a job that fails is tried 5 times in all, and one cut short by its worker's stop goes back to the queue
    however many attempts it had. procrastinate counted each run cut short in the job's attempts: a job put back by two
    stops (a rolling deploy) then failing was tried 3 times, not 5."""
    account = 2**40  # no account's: the reconcile a worker queues never rolls it up
    runs: list[str] = []
    started = asyncio.Event()
    failing = False

    async def roll_up(account_id: int, **kwargs: Any) -> None:
        if account_id != account:
            return
        runs.append('failed' if failing else 'cut short')
        if not failing:
            started.set()
            await asyncio.Event().wait()  # until its worker's stop cancels it
        raise RuntimeError('boom')

    monkeypatch.setattr(_tasks, 'roll_up_account_usage', roll_up)
    monkeypatch.setattr(_RETRY, 'failures', RetryStrategy(max_attempts=4))  # the same tries, without 30 s of waits
    await open_queue()
    await usage_rollup.defer_async(account_id=account)
    for _ in range(2):  # two workers stopped while it runs
        started.clear()
        stop = WorkerStop()
        worker = asyncio.ensure_future(run_worker(concurrency=1, stop=stop))
        await asyncio.wait_for(started.wait(), 30)
        stop.request()
        stop.request()  # again: cut short now
        await asyncio.wait_for(worker, 15)
    assert await _rollup_job() == ('todo', 0)  # back in the queue, no try used

    failing = True
    async with asyncio.timeout(60):
        while await _rollup_job() != ('failed', 5):  # a burst worker ends when nothing is due (a retry not yet queued)
            await run_worker(concurrency=1, burst=True)
    assert runs == ['cut short'] * 2 + ['failed'] * 5


async def _rollup_job() -> tuple[str, int]:
    """`(status, attempts)` of the one usage rollup job."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        row = (
            await session.execute(
                text("SELECT status::text, attempts FROM procrastinate_jobs WHERE task_name = 'agentrt.usage_rollup'")
            )
        ).one()
    return str(row[0]), int(row[1])


async def _backlog(rows: int) -> int:
    """`rows` ledger rows of the demo account, queued for the rollup (as after an upgrade of a ledger never rolled up);
    returns the account's id."""
    account = int(await scalar("SELECT id FROM accounts WHERE slug = 'acme-health'"))
    records = [ledger_record(account_id=account, account_slug='acme-health').to_row() for _ in range(rows)]
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(insert(LLMRequestRow), records)
    return account


async def _queued_and_claimed() -> tuple[int, int]:
    """Ledger rows still queued for the rollup, and rows it has counted."""
    queued = await scalar('SELECT count(*) FROM usage_pending_requests')
    claimed = await scalar('SELECT count(*) FROM usage_rolled_up_requests')
    return int(queued), int(claimed)


@pytest.mark.parametrize('job', ['usage rollup', 'reconcile'])
async def test_a_roll_up_job_draining_a_backlog_ends_after_its_batch_when_its_worker_is_asked_to_stop(
    queue: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, job: str
) -> None:
    """A worker asked to stop (SIGTERM) while a roll-up drained a backlog of millions (a ledger upgraded, never rolled
    up) waited for the whole drain, up to its shutdown time, then cancelled the job mid-batch. Now the roll-up
    ends after its batch under way, committed, and the job ends as done; the rest stays queued, each row counted once
    when the next roll-up takes it: the account's rollup job queues itself again for the next worker, the reconcile
    leaves it to the next reconcile."""
    monkeypatch.setattr(_rollups, 'ROLL_UP_BATCH', 20)
    total = 2_000  # 100 batches: a drain of 5 s at least, each batch slowed below
    account = await _backlog(total)
    real, batches, third = _rollups._roll_up_batch, 0, asyncio.Event()

    async def slow_batch(*args: Any, **kwargs: Any) -> Any:
        nonlocal batches
        await asyncio.sleep(0.05)
        result = await real(*args, **kwargs)
        batches += 1
        if batches == 3:
            third.set()
        return result

    monkeypatch.setattr(_rollups, '_roll_up_batch', slow_batch)
    if job == 'usage rollup':
        await defer_post_turn_work(account, 'backlog', summarise=False, rollup_interval_s=0)
    else:
        await open_queue()
        await reconcile.defer_async(timestamp=0)
    [(first_job, _)] = await _jobs_of(job)
    stop = WorkerStop()
    worker = asyncio.ensure_future(run_worker(concurrency=1, stop=stop))
    try:
        await asyncio.wait_for(third.wait(), 30)
        at_stop, asked = batches, time.monotonic()
        stop.request()
        await asyncio.wait_for(asyncio.shield(worker), 15)
        stopped_in = time.monotonic() - asked
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    assert batches - at_stop <= 1  # the batch under way, if any, and no other
    assert stopped_in < 2.5, stopped_in  # not the drain's 5 s (nor the 20 s shutdown time)
    assert 'put back in the queue' not in caplog.text  # ended, not cut short
    queued, claimed = await _queued_and_claimed()
    assert (queued, claimed) == (total - 20 * batches, 20 * batches)  # each batch committed whole
    assert await rolled_up_requests() == claimed  # none counted twice
    # The job ended as done (deleted: `delete_jobs='successful'`), not put back; the rollup's rest is a new job.
    left = await _jobs_of(job)
    assert first_job not in {job_id for job_id, _ in left}
    if job == 'usage rollup':
        assert [status for _, status in left] == ['todo']

    monkeypatch.setattr(_rollups, '_roll_up_batch', real)
    if job == 'usage rollup':
        await run_worker(concurrency=1, burst=True)  # the next worker
        assert await queued_jobs() == []
    else:
        await reconcile_post_turn_work()  # the next reconcile
    assert await _queued_and_claimed() == (0, total)
    assert await rolled_up_requests() == total


async def _jobs_of(job: str) -> list[tuple[int, str]]:
    """`(id, status)` of the queue's jobs of the kind."""
    name = 'agentrt.usage_rollup' if job == 'usage rollup' else 'agentrt.reconcile'
    async with get_db_session(account=Unscoped.OWNER) as session:
        result = await session.execute(
            text('SELECT id, status::text FROM procrastinate_jobs WHERE task_name = :n ORDER BY id'), {'n': name}
        )
        return [(int(job_id), str(status)) for job_id, status in result]
