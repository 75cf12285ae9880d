"""The jobs' retry strategy: a failure is tried again with growing waits, as many times as README says."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from procrastinate.jobs import Job
from procrastinate.retry import RetryDecision

from agentrt.services.jobs._tasks import _RETRY


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
