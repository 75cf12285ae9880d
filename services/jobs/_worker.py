"""`run_worker`: a process that runs the queued jobs (`agentrt worker`), and how it stops (`WorkerStop`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from procrastinate import App
from procrastinate.job_context import JobContext
from procrastinate.jobs import Job
from procrastinate.worker import Worker

from agentrt.db import engine
from agentrt.db.engine import current_settings
from agentrt.db.errors import DatabaseUnavailableError
from agentrt.db.settings import Settings
from agentrt.services.jobs._app import (
    connect_failures_quiet,
    listens,
    open_queue,
    queue_refused,
    queue_unavailable,
)
from agentrt.services.jobs._tasks import QUEUES, WORKER_STOPPING

logger = logging.getLogger('agentrt.jobs')

POLL_SECONDS = 2.0
"""How often a worker that cannot LISTEN (behind a transaction pooler) looks for new jobs."""
LISTEN_POLL_SECONDS = 5.0
"""How often a worker that LISTENs looks anyway (a job due later, one put back without a NOTIFY)."""


@dataclass
class WorkerStop:
    """Asks a running `run_worker` to stop (the CLI calls `request()` on SIGTERM, SIGINT and SIGHUP).

    The first request: the worker takes no new job and lets the running ones finish, for at most
    `AGENTRT_JOBS_SHUTDOWN_SECONDS` (a job that may run long asks `stopping()` and ends early: a usage roll-up after
    its batch under way, the rest queued again); then it cancels those still running, and each goes back to the queue
    at once, for the next worker (a cancelled job writes nothing: each runs in its own transactions and is
    idempotent). A second request cancels them now. Either way the worker then leaves the queue's table of workers
    and returns.
    """

    requests: int = 0
    """How many times it was asked."""
    _worker: Worker | None = field(default=None, init=False, repr=False)
    _running: set[asyncio.Task[Any]] = field(default_factory=set, init=False, repr=False)
    """The tasks of the jobs running now."""
    _deadline: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)
    _putting_back: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)
    """The tasks putting back in the queue the jobs whose end could not be saved."""
    _requested: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    unsaved: set[int] = field(default_factory=set, init=False, repr=False)
    """The ids of the jobs that ran but whose end could not be saved (put back once the queue answers)."""

    def stopping(self) -> bool:
        """Whether a stop was asked: what the worker's jobs ask (their context's `WORKER_STOPPING`), so a long one
        (a usage roll-up draining a backlog) ends at its next step instead of holding the stop until its deadline."""
        return self.requests > 0

    def request(self) -> None:
        """Stop the worker: gracefully the first time, at once the second."""
        self.requests += 1
        self._requested.set()
        if self._worker is None:
            return  # not started yet: `run_worker` returns instead of starting
        if self.requests == 1:
            self._begin(self._worker)
        else:
            self._cut_short('asked again')

    def _begin(self, worker: Worker) -> None:
        worker.stop()  # type: ignore[no-untyped-call]  # no new job (one being fetched still starts: the deadline too)
        seconds = current_settings().jobs_shutdown_seconds
        self._deadline = asyncio.get_running_loop().call_later(seconds, self._cut_short, f'not done in {seconds:g} s')
        if self._running:
            logger.info(
                'stopping: waiting for %s to finish (at most %g s; stop again to put %s back in the queue now)',
                _jobs(len(self._running)),
                seconds,
                'it' if len(self._running) == 1 else 'them',
            )

    def _cut_short(self, why: str) -> None:
        if self._running:
            logger.warning('%s %s: put back in the queue, for the next worker', _jobs(len(self._running)), why)
        for task in self._running:
            task.cancel()

    async def middleware(self, call_next: Callable[[], Awaitable[Any]], context: JobContext, worker: Worker) -> Any:
        """The worker middleware: knows the running jobs, so a stop can cut them short."""
        task = asyncio.current_task()
        assert task is not None
        # The job's own task: procrastinate saves the outcome in it, later.
        task.add_done_callback(functools.partial(self._outcome_not_saved, context.job))
        self._running.add(task)
        try:
            return await call_next()
        finally:
            self._running.remove(task)

    async def asked(self, seconds: float) -> None:
        """Wait `seconds`, or less if a stop is asked meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._requested.wait(), seconds)

    def attach(self, worker: Worker) -> None:
        """The worker to stop (`run_worker`)."""
        self._worker = worker

    def detach(self) -> None:
        """The worker has returned."""
        if self._deadline is not None:
            self._deadline.cancel()
        for putting_back in self._putting_back:
            putting_back.cancel()
        self._worker = None

    def _outcome_not_saved(self, job: Job, task: asyncio.Task[Any]) -> None:
        """Say once, calmly, that a job ran but PostgreSQL was lost as procrastinate saved how it ended, and put the
        job back in the queue. procrastinate leaves that error in the job's task, which nothing awaits: asyncio printed
        "Task exception was never retrieved" and two tracebacks at exit. The job is still marked running, and the
        retry-stalled job looks only at jobs of silent workers: while this one goes on (the connection lost for a
        moment) it would stay so for good, its lock held. It is put back once the queue answers (jobs are idempotent);
        if this worker stops first, the retry-stalled job runs it again."""
        if task.cancelled() or (exc := task.exception()) is None:
            return
        lost = queue_unavailable(exc, 'lost PostgreSQL')
        logger.warning(
            '%s ran, but how it ended could not be saved: %s; it goes back to the queue',
            task.get_name().removeprefix('process job '),
            lost or f'{type(exc).__name__}: {" ".join(str(exc).split())}',
        )
        if job.id is not None:
            self.unsaved.add(job.id)
        if self._worker is not None and job.id is not None:
            putting_back = asyncio.get_running_loop().create_task(_put_back(self._worker, job.id))
            self._putting_back.add(putting_back)
            putting_back.add_done_callback(self._putting_back.discard)


