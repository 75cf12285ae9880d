"""Queueing a turn's post-turn work: ids only, at most one pending job per conversation (summary) and per account and
day (rollup), the rollup at the end of its interval so one job covers every turn of it."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from procrastinate.exceptions import AlreadyEnqueued
from procrastinate.jobs import JobDeferrer

from agentrt.db.engine import current_settings
from agentrt.services.jobs._app import open_queue, queue_refused, queue_unavailable
from agentrt.services.jobs._tasks import conversation_summary, usage_rollup

logger = logging.getLogger('agentrt.jobs')


async def defer_post_turn_work(
    account_id: int, conversation_id: str, *, summarise: bool, rollup_interval_s: float
) -> None:
    """Queue the turn's jobs (the queue mode's `schedule_post_turn_work`).

    Args:
        account_id: the turn's account.
        conversation_id: its conversation.
        summarise: queue the title and summary (when due: the same cadence as the inline mode).
        rollup_interval_s: the rollup runs this long after the first turn that queued it; the turns meanwhile find
            it pending and add nothing (`AGENTRT_USAGE_ROLLUP_SECONDS`, the inline mode's throttle).
    """
    if summarise:
        await defer_summary(account_id, conversation_id)
    await defer_rollup(account_id, rollup_interval_s)  # False: one is pending, it takes this turn's ledger rows too
    await _workers.check()


async def defer_rollup(account_id: int, rollup_interval_s: float = 0.0) -> bool:
    """Queue the account's usage rollup, to run in `rollup_interval_s` (now when under a second), unless one is pending
    already (the queueing lock: one per account and day); one of an account runs at a time, across workers (its lock).

    Returns:
        True when queued now, False when one was pending already.
    """
    await open_queue()
    day = datetime.now(UTC).date().isoformat()
    deferrer = usage_rollup.configure(
        queueing_lock=f'rollup:{account_id}:{day}',
        lock=f'rollup:{account_id}',
        schedule_in={'seconds': int(rollup_interval_s)} if rollup_interval_s >= 1 else None,
    )
    return await _defer(deferrer, account_id=account_id)


WORKERS_CHECK_SECONDS = 300.0
"""How often a process that queues jobs looks whether any worker is alive to run them (at its first job, then at
most this often)."""


class _WorkersWatch:
    """Says, once until a worker is seen again, that no `agentrt worker` runs the jobs this process queues.

    A server or a chat in queue mode with no worker running queued every turn's jobs in silence: titles, summaries and
    rollups never came, and only `agentrt db status` ("no worker alive") told why.
    """

    def __init__(self) -> None:
        self.next_check = 0.0
        self.warned = False

    async def check(self) -> None:
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + WORKERS_CHECK_SECONDS
        seconds = current_settings().jobs_stalled_seconds
        try:
            app = await open_queue()
            row = await app.connector.execute_query_one_async(_WORKERS_ALIVE, seconds=seconds)
        except Exception as exc:  # the job was queued; whether a worker runs is for the next check
            logger.debug('could not count the workers alive: %s', exc)
            return
        if int(row['alive']):
            self.warned = False
        elif not self.warned:
            self.warned = True
            logger.warning(
                'no `agentrt worker` is running (none sent a heartbeat in the last %gs): the titles, summaries and '
                'usage rollups queued (AGENTRT_BACKGROUND=queue) wait until one runs',
                seconds,
            )


_WORKERS_ALIVE = (
    'SELECT count(*) AS alive FROM procrastinate_workers '
    'WHERE last_heartbeat > now() - make_interval(secs => %(seconds)s)'
)
_workers = _WorkersWatch()


async def defer_summary(account_id: int, conversation_id: str) -> int:
    """Queue the conversation's title and summary unless one is pending already; 1 when queued now, else 0."""
    await open_queue()
    deferrer = conversation_summary.configure(queueing_lock=f'summary:{account_id}:{conversation_id}')
    return int(await _defer(deferrer, account_id=account_id, conversation_id=conversation_id))


async def _defer(deferrer: JobDeferrer, **kwargs: Any) -> bool:
    """Queue one job: True when queued now, False when one with its queueing lock is pending already.

    Raises:
        DatabaseUnavailableError: the queue's PostgreSQL cannot be reached or its connection was lost (procrastinate's
            `ConnectorException` around psycopg's error): the runtime's error for an outage, which a server logs as
            one line for the task (`OutageAsOneLine`) rather than two chained tracebacks for each turn.
    """
    lock = deferrer.job.queueing_lock
    if lock is not None:
        if lock in _queueing:  # another turn of this process is queueing it
            return False
        _queueing.add(lock)
    try:
        if lock is not None and await _pending(deferrer, lock):
            return False
        await deferrer.defer_async(**kwargs)
    except AlreadyEnqueued:  # another process queued it between the look and the insert
        return False
    except Exception as exc:
        if (unavailable := queue_unavailable(exc, 'cannot queue a job')) is not None:
            raise unavailable from exc
        if (refused := queue_refused(exc)) is not None:
            raise refused from exc
        raise
    finally:
        if lock is not None:
            _queueing.discard(lock)
    return True


_queueing: set[str] = set()
"""The queueing locks of the jobs this process is queueing now. Concurrent turns (a server's) that all looked before
any inserted found none pending, and all but one insert failed; the others add nothing: the one queueing it covers
their ledger rows as a pending job does. (Should it fail, the next turn or reconcile queues it: nothing is lost.)"""


_PENDING = "SELECT count(*) AS pending FROM procrastinate_jobs WHERE queueing_lock = %(lock)s AND status = 'todo'"


async def _pending(deferrer: JobDeferrer, lock: str) -> bool:
    """Whether a job with queueing lock `lock` waits already: looked at before queueing, not left to the insert.

    The insert of a job whose lock is taken fails on procrastinate's unique index, which PostgreSQL logs as an ERROR
    ("duplicate key value violates unique constraint procrastinate_jobs_queueing_lock_idx_v1"): every turn within a
    rollup's interval did, so its server log had an ERROR for nearly every turn (1,241 for 2,081 turns of
    `agentrt serve --workers 3`). This look uses that index and costs the same one statement.
    """
    row = await deferrer.job_manager.connector.execute_query_one_async(_PENDING, lock=lock)
    return bool(row['pending'])
