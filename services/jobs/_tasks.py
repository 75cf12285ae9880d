"""The jobs: a conversation's title and summary, an account's usage rollup (ids only, idempotent, retried), and the
two periodic ones: reconcile (work the database says is missing) and retry-stalled (jobs whose worker died)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

from opentelemetry import trace
from procrastinate import BaseRetryStrategy, RetryStrategy
from procrastinate.job_context import JobContext
from procrastinate.jobs import Job
from procrastinate.retry import RetryDecision

from agentrt.db.engine import current_settings
from agentrt.services.conversations import refresh_title_and_summary
from agentrt.services.jobs._app import jobs
from agentrt.services.jobs._manager import not_a_try
from agentrt.services.ledger import roll_up_account_usage

logger = logging.getLogger('agentrt.jobs')
_tracer = trace.get_tracer('agentrt.jobs')

POST_TURN_QUEUE = 'post_turn'
MAINTENANCE_QUEUE = 'maintenance'
QUEUES = (POST_TURN_QUEUE, MAINTENANCE_QUEUE)

WORKER_STOPPING = 'agentrt.worker_stopping'
"""The key, in a job's context (`additional_context`), of a callable that says whether the worker running the job has
been asked to stop (`run_worker` puts `WorkerStop.stopping` there: each worker its own, so two in one process do not
see each other's stop)."""


class PutBackOnStop(BaseRetryStrategy):
    """A job cut short because its worker stopped (SIGTERM, Ctrl-C: the job is cancelled) did not fail: it goes back to
    the queue at once, for the next worker, whatever its attempts, and the run is not counted as one (`not_a_try`), so
    a failure after any number of stops is tried as often as `failures` says (not at all when None)."""

    def __init__(self, failures: RetryStrategy | None = None) -> None:
        self.failures = failures

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        """Now for a cancelled job; else the failure strategy's decision."""
        if isinstance(exception, asyncio.CancelledError):
            if job.id is not None:
                not_a_try(job.id)
            return RetryDecision()  # no retry_at: due now
        return None if self.failures is None else self.failures.get_retry_decision(exception=exception, job=job)


def _job_span(kind: str, attributes: dict[str, str | int]) -> AbstractContextManager[trace.Span]:
    """A job's span, named as the same work's in a process of its own (`background task <kind>`, its ids as
    attributes): without it, each statement of a job the worker ran was a trace of its own. Its failure is recorded
    redacted (`redacted_error_span`), as a background task's."""
    from agentrt.services.span_errors import redacted_error_span

    span_attributes = {**attributes, 'task_name': kind, 'agentrt.job': True}
    return redacted_error_span(_tracer, f'background task {kind}', span_attributes)


# Failures retried with growing waits (2, 4, 8, 16 s): a database restart or a lock held a while is over by then.
# Five attempts in all, as README says: procrastinate's `max_attempts` counts the retries after the first (5 ran it 6
# times, the last 32 s later).
_RETRY = PutBackOnStop(RetryStrategy(max_attempts=4, exponential_wait=2))


@jobs.task(name='agentrt.conversation_summary', queue=POST_TURN_QUEUE, retry=_RETRY)
async def conversation_summary(account_id: int, conversation_id: str) -> None:
    """Title and summarise the conversation from its stored history (nothing when the summary is current)."""
    with _job_span(
        'conversation summary', {'agentrt.account_id': account_id, 'gen_ai.conversation.id': conversation_id}
    ):
        await refresh_title_and_summary(account_id, conversation_id)


class UntilStop:
    """A roll-up's `keep_going` in a job: False once the job's worker is asked to stop, so a long roll-up (a backlog of
    millions after an upgrade) ends after its batch under way, committed, instead of holding the stop until its
    deadline and then being cancelled mid-batch. Always True for a job run by a worker that is not `run_worker`'s."""

    def __init__(self, context: JobContext) -> None:
        self._stopping: Callable[[], bool] | None = context.additional_context.get(WORKER_STOPPING)
        self.stopped = False
        """Whether it said False: the roll-up stopped there, rows left queued."""

    def __call__(self) -> bool:
        self.stopped = self._stopping is not None and self._stopping()
        return not self.stopped


@jobs.task(name='agentrt.usage_rollup', queue=POST_TURN_QUEUE, retry=_RETRY, pass_context=True)
async def usage_rollup(context: JobContext, account_id: int) -> None:
    """Add the account's recent ledger rows nobody counted yet to the daily rollup (each row counted once).

    When its worker is asked to stop, it ends after the batch under way and queues the account's rollup again for the
    next worker (as a job cut short goes back to the queue, `PutBackOnStop`): the rest of a backlog goes on on another
    worker at its next poll of the queue (seconds: the new job is queued while this one still holds the account's
    lock, so the LISTEN notice finds it locked), rather than waiting for a turn of the account or the next reconcile.
    """
    with _job_span('usage rollup', {'agentrt.account_id': account_id}):
        until_stop = UntilStop(context)
        await roll_up_account_usage(account_id, keep_going=until_stop)
        if until_stop.stopped:
            from agentrt.services.jobs._defer import defer_rollup

            again = await defer_rollup(account_id)
            logger.info(
                'usage rollup of account %s stopped after its batch (the worker is stopping): the rest %s',
                account_id,
                'queued again, for the next worker' if again else 'left to the rollup already queued',
            )


@jobs.periodic(cron='*/5 * * * *', periodic_id='reconcile')
@jobs.task(
    name='agentrt.reconcile',
    queue=MAINTENANCE_QUEUE,
    queueing_lock='agentrt.reconcile',
    retry=_RETRY,
    pass_context=True,
)
async def reconcile(context: JobContext, timestamp: int) -> None:
    """Every five minutes: queue the work the database says is missing (`reconcile_post_turn_work`); its roll-up of
    every account ends after its batch under way when the worker is asked to stop (the next reconcile goes on)."""
    from agentrt.services.jobs._reconcile import reconcile_post_turn_work

    with _job_span('reconcile', {}):
        await reconcile_post_turn_work(keep_going=UntilStop(context))


@jobs.periodic(cron='* * * * *', periodic_id='retry_stalled')
@jobs.task(
    name='agentrt.retry_stalled', queue=MAINTENANCE_QUEUE, queueing_lock='agentrt.retry_stalled', retry=PutBackOnStop()
)
async def retry_stalled(timestamp: int) -> None:
    """Every minute: run again the jobs whose worker stopped sending heartbeats (`retry_stalled_jobs`)."""
    with _job_span('retry stalled jobs', {}):
        await retry_stalled_jobs()


async def retry_stalled_jobs(seconds_since_heartbeat: float | None = None) -> int:
    """Put back in the queue every running job whose worker sent no heartbeat for `seconds_since_heartbeat` (default
    `AGENTRT_JOBS_STALLED_SECONDS`): a worker killed mid-job (SIGKILL, a lost machine) never finishes it. The job runs
    again from the start on another worker; every job here is idempotent, so a job that had half-run is done once.

    Returns:
        How many jobs were put back.
    """
    seconds = current_settings().jobs_stalled_seconds if seconds_since_heartbeat is None else seconds_since_heartbeat
    stalled = list(await jobs.job_manager.get_stalled_jobs(seconds_since_heartbeat=seconds))
    for job in stalled:
        logger.warning('job %s (%s) stalled: its worker stopped; running it again', job.id, job.task_name)
        await jobs.job_manager.retry_job(job)
    return len(stalled)