async def _put_back(worker: Worker, job_id: int) -> None:
    """Put a running job whose end was not saved back in the queue, trying each heartbeat until the queue answers
    (cancelled when the worker stops: the retry-stalled job covers it then)."""
    interval = current_settings().jobs_heartbeat_seconds
    while True:
        await asyncio.sleep(interval)
        try:
            put_back = await _retry_now(worker.app, job_id)
        except Exception:  # the queue still away (`_retry_now` lets only that through): the next beat
            continue
        if put_back:
            logger.info('job %s put back in the queue: its end could not be saved', job_id)
        return


async def _retry_now(app: App, job_id: int) -> bool:
    """Put a job marked as running back in the queue, due now: True when it was; False when it is not running any
    more (its end was saved after all, or it was put back already: nothing to do).

    Raises:
        Exception: the queue's error when it does not answer (`queue_unavailable`).
    """
    try:
        await app.job_manager.retry_job_by_id_async(job_id, retry_at=datetime.now(UTC))
    except Exception as exc:
        if queue_unavailable(exc, 'lost PostgreSQL') is not None:
            raise
        logger.debug('job %s not put back: %s', job_id, exc)
        return False
    return True


class _QueueLossSaidOnce(logging.Filter):
    """On procrastinate's loggers while a worker runs: its lines for a lost queue connection said the runtime's way.

    A side task (the listener, the heartbeat) that loses PostgreSQL stops procrastinate's worker, which logged it twice
    ("Side task listener failed with exception: Database error., stopping worker", then "listener error:
    ConnectorException(...)"), each with a traceback, before `run_worker` raised the runtime's own error: those lines
    are dropped and their error kept (`lost`) for that one. A loss procrastinate recovers from (polling for jobs to
    abort) is one warning line in the runtime's words, without the traceback.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lost: BaseException | None = None
        self._quiet = contextlib.ExitStack()
        """Once the loss is known: the pool's failed attempts as the worker stops (its last writes) are DEBUG lines;
        the worker says it once (`_ride_out`, or its error)."""

    def close(self) -> None:
        """The worker has stopped: the pool's failed attempts are warnings again."""
        self._quiet.close()

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a line `run_worker`'s error replaces; a lost connection on one line; any other line as it is."""
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or (lost := queue_unavailable(exc, 'lost PostgreSQL')) is None:
            return True
        action = str(getattr(record, 'action', ''))
        if action == 'side_task_failed' or (record.name == 'procrastinate.utils' and action.endswith('_error')):
            if self.lost is None:
                self.lost = exc
                self._quiet.enter_context(connect_failures_quiet())
            return False
        record.msg, record.args = f'{action or record.getMessage()}: {lost}', None
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, 'WARNING'
        return True


def _jobs(count: int) -> str:
    return f'{count} running job' + ('' if count == 1 else 's')


