"""`run_worker`: a process that runs the queued jobs (`agentrt worker`)."""

from __future__ import annotations

import logging

from agentrt.db.engine import current_settings
from agentrt.services.jobs._app import listens, open_queue
from agentrt.services.jobs._tasks import QUEUES

logger = logging.getLogger('agentrt.jobs')

POLL_SECONDS = 2.0
"""How often a worker that cannot LISTEN (behind a transaction pooler) looks for new jobs."""


async def run_worker(*, concurrency: int = 4, burst: bool = False, name: str = 'agentrt-worker') -> None:
    """Run jobs until stopped (SIGINT/SIGTERM: running jobs finish first), or with `burst` until the queue is empty.

    Call `init_database()` first: the jobs use the process's engine and pool. The worker also defers the periodic
    jobs (reconcile every 5 minutes, retry-stalled every minute; one of each across all workers).
    """
    settings = current_settings()
    app = await open_queue()
    logger.info('worker: queues %s, concurrency %d, %s', ','.join(QUEUES), concurrency, _waits(settings.pooled))
    await app.run_worker_async(
        queues=list(QUEUES),
        concurrency=concurrency,
        name=name,
        wait=not burst,
        listen_notify=listens(settings),
        fetch_job_polling_interval=POLL_SECONDS if not listens(settings) else 5.0,
        update_heartbeat_interval=settings.jobs_heartbeat_seconds,
        stalled_worker_timeout=settings.jobs_stalled_seconds,
        delete_jobs='successful',
        install_signal_handlers=False,  # the CLI turns SIGTERM into a cancellation (agents/cli/support.run)
    )


def _waits(pooled: bool) -> str:
    return 'polling (DATABASE_URL is a pooler)' if pooled and not current_settings().queue_database_url else 'LISTEN'
