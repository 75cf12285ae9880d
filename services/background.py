"""`TaskSupervisor`: tracked background tasks with bounded concurrency, timing, error logging and clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from agentrt.db.errors import AgentRuntimeError, DatabaseUnavailableError
from agentrt.db.models.base import Base

T = TypeVar('T')
TaskAttributes = Mapping[str, str | int]
"""Span attributes of a task: the ids it works on (`gen_ai.conversation.id`, `agentrt.account_id`, ...)."""

logger = logging.getLogger('agentrt.background')

OUTAGE_LINE = 'background task %s not done: database unavailable: %s (a later turn does it again)'
"""The one line of a background task the database being unavailable stopped (arguments: the task, the error's
message): logged so by the supervisor unless its logger shows debug lines, and by `OutageAsOneLine` from a record
logged with its traceback."""
_tracer = trace.get_tracer('agentrt.background')

DEFAULT_MAX_RUNNING = 4
DEFAULT_MAX_QUEUED = 10_000
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
# After the shutdown timeout, how long cancelled tasks get to roll back and return their connections.
CANCEL_GRACE = 5.0


class BackgroundQueueFull(AgentRuntimeError):
    """`spawn` refused a task because the backlog of queued tasks is full."""


class SupervisorClosed(AgentRuntimeError):
    """`spawn` was called after `shutdown` started."""


@dataclass(frozen=True)
class SupervisorStats:
    """Counters of a supervisor; `running` and `queued` are current, the rest are totals since creation."""

    spawned: int
    running: int
    queued: int
    completed: int
    failed: int
    cancelled: int
    rejected: int


@dataclass(frozen=True)
class ShutdownReport:
    """What `shutdown` found: totals since creation, and tasks that ignored cancellation (`abandoned`)."""

    completed: int
    failed: int
    cancelled: int
    rejected: int
    abandoned: int
    seconds: float

    def __str__(self) -> str:
        """One line for a log: `12 completed, 0 failed, 1 cancelled, 0 rejected, 0 abandoned in 0.02 s`."""
        counts = ('completed', 'failed', 'cancelled', 'rejected', 'abandoned')
        return ', '.join(f'{getattr(self, name):,} {name}' for name in counts) + f' in {self.seconds:.2f} s'


class TaskSupervisor:
    """Runs coroutine functions as tracked asyncio tasks on one event loop.

    Each task is given ids, never an ORM object or a session, and opens its own session
    (`async with get_side_session(account=account_id) as session:`): the caller's session is closed, or busy committing,
    by the time the task runs. `spawn` refuses `AsyncSession`, `Session` and ORM instances outright.

    At most `max_running` tasks run at once, so a burst cannot take every pooled connection from
    foreground requests; up to `max_queued` more wait their turn (a waiting task holds no connection),
    and beyond that `spawn` raises `BackgroundQueueFull`, logs a warning and counts the rejection.
    """

    def __init__(
        self, *, max_running: int = DEFAULT_MAX_RUNNING, max_queued: int = DEFAULT_MAX_QUEUED, name: str = 'background'
    ) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError('max_running must be >= 1 and max_queued >= 0')
        self.name = name
        self.max_running = max_running
        self.max_queued = max_queued
        self._semaphore = asyncio.Semaphore(max_running)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._accepting = True
        self._spawned = self._running = self._queued = 0
        self._completed = self._failed = self._cancelled = self._rejected = 0
        self._last_run: dict[Hashable, float] = {}
        # A throttled key's run to come: at the end of its interval (a timer), or when its run under way ends (None).
        self._deferred: dict[Hashable, tuple[asyncio.TimerHandle | None, Callable[[bool], None]]] = {}
        self._keyed: dict[Hashable, asyncio.Task[Any]] = {}  # each throttled key's last run

    @property
    def accepting(self) -> bool:
        """False once `shutdown` has started."""
        return self._accepting

    def stats(self) -> SupervisorStats:
        """A snapshot of the counters; safe to call at any time."""
        return SupervisorStats(
            spawned=self._spawned,
            running=self._running,
            queued=self._queued,
            completed=self._completed,
            failed=self._failed,
            cancelled=self._cancelled,
            rejected=self._rejected,
        )

    def spawn(
        self,
        fn: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        name: str | None = None,
        attributes: TaskAttributes | None = None,
        **kwargs: Any,
    ) -> asyncio.Task[T]:
        """Schedule `fn(*args, **kwargs)` as a tracked task; must be called from the supervisor's loop.

        `name` and `attributes` belong to the supervisor (log lines and the span), so `fn` cannot take keywords
        called so. A failure is logged with its traceback and counted; awaiting the returned task re-raises
        it, but nobody has to: the supervisor retrieves every exception. The task may start before the
        caller's transaction commits, so spawn after the commit when the task reads rows the caller wrote.

        Args:
            fn: a coroutine function that opens its own database session.
            *args: plain values (ids, strings, numbers), never a session or an ORM object.
            name: what the task is, shown in logs and naming its span (`background task <name>`); the function's
                qualified name by default. Few distinct names: a trace backend groups by span name, so ids go in
                `attributes`.
            attributes: the ids the task works on, on its span and in its log lines (`conversation summary
                (conversation c-1, run 0193...)`).
            **kwargs: keyword arguments for `fn`, same rule as `args`.

        Returns:
            The task, which resolves to `fn`'s result.

        Raises:
            SupervisorClosed: `shutdown` has started.
            BackgroundQueueFull: `max_running` tasks are running and `max_queued` more are waiting.
            TypeError: an argument is a session or an ORM object.
        """
        kind: str = name or getattr(fn, '__qualname__', None) or repr(fn)
        task_name = _label(kind, attributes)  # for people: log lines, the asyncio task
        _reject_unsafe_arguments(task_name, args, kwargs)
        if not self._accepting:
            self._rejected += 1
            logger.warning('background task %s rejected: supervisor %s is shutting down', task_name, self.name)
            raise SupervisorClosed(f'background supervisor {self.name!r} is shutting down; {task_name} not started')
        # Tasks spawned but not started yet count as queued even while a slot is free, so the bound is on the
        # sum: a slot that is about to be taken is not room for one more.
        if self._running + self._queued >= self.max_running + self.max_queued:
            self._rejected += 1
            logger.warning(
                'background task %s rejected: %d tasks already queued (limit %d, %d running)',
                task_name,
                self._queued,
                self.max_queued,
                self._running,
            )
            raise BackgroundQueueFull(f'background queue full ({self.max_queued} waiting); {task_name} not started')
        self._spawned += 1
        self._queued += 1
        run = self._run(task_name, kind, attributes or {}, fn, args, kwargs)
        task = asyncio.get_running_loop().create_task(run, name=task_name)
        self._tasks.add(task)
        task.add_done_callback(self._on_done)
        return task

    def spawn_throttled(
        self,
        key: Hashable,
        interval: float,
        fn: Callable[..., Awaitable[Any]],
        /,
        *args: Any,
        name: str | None = None,
        attributes: TaskAttributes | None = None,
        **kwargs: Any,
    ) -> asyncio.Task[Any] | None:
        """`spawn`, at most once per `interval` seconds per `key` and one run of a key at a time, for idempotent work
        that catches up by itself.

        The first call runs at once; calls within `interval` of that run, or while it is still running, leave one run
        pending for the end of the interval, or of the run, whichever comes later (however many calls came), so the
        work of the last call is never dropped. (A run outlasting its interval, a roll-up draining a backlog of
        millions, was started again by each later call: QA, four roll-ups of one account at once for minutes, filling
        the supervisor's slots.) A pending run starts at once when the supervisor shuts down, unless a run of its key
        is still under way (the work catches up by itself: the next process's run covers it); `join` does not wait
        for one that has not started.

        Returns:
            The task when the work started now, else None.

        Raises:
            SupervisorClosed, BackgroundQueueFull, TypeError: as `spawn`.
        """
        kind = name or getattr(fn, '__qualname__', None) or repr(fn)
        _reject_unsafe_arguments(_label(kind, attributes), args, kwargs)
        loop = asyncio.get_running_loop()
        if key in self._deferred:
            return None
        due = self._last_run.get(key, float('-inf')) + interval
        if loop.time() >= due and not self._busy(key):
            task = self.spawn(fn, *args, name=name, attributes=attributes, **kwargs)
            self._last_run[key] = loop.time()
            self._track(key, task)
            return task
        if not self._accepting:
            # Raises SupervisorClosed, logged and counted.
            self.spawn(fn, *args, name=name, attributes=attributes, **kwargs)

        def run_deferred(now: bool) -> None:
            """The pending run: `now` at shutdown, else when both the interval and the run under way have ended."""
            if self._deferred.get(key, (None, None))[1] is not run_deferred:
                return  # started already (at shutdown)
            self._deferred.pop(key)
            if not self._accepting:
                return
            if self._busy(key):
                if now:  # shutting down: not a second run beside it (QA: two roll-ups of an account, both cut off)
                    return
                # The run under way outlasted the interval: this one starts when it ends.
                self._deferred[key] = (None, run_deferred)
                self._keyed[key].add_done_callback(lambda _: run_deferred(False))
                return
            self._last_run[key] = loop.time()
            try:
                self._track(key, self.spawn(fn, *args, name=name, attributes=attributes, **kwargs))
            except BackgroundQueueFull:
                pass  # logged and counted by `spawn`; the next call's run covers it

        self._deferred[key] = (loop.call_at(due, run_deferred, False), run_deferred)
        return None

    def _busy(self, key: Hashable) -> bool:
        """Whether the last run of a throttled `key` is still queued or running."""
        task = self._keyed.get(key)
        return task is not None and not task.done()

    def _track(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        """Note `task` as `key`'s run under way, forgotten when it ends (a failed one's error is not kept)."""
        self._keyed[key] = task
        task.add_done_callback(lambda _: self._keyed.pop(key) if self._keyed.get(key) is task else None)

    async def join(self) -> None:
        """Wait until no task is queued or running, tasks spawned meanwhile included, without shutting down.

        Wrap it in `asyncio.timeout(...)` to bound the wait; that cancels only the wait, not the tasks.
        """
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    # `timeout` is part of the contract (wait, then cancel), not a way to abandon the call: hence the noqa.
    async def shutdown(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> ShutdownReport:  # noqa: ASYNC109
        """Stop accepting work, wait up to `timeout` for running and queued tasks, then cancel the rest.

        Cancelled tasks get `CANCEL_GRACE` seconds to finish their cleanup (rollback, connection back
        to the pool); any still running after that are counted as `abandoned` and logged.
        """
        started = time.monotonic()
        # Throttled work waiting: started now, unless its key's run is still under way (`run_deferred`).
        for handle, run_deferred in list(self._deferred.values()):
            if handle is not None:
                handle.cancel()
            run_deferred(True)
        self._accepting = False
        pending = set(self._tasks)
        if pending:
            logger.info('%s work: waiting up to %.1fs for %d task(s)', self.name, timeout, len(pending))
            _, pending = await asyncio.wait(pending, timeout=timeout)
        if pending:
            logger.warning('%s work: cancelling %d task(s) still running after %.1fs', self.name, len(pending), timeout)
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=CANCEL_GRACE)
        if pending:
            logger.error(
                '%s work: %d task(s) ignored cancellation: %s',
                self.name,
                len(pending),
                ', '.join(sorted(t.get_name() for t in pending)),
            )
        report = ShutdownReport(
            completed=self._completed,
            failed=self._failed,
            cancelled=self._cancelled,
            rejected=self._rejected,
            abandoned=len(pending),
            seconds=time.monotonic() - started,
        )
        # The supervisor's name says what it runs ('background', 'ledger'): "background background ..." read as a typo.
        logger.info('tasks of %s shut down: %s', self.name, report)
        return report

    async def _run(
        self,
        task_name: str,
        kind: str,
        attributes: TaskAttributes,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        spawned_at = time.monotonic()
        started_at: float | None = None
        try:
            async with self._semaphore:
                self._queued -= 1
                self._running += 1
                started_at = time.monotonic()
                waited = started_at - spawned_at
                logger.debug('background task %s started (waited %.3fs)', task_name, waited)
                try:
                    with _task_span(kind, attributes, waited) as span:
                        try:
                            result = await fn(*args, **kwargs)
                        finally:
                            if span is not None:
                                span.set_attribute('duration_seconds', time.monotonic() - started_at)
                finally:
                    self._running -= 1
        except asyncio.CancelledError:
            self._cancelled += 1
            if started_at is None:
                self._queued -= 1
                logger.info('background task %s cancelled before it started', task_name)
            elif self._accepting and _loop_ending():
                # `asyncio.run(simple_chat(...))` in a script: the loop ends with the turn and cancels what the turn
                # left running (the usage roll-up, a summary), which a later turn does again. Not worth a warning in
                # every such program; `shutdown_runtime()` (or `agentrt_runtime()`) lets the work finish instead.
                logger.info(
                    'background task %s stopped with its event loop after %.3fs (the loop ended without '
                    'shutdown_runtime(), which lets background work finish)',
                    task_name,
                    time.monotonic() - started_at,
                )
            else:
                logger.warning('background task %s cancelled after %.3fs', task_name, time.monotonic() - started_at)
            raise
        except Exception as exc:
            self._failed += 1
            elapsed = time.monotonic() - (started_at if started_at is not None else spawned_at)
            if isinstance(exc, DatabaseUnavailableError) and not logger.isEnabledFor(logging.DEBUG):
                # An outage's work a later turn does again: one line, in a user's own program too, where nothing
                # installed `OutageAsOneLine` and each task was an ERROR with ~90 lines of chained traceback (QA). The
                # error rides on the record (`outage`) for a handler that shows tracebacks on request (`--debug`).
                logger.warning(OUTAGE_LINE, task_name, exc, extra={'task_name': task_name, 'outage': exc})
            else:
                logger.exception(
                    'background task %s failed after %.3fs', task_name, elapsed, extra={'task_name': task_name}
                )
            raise
        self._completed += 1
        logger.info('background task %s completed in %.3fs', task_name, time.monotonic() - started_at)
        return result

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            # Already logged in `_run`; retrieving it here stops "Task exception was never retrieved".
            task.exception()


def _task_span(kind: str, attributes: TaskAttributes, waited: float) -> AbstractContextManager[Any]:
    """The task's span (OpenTelemetry's API: a no-op unless a tracer provider is installed), or none at all: named
    by its kind, its ids as attributes, its failure recorded redacted (`redacted_error_span`).

    Telemetry must never fail the work it observes.
    """
    from agentrt.services.span_errors import redacted_error_span

    try:
        return redacted_error_span(
            _tracer, f'background task {kind}', {**attributes, 'task_name': kind, 'queued_seconds': waited}
        )
    except Exception:
        logger.debug('no span for background task %s', kind, exc_info=True)
        return nullcontext()


# How an attribute reads in a log line; others as their name after `agentrt.`, `_` as a space.
_LABELS = {'gen_ai.conversation.id': 'conversation', 'agentrt.account_id': 'account', 'agentrt.run_id': 'run'}


def _label(kind: str, attributes: TaskAttributes | None) -> str:
    """A task for people: `usage rollup (account 1, run 0193...)`."""
    if not attributes:
        return kind
    described = (
        f'{_LABELS.get(key) or key.removeprefix("agentrt.").replace("_", " ")} {value}'
        for key, value in attributes.items()
    )
    return f'{kind} ({", ".join(described)})'


def _reject_unsafe_arguments(task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, AsyncSession | Session | Base):
            raise TypeError(
                f'background task {task_name} was given a {type(value).__name__}: pass ids and open a session '
                "inside the task (the caller's session is closed by the time the task runs)"
            )


# One supervisor per event loop: a supervisor's tasks and semaphore belong to the loop they were made on.
# Weak keys, so a finished `asyncio.run` takes its supervisor with it.
_supervisors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TaskSupervisor] = weakref.WeakKeyDictionary()


class OutageAsOneLine(logging.Filter):
    """A log filter for servers: a background task stopped by the database being unavailable is one WARNING line with
    the reason, not an ERROR with a traceback of ~130 lines for each task an outage stops (every turn's own error
    already says the database is away). Any other record passes as it is.

    The supervisor logs that line itself unless `agentrt.background` shows debug lines; then it logs the failure
    with its traceback, which this filter makes the same line (`keep_traceback`: with the traceback under it).
    `agentrt serve` puts it on its handlers (`keep_traceback` at `--log-level debug`); the CLI's commands have their
    own one-line handling.
    """

    def __init__(self, keep_traceback: bool = False) -> None:
        super().__init__()
        self.keep_traceback = keep_traceback

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a background outage failure in place; keep every record."""
        task = record.__dict__.get('task_name')
        reason = _outage_reason(record) if task else None
        if reason is not None:
            record.levelno, record.levelname = logging.WARNING, 'WARNING'
            record.msg, record.args = OUTAGE_LINE, (task, reason)
            if not self.keep_traceback:
                record.exc_info, record.exc_text = None, None
        return True