async def run_worker(
    *, concurrency: int = 4, burst: bool = False, name: str = 'agentrt-worker', stop: WorkerStop | None = None
) -> None:
    """Run jobs until `stop.request()` (see `WorkerStop`), or with `burst` until the queue is empty.

    Call `init_database()` first: the jobs use the process's engine and pool. The worker also defers the periodic
    jobs (reconcile every 5 minutes, retry-stalled every minute; one of each across all workers). Cancelling it
    stops it as a first `stop.request()` does, then raises `CancelledError`.

    A worker that loses the queue's connection (PostgreSQL restarted, a failover, PgBouncer killed the connection)
    lets its running jobs end, waits for the queue to answer again for up to `AGENTRT_JOBS_OUTAGE_SECONDS`, puts back
    in the queue the jobs whose end it could not save, and takes jobs again (see `_ride_out`).

    Raises:
        DatabaseUnavailableError: the queue cannot be reached at start, or was lost for longer than
            `AGENTRT_JOBS_OUTAGE_SECONDS`.
    """
    settings = current_settings()
    stop = stop or WorkerStop()
    app = await open_queue()
    logger.info('worker: queues %s, concurrency %d, %s', ','.join(QUEUES), concurrency, _waits(settings))
    while not stop.requests:  # asked while starting; from here to its first step, nothing awaits: none is missed
        worker = Worker(
            app,
            queues=list(QUEUES),
            concurrency=concurrency,
            name=name,
            wait=not burst,
            listen_notify=listens(settings),
            fetch_job_polling_interval=POLL_SECONDS if not listens(settings) else LISTEN_POLL_SECONDS,
            update_heartbeat_interval=settings.jobs_heartbeat_seconds,
            stalled_worker_timeout=settings.jobs_stalled_seconds,
            delete_jobs='successful',
            install_signal_handlers=False,  # the CLI calls stop.request() (agents/cli/worker.py)
            worker_middleware=[stop.middleware],
            additional_context={WORKER_STOPPING: stop.stopping},  # this worker's stop, seen by the jobs it runs
        )
        try:
            await _run(worker, burst, stop)
            return
        except DatabaseUnavailableError as lost:
            if stop.requests:
                raise
            if settings.jobs_outage_seconds <= 0:
                raise DatabaseUnavailableError(
                    f'{lost}; the worker stopped (AGENTRT_JOBS_OUTAGE_SECONDS is 0): start it again once it is back'
                ) from lost
            await _ride_out(app, lost, worker.worker_id, stop, settings.jobs_outage_seconds)


async def _run(worker: Worker, burst: bool, stop: WorkerStop) -> None:
    """One run of procrastinate's worker, until it stops (asked, the burst done, or the queue lost: raised)."""
    stop.attach(worker)
    said_once = _QueueLossSaidOnce()
    loggers = [
        logging.getLogger(name) for name in ('procrastinate.worker', f'procrastinate.worker.{worker.worker_name}')
    ]
    loggers.append(logging.getLogger('procrastinate.utils'))
    for each in loggers:
        each.addFilter(said_once)
    running = asyncio.ensure_future(worker.run())  # type: ignore[no-untyped-call]  # procrastinate: untyped
    heartbeat = asyncio.create_task(_heartbeat_until_gone(worker, current_settings().jobs_heartbeat_seconds))
    cancelled = False
    try:
        while not running.done():
            try:
                await asyncio.shield(running)
            except asyncio.CancelledError:
                if running.done():
                    raise
                cancelled = True
                stop.request()  # the first stops gracefully, another cuts the running jobs short
        running.result()
        if said_once.lost is not None:  # a side task lost the queue's connection: its lines were held back for this
            raise said_once.lost
        if cancelled:
            raise asyncio.CancelledError
        if not burst and not stop.requests:
            # procrastinate stops a worker, without raising, when one of its side tasks fails: the LISTEN connection
            # or the heartbeat lost PostgreSQL (a restart, a failover, a terminated backend). Exiting 0 would tell a
            # process manager that all is well, and no job would run until someone started a worker again.
            raise DatabaseUnavailableError(
                'the worker stopped by itself: its connection to the job queue failed (the error is logged above: '
                'PostgreSQL restarted or the connection was cut)'
            )
    except Exception as exc:
        # procrastinate stops a worker whose queue connection failed (a restart, a failover): say so, as the rest of
        # the runtime does, rather than with the connector's "Database error."
        if lost := queue_unavailable(exc, 'lost PostgreSQL'):
            raise lost from exc
        if refused := queue_refused(exc):
            raise refused from exc
        raise
    finally:
        for each in loggers:
            each.removeFilter(said_once)
        said_once.close()
        stop.detach()
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat


_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0)
"""The waits between a lost queue's probes: short first (a restart takes a second or two), then every 5 s."""
_DOING = "SELECT id FROM procrastinate_jobs WHERE status = 'doing' AND worker_id = %(worker_id)s ORDER BY id"


