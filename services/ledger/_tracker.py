"""`LLMRequestTracker`: writes ledger rows in sessions of its own, group-committed, retried, spooled, never lost."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any

from opentelemetry import trace

from agentrt.db.driver import DriverTransaction, driver_transaction
from agentrt.db.engine import refused_after_shutdown, runtime_shut_down
from agentrt.db.forks import forget_in_child
from agentrt.db.roles import Unscoped
from agentrt.db.transaction_setup import TransactionSetup
from agentrt.services.budgets import WINDOW_LOCK
from agentrt.services.ledger._config import LedgerConfig
from agentrt.services.ledger._fallback import LOOP_END_WRITE_SECONDS, SpoolFallback
from agentrt.services.ledger._prepare import start_preparing
from agentrt.services.ledger._queues import LoopQueues, PendingRow, SlowWriteWatch, TrackerStats, WriteOutcome
from agentrt.services.ledger._record import LedgerRecord
from agentrt.services.ledger._replay import ReplayReport
from agentrt.services.ledger._retry import RetryPolicy, retry_transient
from agentrt.services.ledger._schedule import Prepare, commit_wait, contents_of, seal_stamped, take_ready
from agentrt.services.ledger._spool import LedgerSpool
from agentrt.services.ledger._writes import SessionFactory, database_unavailable, write_ledger_rows

logger = logging.getLogger('agentrt.ledger')
_tracer = trace.get_tracer('agentrt.ledger')

__all__ = [
    'LLMRequestTracker',
    'ReplayReport',
    'TrackerStats',
    'WriteOutcome',
    'get_request_tracker',
    'set_request_tracker',
]


class LLMRequestTracker:
    """Writes one ledger row per model request, never in the caller's session, and never loses one to the database.

    `submit()` queues a record and returns a future that resolves once the row is durable: committed
    (`'written'`) or, when the database stays unreachable through every retry, appended to the fsynced
    spool file (`'spooled'`). A record's bodies are prepared (pricing, secrets checked, redaction, serialisation) as
    it is submitted when they are small and hold no possible secret (a check of a fraction of a millisecond), and
    otherwise in a worker thread, never on the event loop (`_prepare.py`); records are prepared side by side, so a
    huge hostile message delays only its own row. One writer task group-commits the rows that are ready, with their
    contents and the settlement of their budget holds, in one statement of one transaction (`_writes.py`: `INSERT
    ... ON CONFLICT DO NOTHING`, on a connection of its own with lock and statement timeouts), so 200 concurrent
    chats cost one connection, not 200. The spool is replayed after a later successful write, on a backing-off timer
    once this tracker spooled or held rows (`_fallback.py`), at the start of a long-lived process
    (`replay_pending_in_background()`), and by `replay_spool()`. Nothing raises into the caller:
    failures are logged and counted in `stats`.

    The commit delay (`LedgerConfig.commit_delay_ms`, `AGENTRT_LEDGER_COMMIT_DELAY_MS`, 50 ms by default): a ready row
    waits for more rows, up to the delay after it was submitted, before the writer commits it (PostgreSQL's
    `commit_delay`, in the process). It never delays a run: the run's end, or its cancellation or failure
    (`commit_now()`, called by the ledger capability), `track_request()`, `flush()` and a full batch
    (`max_batch_rows`, `max_batch_content_bytes`) commit at once, a run's rows together once the last is prepared.
    So the rows of a run whose requests all end within the delay (a fast model, the demo at 0 ms) share one
    transaction, and rows of concurrent runs share commits; the rows of a run whose model requests take longer than
    the delay are each committed the delay after their request, as before but later. The delay counts the time the
    event loop runs: a stall of the loop (a full garbage collection, the process descheduled) that wakes the writer
    late restarts the delay of the rows that came due in it, once per row (`LoopQueues.sleep_past_stalls`), so a run
    stopped by the stall as much as the writer still commits its rows together.

    A record whose response body is not sealed yet (`ResponseBody`: the ledger takes a response's content once
    pydantic-ai has stamped it, at the run's next model request or its end) is prepared once sealed; the writer seals
    it itself, as the response is then, when its commit delay passed, its run ended or a flush waits, and takes it
    along when a batch is due and pydantic-ai has stamped it (`_schedule.py`): no row waits longer than
    it did before.

    What the delay costs, precisely: a row is durable only once committed. Until then it is in this process's memory;
    the spool covers a database that cannot be reached, and the journal (`_journal.py`) a process that dies (SIGKILL,
    out of memory): a prepared row the writer holds, for the delay or through the retries of a database that is away,
    is written to the journal first, which a later replay takes over once the process is gone (exactly once, by the
    row's minted key); so is a batch whose write runs longer than `SLOW_WRITE_SECONDS` (a database that hangs), with
    the rows that come ready behind it (`_journal_if_slow`). A run seals its responses at its next model request
    (`bodies_sealed()` prepares and journals their rows then), so the rows of a fast run, held until its end, are
    journaled as it goes. A crash at a moment t still loses: a row whose response was not sealed yet (its run's tools
    still running, at most the delay, after which it is committed), a row being prepared at t or in a write that began
    less than 100 ms before, and on a crash of the host (power loss) what the journal held, since it is not fsynced
    (a flush per held row). The provider billed those requests, and their budget holds are released by the sweeper
    without their cost being charged. A request in flight at t is lost either way (its row is built from its
    response). A clean shutdown (`aclose()`; an event loop that closes spools what it held) loses nothing. 0 turns the
    delay off: each row committed as soon as it is ready.
    """

    def __init__(self, config: LedgerConfig | None = None, *, session_factory: SessionFactory | None = None) -> None:
        """Create a tracker. It holds no session: it opens one per batch.

        Args:
            config: settings; `LedgerConfig.from_env()` when omitted.
            session_factory: opens the writer's transaction (a `driver_transaction()`, a session or a Core
                connection); a `driver_transaction()` with the config's timeouts by default.
        """
        self.config = config or LedgerConfig.from_env()
        self._session_factory = session_factory or self._side_session
        self._setup = TransactionSetup(
            lock_timeout_ms=int(self.config.lock_timeout_ms),
            statement_timeout_ms=int(self.config.statement_timeout_ms),
            shared_lock=WINDOW_LOCK,  # a budget window's row is never created while this write is in flight
        )
        self.stats = TrackerStats()
        self._by_loop: dict[asyncio.AbstractEventLoop, LoopQueues] = {}
        self._by_loop_lock = threading.Lock()
        # Through the attribute, so a transaction opener set on the tracker later (a test's) is the fallback's too.
        self._fallback = SpoolFallback(self.config, self.stats, lambda: self._session_factory())

    def _side_session(self) -> AbstractAsyncContextManager[DriverTransaction]:
        """The writer's transaction: the driver connection of a pooled connection (`driver_transaction`) as the
        ledger's role with tight timeouts (as a side session's), statement events and translated errors as a
        session's; a lost connection is retried by `_retrying` (the statement is idempotent)."""
        return driver_transaction(account=Unscoped.LEDGER, setup=self._setup)

    @property
    def spool(self) -> LedgerSpool:
        """The spool file this tracker appends to and replays."""
        return self._fallback.spool

    def submit(self, record: LedgerRecord) -> asyncio.Future[WriteOutcome]:
        """Queue `record` for the next group commit; never blocks, never raises for database reasons.

        Call it from a running event loop. Awaiting the future is optional, and the write happens even
        if the caller is cancelled (await it through `asyncio.shield`). Contents are written in the row's own
        transaction (or just after it, when the database refused them), so the future resolves after them.

        Args:
            record: the ledger row, with its raw contents.
        """
        loop = asyncio.get_running_loop()
        queues = self._queues(loop)
        future: asyncio.Future[WriteOutcome] = loop.create_future()
        now = time.perf_counter()
        item = PendingRow(record, future, now, now)
        if self.config.content_cap is not None and not record.sealed():
            item.sealing = True  # prepared once sealed (`_schedule.seal_due`)
            queues.wake()
        else:
            self._prepare(loop, queues, item)
        queues.pending.append(item)
        self.stats.submitted += 1
        if queues.ledger_task is None or queues.ledger_task.done():
            # A context of its own: the writer outlives the request that started it and writes other requests' rows,
            # so its spans must not join that request's trace (each batch is a trace of its own).
            queues.ledger_task = loop.create_task(
                self._ledger_worker(queues), name='agentrt-ledger-writer', context=contextvars.Context()
            )
            queues.ledger_task.add_done_callback(lambda task: self._ledger_done(queues, task))
        return future

    def _prepare(
        self, loop: asyncio.AbstractEventLoop, queues: LoopQueues, item: PendingRow, *, wake: bool = True
    ) -> None:
        """Start preparing the record of `item` (here when that is quick, else in a worker thread); the writer is
        woken once it is ready (unless `wake` is False and it was quick: its timer is for its commit delay)."""
        item.prepared = start_preparing(loop, item.record, self.config.content_cap)
        if item.prepared is None:
            if wake:
                queues.wake()
        else:
            item.prepared.add_done_callback(lambda _: queues.wake())

    def _preparer(self, queues: LoopQueues) -> Prepare:
        """`_prepare` for the rows of `queues`, on the running event loop (its writer's)."""
        loop = asyncio.get_running_loop()
        return lambda item: self._prepare(loop, queues, item)

    def bodies_sealed(self) -> None:
        """A run sealed the responses it recorded (its next model request started): their rows are prepared now
        rather than when their delay ends, and journaled (`_journal.py`) as the writer holds them for the delay: here
        when that is quick (the writer is not woken for it, its timer stands), else by the writer once a worker thread
        prepared them. Never blocks; call it from the loop that submitted them."""
        loop = asyncio.get_running_loop()
        queues = self._by_loop.get(loop)
        if queues is None or not self.config.journal:
            return
        self._journal(queues, [item for item in self._prepare_sealed(loop, queues) if item.ready])

    def _prepare_sealed(self, loop: asyncio.AbstractEventLoop, queues: LoopQueues) -> list[PendingRow]:
        """Start preparing the rows waiting to be sealed whose run sealed them; those rows (the writer is not woken
        for the quick ones: its timer stands)."""
        sealed = [item for item in queues.pending if item.sealing and item.record.sealed()]
        for item in sealed:
            item.sealing = False
            self._prepare(loop, queues, item, wake=False)
        return sealed

    def commit_now(self, futures: Iterable[asyncio.Future[WriteOutcome]]) -> None:
        """Commit the rows of `futures` (those not written yet) without waiting out the commit delay: their run ended.

        They are committed, with whatever else is ready, as soon as the last of them is prepared, so a run's rows
        still share one transaction. Never blocks; call it from the loop that submitted them.
        """
        queues = self._by_loop.get(asyncio.get_running_loop())
        waiting = {future for future in futures if not future.done()}
        if queues is None or not waiting:
            return
        token = object()
        for item in queues.pending:
            if item.future in waiting:
                item.hurried = token
        queues.wake()

    async def track_request(self, record: LedgerRecord) -> WriteOutcome:
        """Write one ledger row (its contents follow) and wait until it is durable; committed without delay.

        Returns:
            `'written'` once committed (with its contents, or with them given up on and logged), `'spooled'`
            when it went to the spool file instead, `'held'` if even the spool failed (a full disk): kept in memory
            and written once the database or the spool takes it again, lost only if the process ends first, or
            `'lost'` when memory set aside for that is full too (then the row is logged at error level).
        """
        future = self.submit(record)
        self.commit_now([future])
        return await asyncio.shield(future)

    async def flush(self) -> None:
        """Wait until everything this event loop queued (rows and contents, a running replay) is written or spooled;
        rows are committed without waiting out the commit delay meanwhile.

        Bound it with `asyncio.timeout()` if needed: the writers go on either way.
        """
        queues = self._queues(asyncio.get_running_loop())
        queues.flushing += 1
        try:
            while tasks := queues.tasks():
                queues.wake()
                await asyncio.wait(tasks)
        finally:
            queues.flushing -= 1

    async def aclose(self) -> None:
        """Flush; call it at shutdown (before `close_database()`) so contents are not left to the spool. Rows held in
        memory (neither the database nor the spool took them) are written or spooled now if either takes them, else
        reported lost, each logged; so are they when the close is cancelled or bounded (`asyncio.timeout`) first."""
        try:
            await self._close()
        except BaseException as exc:
            # Cut off (cancelled, or `shutdown_runtime`'s bound ran out) while the database did not answer: the rows
            # held in memory would end with the process unsaid; each is reported lost, as the docstring says.
            self._fallback.abandon(exc)
            raise
        finally:
            queues = self._queues(asyncio.get_running_loop())
            if queues.comeback is not None:  # the process is stopping: a later start replays what is left
                queues.comeback.cancel()
                queues.comeback = None
            queues.journal.close()

    async def _close(self) -> None:
        await self.flush()
        await self._fallback.close()

    async def replay_spool(self, policy: RetryPolicy | None = None) -> ReplayReport:
        """Write every spooled row and its contents to the database, exactly once, then delete the spool files.

        Args:
            policy: how patiently to retry the database; the writer's (`LedgerConfig.retry`) when None.

        Raises:
            Exception: a database error that outlived the retries; the spool files stay for the next replay.
        """
        return await self._fallback.replay(self._queues(asyncio.get_running_loop()), policy)

    def replay_pending_in_background(self) -> bool:
        """Start replaying the spool in a background task of this event loop if it holds rows (left by this process
        or an earlier one, e.g. one that spooled while the database was down and then exited); what a long-lived
        process (`agentrt serve`, `agentrt worker`) calls once the database is up, so those rows reach the costs
        without waiting for its first ledger write.

        The task is the one a successful write would start: tracked (`flush()`, `aclose()` wait for it), its own
        transactions, the cross-process replay lock (a replay already running elsewhere is left to finish), and a
        failure logged as a warning and retried on the tracker's timer or after the next successful write. Call it
        from a running event loop.

        It also logs a warning when the spool cannot take rows (`spool_warning`): said at the start, not found out
        during an outage.

        Returns:
            True when a replay was started, False when there was nothing to replay or one is already running.
        """
        if (warning := self.spool_warning()) is not None:
            logger.warning('%s', warning)
        return self._fallback.maybe_replay(self._queues(asyncio.get_running_loop()), at_start=True)

    def spool_warning(self) -> str | None:
        """What a long-lived process says at its start when its spool could not take rows, or None: the default spool
        under a home on a read-only file system (a container's), for one; a configured spool is refused with the rest
        of the configuration already. Said then, not found out during an outage."""
        return self._fallback.warning()

    def _queues(self, loop: asyncio.AbstractEventLoop) -> LoopQueues:
        """This loop's writer state (what it holds as the loop ends is spooled then: `_spooled_as_the_loop_ends`); what
        closed loops left behind (never flushed) goes to the spool."""
        queues = self._by_loop.get(loop)
        if queues is not None:
            return queues
        with self._by_loop_lock:
            for old in [old for old in self._by_loop if old.is_closed()]:
                left = self._by_loop.pop(old)
                self._fallback.spool_now(left.inflight + left.pending, 'event loop closed')
                left.journal.close(released=True)  # spooled: durable (or held in memory when even the spool refused)
            queues = self._by_loop.setdefault(loop, LoopQueues())
            queues.loop_end = self._spooled_as_the_loop_ends(queues)
            try:  # iterated once, here: the running loop's hooks know it from now on, and close it as the loop ends
                queues.loop_end.__anext__().send(None)
            except StopIteration:
                pass
            return queues

    async def _spooled_as_the_loop_ends(self, queues: LoopQueues) -> AsyncGenerator[None, None]:
        """Spool what `queues` still holds when its event loop ends (`asyncio.run()` closing the loop's async
        generators, once its tasks are cancelled and done), rather than when this process next writes a row.

        A task cut by the loop's end records its request as it unwinds (a cut request is recorded so); the writer that
        row starts is not among the tasks the loop's end cancels, and was in its write when the loop closed: the row
        in no spool or journal, and lost once the process exited (QA: a plain turn's, 2 runs in 4). A row the writer
        commits after all is replayed once, by its key.
        """
        try:
            yield
        finally:
            left, queues.inflight, queues.pending = queues.inflight + queues.pending, [], []
            if left:  # those the writer's spooling took (`spool_entries`, in a thread) are left to it
                self._fallback.spool_now(left, _loop_end_reason())
                queues.journal.close(released=True)  # spooled: durable (or held in memory when even the spool refused)
            # Rows held in memory (neither the database nor the spool took them): one bounded try at the database
            # first (a later loop's replay of them, started by its first write, was cut off by its end: lost at the
            # exit with the disk still full, QA), then spooled now if the spool takes them again; they were left to a
            # process exit that lost them unsaid (QA).
            await self._fallback.write_held_as_the_loop_ends(queues.replay_task, LOOP_END_WRITE_SECONDS)
            self._fallback.spool_held_now()
            if queues.ledger_task is not None:  # nothing left to write: ended in the loop's last steps, not destroyed
                queues.ledger_task.cancel()
            if queues.replay_task is not None:  # started as the turns unwound: held rows it took are given back
                queues.replay_task.cancel()

    async def _retrying(
        self,
        rows: list[dict[str, Any]],
        contents: list[dict[str, Any]],
        what: str,
        retrying: Callable[[], None] | None = None,
    ) -> None:
        def retried(exc: BaseException) -> None:
            self._fallback.retried(exc)
            if retrying is not None:
                retrying()

        await retry_transient(
            lambda: write_ledger_rows(self._session_factory, rows, contents),
            self.config.retry,
            what=what,
            on_retry=retried,
        )

    # --- ledger rows ---

    async def _ledger_worker(self, queues: LoopQueues) -> None:
        while queues.pending:
            wait = commit_wait(queues, self.config, self._preparer(queues))
            if wait is None or wait > 0:  # nothing ready yet, or the commit delay has not passed: wait for more
                if wait is not None:  # rows held for the delay: in the journal, so a killed process loses none
                    self._journal(queues, [item for item in queues.pending if item.ready])
                await self._wait_for_more(queues, wait)
                continue
            seal_stamped(queues, self._preparer(queues))
            batch = take_ready(queues, self.config)
            queues.inflight = batch
            watch = self._journal_if_slow(queues)
            try:
                outcomes = await self._write_batch(queues, batch)
            finally:
                watch.cancel()
            queues.inflight = []
            queues.journal.release(batch)
            now = time.perf_counter()
            for item, outcome in zip(batch, outcomes, strict=True):
                self.stats.ack_seconds += now - item.submitted
                if not item.future.done():
                    item.future.set_result(outcome)
        queues.ledger_task = None  # in the same step as the emptiness check: no submit can slip in between

    def _journal_if_slow(self, queues: LoopQueues) -> SlowWriteWatch:
        """Journal the batch being written, and the rows that come ready behind it, if its write is slow: a database
        that hangs rather than refuses (a stopped server, a network partition, a pooler queueing its clients) holds
        the first attempt up to its timeout, and the writer, inside it, journals nothing else meanwhile; a process
        killed then lost those rows, although their responses had been shown."""
        loop = asyncio.get_running_loop()

        def journal_held() -> None:
            self._prepare_sealed(loop, queues)  # a run that ended meanwhile: the writer cannot seal its last row now
            self._journal(queues, queues.inflight + [item for item in queues.pending if item.ready])

        return SlowWriteWatch(loop, journal_held if self.config.journal else None)

    async def _wait_for_more(self, queues: LoopQueues, wait: float | None) -> None:
        """Sleep until something changes or `wait` seconds pass; a wake-up late enough to say the event loop stalled
        restarts the commit delay of the rows that came due in the stall (`LoopQueues.sleep_past_stalls`)."""
        restarted = await queues.sleep_past_stalls(wait, self.config.commit_delay_ms / 1000)
        if restarted:
            self.stats.stalls += 1
            logger.debug('ledger writer: the event loop stalled; %d rows wait the commit delay again', restarted)

    def _ledger_done(self, queues: LoopQueues, task: asyncio.Task[None]) -> None:
        """Runs even for a task cancelled before it started (`asyncio.run()` ending): spool what it held."""
        if queues.ledger_task is task:
            queues.ledger_task = None
        if task.cancelled() or task.exception() is not None:
            leftovers, queues.inflight, queues.pending = queues.inflight + queues.pending, [], []
            reason = 'writer cancelled' if task.cancelled() else f'writer failed: {task.exception()!r}'
            self._fallback.spool_now(leftovers, reason)
            queues.journal.release(leftovers)

    def _journal(self, queues: LoopQueues, items: list[PendingRow]) -> None:
        """Journal the rows of `items` the writer holds (`LoopJournal.hold`), when the journal is on."""
        if self.config.journal:
            self.stats.journaled += queues.journal.hold(items, self.spool, self.config.content_cap)

    async def _write_batch(self, queues: LoopQueues, items: list[PendingRow]) -> list[WriteOutcome]:
        """Write the rows of `items` and their contents in one transaction; the outcome of each row."""
        started = time.perf_counter()
        rows = [item.record.to_row() for item in items]
        contents = [content for item in items for content in contents_of(item, self.config.content_cap)]
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        try:
            with _tracer.start_as_current_span(
                'ledger write', attributes={'rows': len(rows), 'contents': len(contents)}
            ):
                # Retrying: the rows wait in memory, maybe for minutes of an outage: in the journal meanwhile.
                await self._retrying(rows, contents, 'ledger write', lambda: self._journal(queues, items))
        except Exception as exc:
            if not database_unavailable(exc):
                if len(items) > 1:  # one bad row or body must not take the batch with it: one request at a time
                    return [outcome for item in items for outcome in await self._write_batch(queues, [item])]
                if contents:
                    return [await self._write_row_alone(queues, items[0], rows[0], exc)]
            if refused_after_shutdown(exc):  # said in an operator's terms; no replay is tried before the next start
                logger.warning(
                    'ledger: %d row(s) not written: the runtime had shut down (a turn still running at the stop); '
                    'they stay in the spool, written by the next start or `agentrt ledger replay`',
                    len(rows),
                )
            else:
                logger.warning('ledger: %d row(s) not written (%s: %s); spooling', len(rows), type(exc).__name__, exc)
            return [await self._fallback.spool_entries(queues, items)] * len(items)
        finally:
            self.stats.batch_seconds += time.perf_counter() - started
        self.stats.written += len(rows)
        self.stats.contents_written += len(contents)
        self._fallback.maybe_replay(queues)
        return ['written'] * len(items)

    async def _write_row_alone(
        self, queues: LoopQueues, item: PendingRow, row: dict[str, Any], refused: Exception
    ) -> WriteOutcome:
        """The database refused a request's row with its contents: store the row (billing) and log the contents."""
        try:
            await self._retrying([row], [], 'ledger write')
        except Exception as exc:
            logger.warning('ledger: 1 row not written (%s: %s); spooling', type(exc).__name__, exc)
            return await self._fallback.spool_entries(queues, [item])
        self.stats.written += 1
        self.stats.content_failures += 1
        logger.error(
            'ledger: content of request %s not stored (%s: %s)', item.record.id, type(refused).__name__, refused
        )
        self._fallback.maybe_replay(queues)
        return 'written'


