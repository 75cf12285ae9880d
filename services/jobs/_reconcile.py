"""The reconcile task: work the database says is missing, whatever happened to the jobs (a process that died between
saving a turn and queueing its jobs, a job that failed every attempt, turns saved while the queue was off)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from agentrt.db.engine import current_settings
from agentrt.db.session import Unscoped, get_read_only_session
from agentrt.services.jobs._app import open_queue
from agentrt.services.jobs._defer import defer_summary
from agentrt.services.ledger import roll_up_pending

logger = logging.getLogger('agentrt.jobs')

_BATCH = 1000

# A conversation with turns and no summary at all: its first turn's title and summary never came.
_UNSUMMARISED = text("""
SELECT account_id, conversation_id FROM conversations
WHERE head_id IS NOT NULL AND summary_head_id IS NULL AND updated_at < :before
ORDER BY updated_at LIMIT :batch
""")


# A conversation whose summary job failed every attempt this recently is not queued again yet: reconcile runs every
# five minutes, and a summary that always fails (a bug, a history the model refuses) added a failed job a run, 288 a
# day per conversation, to the queue's table until `AGENTRT_JOBS_KEEP_FAILED_DAYS` deleted them. Once a day it is
# tried again (the cause may be gone), as a summary never queued is at the next run.
SUMMARY_RETRY_AFTER = timedelta(days=1)
# The conversations whose summary failed for good within that time (the job's last event: when it failed). The queue
# may be another database (`AGENTRT_QUEUE_DATABASE_URL`), so it is asked apart, not joined.
_RECENTLY_FAILED = """
SELECT DISTINCT job.args->>'account_id' AS account_id, job.args->>'conversation_id' AS conversation_id
FROM procrastinate_jobs job JOIN procrastinate_events event ON event.job_id = job.id
WHERE job.task_name = 'agentrt.conversation_summary' AND job.status = 'failed'
  AND event.at > now() - make_interval(secs => %(seconds)s)
"""


@dataclass(frozen=True)
class ReconcileReport:
    """What one reconcile did: summaries queued, rollup buckets written, finished jobs deleted."""

    summaries_queued: int
    rollup_buckets: int
    jobs_deleted: int = 0


async def reconcile_post_turn_work(
    *, idle_seconds: float | None = None, keep_going: Callable[[], bool] | None = None
) -> ReconcileReport:
    """Queue the title and summary of every conversation left without them for `idle_seconds` (default
    `AGENTRT_JOBS_RECONCILE_AFTER_SECONDS`), roll up every ledger row nobody counted, and delete
    the jobs that failed every attempt (or were cancelled or aborted) more than `AGENTRT_JOBS_KEEP_FAILED_DAYS` ago:
    succeeded jobs are deleted as they end, and without this a job failing for good (a bug, a row that cannot be
    saved) added a row to the queue's table for ever, every five minutes for the periodic ones.

    Idempotent: a summary already queued is not queued twice (its queueing lock), a ledger row is counted once. A
    summary that failed every attempt is queued again a day later (`SUMMARY_RETRY_AFTER`), not at every run.

    Args:
        idle_seconds: how long a conversation is left without its summary before it is queued.
        keep_going: the roll-up's (`roll_up_pending`): asked before each batch after the first, False stops it there,
            the rest left queued for the next roll-up (the reconcile job's worker asked to stop).

    Returns:
        What it did.
    """
    idle = current_settings().jobs_reconcile_after_seconds if idle_seconds is None else idle_seconds
    before = datetime.now(UTC) - timedelta(seconds=idle)
    async with get_read_only_session(account=Unscoped.JOBS) as session:  # every account's conversations
        missing = (await session.execute(_UNSUMMARISED, {'before': before, 'batch': _BATCH})).all()
    queued = 0
    if missing:
        app = await open_queue()
        failed = await app.connector.execute_query_all_async(
            _RECENTLY_FAILED, seconds=SUMMARY_RETRY_AFTER.total_seconds()
        )
        resting = {(str(row['account_id']), str(row['conversation_id'])) for row in failed}
        for account_id, conversation_id in missing:
            if (str(account_id), str(conversation_id)) not in resting:
                queued += await defer_summary(int(account_id), str(conversation_id))
    buckets = await roll_up_pending(keep_going=keep_going) or 0
    deleted = await delete_finished_jobs(current_settings().jobs_keep_failed_days)
    if queued or buckets or deleted:
        logger.info(
            'reconcile: %d summaries queued, %d rollup buckets written, %d finished jobs deleted',
            queued,
            buckets,
            deleted,
        )
    return ReconcileReport(summaries_queued=queued, rollup_buckets=buckets, jobs_deleted=deleted)


# procrastinate's `delete_old_jobs` (its latest event, the one that ended the job, is older than the retention), with
# the count; every status that ends a job: succeeded ones the worker left (none, as run here), failed, cancelled,
# aborted.
_DELETE_FINISHED = """
WITH finished AS (
    SELECT job.id FROM procrastinate_jobs job JOIN procrastinate_events event ON event.job_id = job.id
    WHERE job.status IN ('succeeded', 'failed', 'cancelled', 'aborted')
    GROUP BY job.id HAVING max(event.at) < now() - make_interval(days => %(days)s::int)
), deleted AS (
    DELETE FROM procrastinate_jobs WHERE id IN (SELECT id FROM finished) RETURNING 1
)
SELECT count(*) AS deleted FROM deleted
"""


async def delete_finished_jobs(keep_days: int) -> int:
    """Delete the jobs that ended (failed every attempt, cancelled, aborted) more than `keep_days` days ago, with
    their events; none when `keep_days` is 0. Returns how many."""
    if keep_days <= 0:
        return 0
    app = await open_queue()
    row = await app.connector.execute_query_one_async(_DELETE_FINISHED, days=keep_days)
    return int(row['deleted'])