async def _ride_out(
    app: App, lost: DatabaseUnavailableError, worker_id: int | None, stop: WorkerStop, seconds: float
) -> None:
    """Wait for a lost queue to answer again, for at most `seconds`, then put back the jobs of the worker that lost it.

    procrastinate's worker has returned: every job it ran has ended, but those whose end it could not save are still
    marked as running under its id (as is any it was taking). Nothing of this process runs them any more, so they go
    back to the queue at once (jobs are idempotent; `QueueJobManager` drops one whose successor already waits), and
    the old worker's row is removed: none waits `AGENTRT_JOBS_STALLED_SECONDS` for the retry-stalled job. One warning
    when the queue is lost and one line when it is back; the pool's attempts meanwhile are DEBUG lines. A stop asked
    meanwhile returns at once (the jobs left marked running are the retry-stalled job's, as for a killed worker).

    Raises:
        DatabaseUnavailableError: the queue did not answer within `seconds`.
        ConfigError: the queue's server answered, refusing the login or its tables (`queue_refused`).
    """
    loop = asyncio.get_running_loop()
    began = loop.time()
    logger.warning('worker: %s; waiting for it to come back (at most %g s, AGENTRT_JOBS_OUTAGE_SECONDS)', lost, seconds)
    attempt = 0
    with connect_failures_quiet():
        while not stop.requests:
            left = began + seconds - loop.time()
            try:
                async with asyncio.timeout(max(left, 0.1)):
                    await app.check_connection_async()
                    put_back = await _put_back_jobs_of(app, worker_id, stop.unsaved)
                break
            except Exception as exc:
                if (refused := queue_refused(exc)) is not None:  # the password rotated meanwhile: no wait changes it
                    raise refused from exc
                if not isinstance(exc, TimeoutError) and queue_unavailable(exc, 'lost PostgreSQL') is None:
                    raise
                logger.debug('worker: the job queue does not answer yet: %s: %s', type(exc).__name__, exc)
                # The embedded server may have stopped (killed, a failed crash recovery): started again in the
                # background, as `agentrt serve` does; the queue's psycopg connections never asked for it, and a
                # worker alone on the server waited out its bound and exited 3 (QA). A no-op for DATABASE_URL's.
                engine.embedded_unreachable()
            left = began + seconds - loop.time()
            if left <= 0:
                raise DatabaseUnavailableError(
                    f'{lost}; it did not come back within AGENTRT_JOBS_OUTAGE_SECONDS ({seconds:g} s): the worker '
                    'stopped (a process manager starts it again; the jobs it was running are retried as stalled)'
                )
            await stop.asked(min(_BACKOFF_SECONDS[min(attempt, len(_BACKOFF_SECONDS) - 1)], left))
            attempt += 1
        else:
            return
    with contextlib.suppress(Exception):  # the pool's other idle connection may be a dead one: replaced now
        await app.connector.pool.check()  # type: ignore[attr-defined]
    logger.warning(
        'worker: the job queue is back after %.1f s; taking jobs again%s',
        loop.time() - began,
        f' ({put_back} put back in the queue: how they ended was not saved)' if put_back else '',
    )


async def _put_back_jobs_of(app: App, worker_id: int | None, unsaved: set[int]) -> str:
    """Put back in the queue the jobs still marked as running under a worker that has returned (and those whose end
    it could not save, in case its row went first), and remove its row.

    Returns:
        "N job(s)", or '' when there were none.
    """
    ids = set(unsaved)
    if worker_id is not None:  # None: it unregistered as it stopped (the queue back already)
        ids.update(row['id'] for row in await app.connector.execute_query_all_async(_DOING, worker_id=worker_id))
    count = 0
    for job_id in sorted(ids):
        if await _retry_now(app, job_id):
            count += 1
        unsaved.discard(job_id)
    if worker_id is not None:
        await app.job_manager.unregister_worker(worker_id)
    return f'{count} job' + ('' if count == 1 else 's') if count else ''


async def _heartbeat_until_gone(worker: Worker, interval: float) -> None:
    """The worker's heartbeat, until it leaves the table of workers. procrastinate stops its own as soon as the worker
    stops taking jobs, but the running ones may take `AGENTRT_JOBS_SHUTDOWN_SECONDS` more (or, with `--burst`, as long
    as they take): without a heartbeat another worker would find them stalled and run them a second time meanwhile."""
    while True:
        await asyncio.sleep(interval)
        if worker.worker_id is not None:
            try:
                await worker.app.job_manager.update_heartbeat(worker.worker_id)
            except Exception as exc:  # the database away a moment: the next beat may reach it
                logger.debug('worker heartbeat failed: %s', exc)


def _waits(settings: Settings) -> str:
    if listens(settings):
        return 'LISTEN'
    if settings.queue_database_url:
        return 'polling (AGENTRT_QUEUE_DATABASE_URL is the pooler of DATABASE_URL: give it a direct connection)'
    return 'polling (DATABASE_URL is a pooler)'
