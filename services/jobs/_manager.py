"""The queue's job manager: procrastinate's, with three repairs (a job put back while its successor waits; a run its
worker's stop cut short counted as a try; a worker whose row another removed)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from procrastinate.exceptions import ConnectorException, UniqueViolation
from procrastinate.jobs import Job, Status
from procrastinate.manager import JobManager

logger = logging.getLogger('agentrt.jobs')

_QUEUEING_LOCK_INDEX = 'procrastinate_jobs_queueing_lock_idx_v1'  # one waiting ('todo') job per queueing lock
_WORKER_KEY = 'procrastinate_jobs_worker_id_fkey'  # a job taken names its worker's row in procrastinate_workers
# The row of a worker taken for dead, made again with its own id (the jobs it takes name it).
_REGISTER_AGAIN = """
INSERT INTO procrastinate_workers (id, last_heartbeat) OVERRIDING SYSTEM VALUE VALUES (%(worker_id)s, now())
ON CONFLICT (id) DO UPDATE SET last_heartbeat = now()
"""
# procrastinate's put-back adds one to `attempts`; taken off first, while the job is still this worker's ('doing'), so
# no other worker can take it and fail it with the count one too high meanwhile (0 becomes -1 for that moment).
_NOT_A_TRY = "UPDATE procrastinate_jobs SET attempts = attempts - 1 WHERE id = %(job_id)s AND status = 'doing'"
_cut_short: set[int] = set()
"""The ids of the jobs whose put-back, next, is of a run their worker's stop cut short (`not_a_try`)."""


def not_a_try(job_id: int) -> None:
    """Say that the job's put-back, which follows, is of a run its worker's stop cut short (SIGTERM, Ctrl-C): not a try.

    procrastinate counts every run in the job's `attempts`, which its retry strategy compares with `max_attempts`: each
    stop that cut a job short (a rolling deploy) took one of its tries, and a job put back twice then failing was tried
    3 times, not the 5 README says. `QueueJobManager` puts it back with its count as it was.

    Args:
        job_id: the job's id, as the retry strategy sees it.
    """
    _cut_short.add(job_id)


class QueueJobManager(JobManager):
    """procrastinate's, except for:

    - a job put back in the queue (a failure retried, a job cut short by its worker's stop, a stalled one) while
      another with its queueing lock waits there: procrastinate's update then breaks the lock's unique index and the
      job stays marked as running; here it is removed instead, as the waiting job does the same work (jobs carry ids
      only and are idempotent: the same conversation's summary, the same account's rollup);
    - a job cut short by its worker's stop (`not_a_try`): put back without counting the run in its `attempts`;
    - a worker whose row in the table of workers another removed: it registers again (`fetch_job`).
    """

    async def retry_job_by_id_async(
        self,
        job_id: int,
        retry_at: datetime,
        priority: int | None = None,
        queue: str | None = None,
        lock: str | None = None,
    ) -> None:
        """Put the job back in the queue, or remove it if another with its queueing lock is waiting; a run cut short
        by its worker's stop (`not_a_try`) is not counted in its attempts."""
        if job_id in _cut_short:
            _cut_short.discard(job_id)
            await self.connector.execute_query_async(_NOT_A_TRY, job_id=job_id)
        try:
            await super().retry_job_by_id_async(job_id, retry_at, priority=priority, queue=queue, lock=lock)
        except UniqueViolation as exc:
            if exc.constraint_name != _QUEUEING_LOCK_INDEX:
                raise
            logger.info('job %s not put back: a waiting one (%s) does its work', job_id, exc.queueing_lock)
            await self.finish_job_by_id_async(job_id=job_id, status=Status.ABORTED, delete_job=True)

    async def fetch_job(self, queues: Iterable[str] | None, worker_id: int) -> Job | None:
        """Take a job for the worker; a worker whose row another removed (it was taken for dead) registers again.

        A worker silent for longer than `AGENTRT_JOBS_STALLED_SECONDS` (the process paused: SIGSTOP, a suspended VM or
        laptop; its event loop blocked) has its row deleted by the next worker that starts (procrastinate prunes stalled
        workers). procrastinate's worker went on with its id, and its next job broke the jobs' foreign key to that row:
        the worker ended with "internal error: ConnectorException: Database error." (exit code 70).
        """
        try:
            return await super().fetch_job(queues, worker_id)
        except ConnectorException as exc:
            if getattr(getattr(exc.__cause__, 'diag', None), 'constraint_name', None) != _WORKER_KEY:
                raise
        logger.warning(
            'this worker (id %s) was taken for dead: it sent no heartbeat for AGENTRT_JOBS_STALLED_SECONDS (the '
            'process was paused or its event loop blocked) and another removed it from the table of workers; the jobs '
            'it was running may run a second time elsewhere (they are idempotent); registered again',
            worker_id,
        )
        await self.connector.execute_query_async(_REGISTER_AGAIN, worker_id=worker_id)
        return await super().fetch_job(queues, worker_id)