def _outage_reason(record: logging.LogRecord) -> str | None:
    """The message of the `DatabaseUnavailableError` a record was logged with; None for any other record.

    The runtime's loggers redact their records before any handler sees them (`services/log_redaction.py`, installed
    once the agents are imported, as in every server): the exception is gone from `exc_info` by then, its class and
    its redacted line (`Type: message`) kept on the record instead.
    """
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None:
        return str(exc) if isinstance(exc, DatabaseUnavailableError) else None
    exc_class = record.__dict__.get('exc_class')
    if isinstance(exc_class, type) and issubclass(exc_class, DatabaseUnavailableError):
        return str(record.__dict__.get('exc_line', '')).partition(': ')[2]
    return None


def _loop_ending() -> bool:
    """Whether the running loop is being torn down: `asyncio.run`, once its main coroutine returned, cancels every task
    left at once, so all of them are being cancelled (a task cancelled on its own leaves the others running)."""
    return all(task.cancelling() for task in asyncio.all_tasks())


def get_supervisor() -> TaskSupervisor:
    """The process's supervisor for the running event loop, created on first use.

    Every caller on the same loop (`simple_chat`, `simple_chat_stream`, the CLI) gets the same one. A new
    loop (another `asyncio.run`), or a call after `drain_supervisor()`, gets a new supervisor.
    """
    loop = asyncio.get_running_loop()
    supervisor = _supervisors.get(loop)
    if supervisor is None or not supervisor.accepting:
        # A closed loop's supervisor is let go: its tasks can never run again, and they kept the loop (the weak key)
        # and their sessions alive (a sync wrapper's new loop per call, closed with tasks pending; QA).
        for closed in [other for other in _supervisors if other.is_closed()]:
            del _supervisors[closed]
        supervisor = _supervisors[loop] = TaskSupervisor()
    return supervisor


async def drain_supervisor(timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> ShutdownReport | None:  # noqa: ASYNC109
    """Shut down the running loop's supervisor, if one was created; call it before the loop ends.

    Returns:
        The shutdown report, or None when this loop has no supervisor.
    """
    supervisor = _supervisors.pop(asyncio.get_running_loop(), None)
    if supervisor is None:
        return None
    return await supervisor.shutdown(timeout)