_default_tracker: LLMRequestTracker | None = None


def _forget_the_parents() -> list[object]:
    """In a forked child: the parent's tracker holds the parent's rows (the parent writes them) and its writer on the
    parent's loop; the child makes a tracker of its own on first use (`agentrt.db.forks`)."""
    global _default_tracker
    left, _default_tracker = _default_tracker, None
    return [left]


forget_in_child(_forget_the_parents)


def get_request_tracker() -> LLMRequestTracker:
    """The process-wide tracker, configured from the environment on first use."""
    global _default_tracker
    if _default_tracker is None:
        _default_tracker = LLMRequestTracker()
    return _default_tracker


def existing_request_tracker() -> LLMRequestTracker | None:
    """The process-wide tracker if one was made (`get_request_tracker`), else None: for closing it without making
    one, which reads the settings (invalid ones raise again at a shutdown of a runtime that never started)."""
    return _default_tracker


def set_request_tracker(tracker: LLMRequestTracker | None) -> LLMRequestTracker | None:
    """Replace the process-wide tracker (e.g. with another configuration); returns the previous one."""
    global _default_tracker
    previous, _default_tracker = _default_tracker, tracker
    return previous


def _loop_end_reason() -> str:
    """Why rows are left as an event loop ends, for its log line: the runtime was shut down (`shutdown_runtime()`)
    before turns still running ended (its timeout ran out), or it was never shut down: the line said "(no
    shutdown_runtime())" either way (QA)."""
    if runtime_shut_down():
        return (
            'its event loop ended with rows unwritten, of turns still running after shutdown_runtime() (its timeout '
            'ran out)'
        )
    return 'its event loop ended with rows unwritten (no shutdown_runtime())'
