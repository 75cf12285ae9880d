"""What the ledger writer does with rows the database did not take: the spool, memory, and the replays that write them.

`SpoolFallback` is the writer's (`LLMRequestTracker`'s) second half: a batch the database refused through every retry
is appended to the fsynced spool file; when the spool refuses too (a full disk, often the same disk), the rows are held
in this process's memory (`HeldRows`, up to 64 MiB) and written by the next write that succeeds, lost and logged only
past that or if the process ends first. Spooled and held rows are written back exactly once (by each row's minted key)
by a replay: after a later successful write (of this event loop or a later one), on a backing-off timer of the event
loop while the database stays away (`come_back_later`), at a long-lived process's start, and on demand (`replay`).
Rows still held as an event loop ends, or as the process exits, are spooled then if the spool takes them
(`spool_held_now`); at the exit, those it refuses are reported lost, each logged.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import time
import weakref
from pathlib import Path
from typing import Any

from agentrt.db.engine import refused_after_shutdown, runtime_shut_down
from agentrt.db.forks import forget_in_child
from agentrt.db.settings import spool_write_problem
from agentrt.services.ledger._config import LedgerConfig
from agentrt.services.ledger._held import HELD_MAX_BYTES, HeldRows
from agentrt.services.ledger._queues import LoopQueues, PendingRow, TrackerStats, WriteOutcome, handed_to_spool
from agentrt.services.ledger._replay import ReplayReport, replay_spool, write_spooled_entries
from agentrt.services.ledger._retry import RetryPolicy
from agentrt.services.ledger._spool import LedgerSpool
from agentrt.services.ledger._writes import SessionFactory

logger = logging.getLogger('agentrt.ledger')

COMEBACK_TRY = RetryPolicy(attempts=1, attempt_timeout=5)
"""A timed try of the spool (`SpoolFallback._come_back`): one attempt of at most 5 s."""
LOOP_END_WRITE_SECONDS = 2.0
"""How long an ending event loop waits for the replay of the rows held in memory, then for one more write of them
(`write_held_as_the_loop_ends`): what a script's exit may take longer when the database and the spool both failed."""


class SpoolFallback:
    """The spool file, the rows held in memory when even the spool refuses them, and their replays, for one tracker.

    Its counters are the tracker's (`stats`); the database is reached through the tracker's transaction opener
    (`session_factory`), so what is set on the tracker holds here too.
    """

    def __init__(self, config: LedgerConfig, stats: TrackerStats, session_factory: SessionFactory) -> None:
        self.config = config
        self.stats = stats
        self._session_factory = session_factory
        self._spool: LedgerSpool | None = None
        self._dirty = False
        """This tracker spooled rows (or a replay failed) since its last replay: replay after the next write."""
        # Spool entries neither the database nor the spool took (a full disk under both): written by the next replay
        # task, or spooled with the next append that succeeds; lost only when the process ends first.
        self._held = HeldRows()
        self._last_check: float | None = None

    @property
    def spool(self) -> LedgerSpool:
        """The spool file rows are appended to and replayed from."""
        if self._spool is None:
            self._spool = LedgerSpool(self.config.resolved_spool_path())
        return self._spool

    def warning(self) -> str | None:
        """What a long-lived process says at its start when the spool could not take rows, or None: the default spool
        under a home on a read-only file system (a container's), for one; a configured spool is refused with the rest
        of the configuration already. Said then, not found out during an outage."""
        path: Path = self.spool.path
        try:
            problem = spool_write_problem(path)
        except OSError as exc:
            problem = f'{path} cannot be looked at ({exc.strerror or exc})'
        if problem is None:
            return None
        return (
            f"ledger: {problem}: rows written while the database is down would be held in this process's memory only "
            f'(up to {HELD_MAX_BYTES // 2**20} MiB) and lost if it ended first; set AGENTRT_LEDGER_SPOOL to a file it '
            'can write'
        )

    def retried(self, exc: BaseException) -> None:
        """Count a retry of the database (`RetryPolicy`'s `on_retry`)."""
        self.stats.retries += 1

    # --- rows the database did not take ---

    async def spool_entries(self, queues: LoopQueues, items: list[PendingRow]) -> WriteOutcome:
        """Append the rows of `items` to the spool, after the rows held in memory, in a worker thread; held in memory
        when the spool refuses them. The spool is tried again later whatever else happens.

        The thread takes the rows (`handed_to_spool`) and spools or holds them to the end even when this call is
        cancelled (its event loop ending), as the loop's end then spools only the rows no one took."""
        self.come_back_later(queues)  # spooled or held: written when the database is back
        return await asyncio.to_thread(self._spool_or_hold, items)

    def _spool_or_hold(self, items: list[PendingRow]) -> WriteOutcome:
        taken = handed_to_spool(items)
        if not taken:  # the event loop's end spooled them first
            return 'spooled'
        entries = [item.record.spool_entry(self.config.content_cap) for item in taken]
        try:
            held = self._append_after_held(entries)
        except Exception as exc:
            return self._spool_failed(entries, exc, len(taken))
        self._dirty = True
        self.stats.spooled += len(taken) + held
        return 'spooled'

    def spool_now(self, pending: list[PendingRow], reason: str) -> None:
        """Spool synchronously (the event loop is going away) and resolve the futures of `pending`.

        Rows still being prepared are prepared here, in this thread (their worker thread may still be at it). Rows the
        writer's spooling took already (`spool_entries`, cut off by the loop's end) are left to it.
        """
        pending = handed_to_spool(pending)
        entries = [item.record.spool_entry(self.config.content_cap) for item in pending]
        if not entries:
            return
        logger.warning(
            'ledger: %s; spooling %d row(s): the next ledger write or `agentrt ledger replay` writes them',
            reason,
            len(entries),
        )
        try:
            held = self._append_after_held(entries)
            self._dirty = True
            self.stats.spooled += len(pending) + held
            outcome: WriteOutcome = 'spooled'
        except Exception as exc:
            outcome = self._spool_failed(entries, exc, len(pending))
        for item in pending:
            if not item.future.done() and not item.future.get_loop().is_closed():
                item.future.set_result(outcome)

    async def close(self) -> None:
        """At shutdown, after the writer's flush: the rows still held in memory go to the spool, or else to the
        database once (without the writer's patient retries), or else are reported lost, each logged."""
        if not self._held:
            return
        try:
            appended = await asyncio.to_thread(self._append_after_held, [])
        except Exception as exc:
            refused = exc
        else:
            self.stats.spooled += appended
            return
        try:
            await self._write_held(RetryPolicy(attempts=1, attempt_timeout=5))
        except Exception as exc:
            self._lose(self._held.take(), f'{refused}; the database: {type(exc).__name__}: {exc}')

    def spool_held_now(self, *, exiting: bool = False) -> None:
        """The event loop ends (`asyncio.run()` without `shutdown_runtime()`), or the process exits (`exiting`), with
        rows held in memory: appended to the spool now if it takes them (a disk with room again), for the next replay.
        Else they stay held for a later event loop's first successful write, or, as the process exits, are reported
        lost, each logged. Blocking (a file's fsync); never raises.
        """
        if not self._held:
            return
        try:
            appended = self._append_after_held([])
        except Exception as exc:
            if exiting:
                self._lose(self._held.take(), f'the process exited; the spool: {type(exc).__name__}: {exc}')
            else:
                logger.warning(
                    'ledger: the event loop ended with %d row(s) held in memory (the spool: %s: %s); written by a '
                    "later event loop's first write, else lost when this process exits",
                    len(self._held),
                    type(exc).__name__,
                    exc,
                )
            return
        self._dirty = True
        self.stats.spooled += appended
        logger.warning(
            'ledger: %d row(s) held in memory spooled as %s: the next ledger write or `agentrt ledger replay` writes '
            'them',
            appended,
            'the process exits' if exiting else 'the event loop ended',
        )

    def abandon(self, exc: BaseException) -> None:
        """The close was cut off by `exc` (cancelled, or out of time: `shutdown_runtime` bounds it): the rows still held
        in memory end with the process, each reported lost and logged (the log line is the last record of the row).
        """
        self._lose(self._held.take(), f'the close was cut off ({type(exc).__name__}) before either took it')

    def _append_after_held(self, entries: list[dict[str, Any]]) -> int:
        """Append `entries` to the spool after the rows held in memory, which an earlier append could not take (they
        go first, with these): how many held rows went. Blocking (a file's fsync).

        Raises:
            Exception: the spool's error; the held rows are held again.
        """
        held = self._held.take()
        try:
            self.spool.append(held + entries)
        except BaseException:  # whatever ends the append (a KeyboardInterrupt too): the held rows are held again
            self._held.give_back(held)
            raise
        return len(held)

    def _spool_failed(self, entries: list[dict[str, Any]], exc: Exception, rows: int) -> WriteOutcome:
        """Neither the database nor the spool took `entries` (a full disk under both, often one disk: the default
        spool sits beside the data directory): kept in memory for the next write that succeeds, within
        `_held.HELD_MAX_BYTES` (64 MiB); beyond it, lost and logged (each row), as all of them were before."""
        if self._held.hold(entries):
            self.stats.held += rows
            _holding.add(self)  # spooled or reported lost as the process exits, if nothing took them by then
            logger.error(
                'ledger: neither the database nor the spool took %d row(s) (%s: %s); %d held in memory, written when '
                'either takes them again (lost if this process ends first)',
                rows,
                type(exc).__name__,
                exc,
                len(self._held),
            )
            return 'held'
        self._lose(entries, exc)
        return 'lost'

    def _lose(self, entries: list[dict[str, Any]], exc: BaseException | str) -> None:
        self.stats.lost += len(entries)
        for entry in entries:
            logger.error('ledger: neither the database nor the spool took this row (%s): %s', exc, entry['row'])

    # --- replays ---

    async def replay(self, queues: LoopQueues, policy: RetryPolicy | None = None) -> ReplayReport:
        """Write every spooled row and its contents to the database, exactly once, then delete the spool files
        (`LLMRequestTracker.replay_spool`); one replay of this event loop at a time.

        Raises:
            Exception: a database error that outlived the retries; the spool files stay for the next replay.
        """
        async with queues.replay_lock:
            report = await replay_spool(
                self.spool, self._session_factory, policy or self.config.retry, on_retry=self.retried
            )
        self.stats.replayed_rows += report.inserted
        self.stats.replay_duplicates += report.duplicates
        return report

    def maybe_replay(self, queues: LoopQueues, *, at_start: bool = False, policy: RetryPolicy | None = None) -> bool:
        """After a successful write, replay the spool if this tracker spooled, or now and then for other processes;
        `at_start` (`replay_pending_in_background`), whenever it holds rows. Whether a replay was started; never once
        the runtime has shut down (a turn cut off at the stop wrote after it): the next start replays."""
        if queues.replay_task is not None or runtime_shut_down():
            return False
        now = time.monotonic()
        due = self._last_check is None or now - self._last_check >= self.config.replay_check_interval
        # Rows held in memory: tried after any successful write, a later event loop's first one too (the timer that
        # would have tried them belonged to the loop that held them; QA: never tried, lost unsaid at the exit).
        if not (self._dirty or due or at_start or self._held):
            return False
        self._last_check = now
        try:
            pending = self._dirty or bool(self._held) or self.spool.has_pending()
        except OSError as exc:
            if at_start:
                logger.warning('ledger: the spool could not be read (%s); not replayed at start', exc)
            return False
        if not pending:
            return False
        self._dirty = False
        queues.replay_task = asyncio.get_running_loop().create_task(
            self._background_replay(queues, policy), context=contextvars.Context()
        )
        return True

    async def write_held_as_the_loop_ends(self, replay: asyncio.Task[None] | None, seconds: float) -> None:
        """The event loop ends with rows held in memory: let the replay under way finish, else write them once more,
        within `seconds` each; those not written stay held (for the spool, a later loop or the exit). Never raises.

        A replay of the held rows, started by the loop's first write that succeeded, is cancelled with the loop's
        tasks as `asyncio.run()` ends: a script running one turn per `asyncio.run()` never wrote them, and they were
        reported lost at the exit with the disk still full (QA), the database up all along.
        """
        if replay is not None and not replay.done():
            await asyncio.wait({replay}, timeout=seconds)
        if not self._held or runtime_shut_down():
            return
        try:
            await asyncio.wait_for(self._write_held(RetryPolicy(attempts=1)), seconds)
        except Exception as exc:  # held again (`_write_held`): the spool, a later loop or the exit decides
            logger.debug(
                'ledger: rows held in memory not written as the event loop ended (%s: %s)', type(exc).__name__, exc
            )

    async def _write_held(self, policy: RetryPolicy | None = None) -> None:
        """Write the rows held in memory, as a replay writes spooled ones (exactly once); put back if it fails or is
        cancelled."""
        held = self._held.take()
        if not held:
            return
        refused: list[str] = []
        try:
            counts = await write_spooled_entries(
                held, refused, self._session_factory, policy or self.config.retry, on_retry=self.retried
            )
        except BaseException:
            # Cancelled too (`asyncio.run` ending the background replay, a shutdown's timeout): taken, they were in no
            # spool and no journal, and were gone unlogged (QA). Written again later: each row is inserted only if
            # its minted id is new, and only a new row settles its budget hold, so nothing is written twice.
            self._held.give_back(held)
            raise
        self.stats.written += counts['inserted']
        logger.warning('ledger: wrote %d row(s) held in memory, %d new', counts['rows'], counts['inserted'])
        if refused:
            try:
                await asyncio.to_thread(self.spool.reject, refused)
            except Exception as exc:
                logger.error('ledger: %d refused row(s) not set aside (%s): %s', len(refused), exc, refused)

    async def _background_replay(self, queues: LoopQueues, policy: RetryPolicy | None = None) -> None:
        # Which of the two failed, for the warning: it said "spool replay failed" when the spool was empty and the
        # rows held in memory (a full disk) could not be written yet.
        step = 'writing the rows held in memory'
        try:
            await self._write_held(policy)
            step = 'spool replay'
            report = await self.replay(queues, policy)
            if report.rows:
                logger.info('ledger: replayed %d spooled row(s), %d new', report.rows, report.inserted)
            queues.comeback_after = 0.0
        except Exception as exc:
            self._dirty = True
            if refused_after_shutdown(exc):  # started before the stop, it reached the database after it: no retry
                logger.warning(
                    'ledger: %s stopped: the runtime had shut down; the rows stay in the spool, written by the next '
                    'start or `agentrt ledger replay`',
                    step,
                )
                return
            logger.warning('ledger: %s failed (%s: %s); will retry', step, type(exc).__name__, exc)
            self.come_back_later(queues)
        except asyncio.CancelledError:
            # Its loop ended (`asyncio.run` cancels what is left): the next loop's first write tries again at once.
            # It waited for the periodic check, and a script of short loops cancelled each try: the spooled rows
            # stayed out of the ledger until another process replayed them (QA).
            self._dirty = True
            raise
        finally:
            queues.replay_task = None

    def come_back_later(self, queues: LoopQueues) -> None:
        """Try the spool (and the rows held in memory) again later, whether or not anything else is written meanwhile:
        `replay_retry_seconds` after the first failure, twice as long after each further one, at most
        `replay_check_interval`. A timer of the event loop: it keeps nothing alive, and a loop that closes drops it.
        None once the runtime has shut down: each try failed (4 "will retry" lines in 30 s after a server's stop, QA),
        and the next start replays."""
        if queues.comeback is not None or runtime_shut_down():
            return
        first, most = self.config.replay_retry_seconds, max(self.config.replay_check_interval, 0.0)
        queues.comeback_after = min(max(queues.comeback_after * 2, first), max(most, first))
        queues.comeback = asyncio.get_running_loop().call_later(queues.comeback_after, self._come_back, queues)

    def _come_back(self, queues: LoopQueues) -> None:
        queues.comeback = None
        if queues.replay_task is not None:  # a replay is running: it comes back itself if it fails
            return
        if queues.flushing:  # a flush (a shutdown's) would wait for the try: later
            self.come_back_later(queues)
            return
        self._dirty = True  # try now, not at the next periodic check
        # One attempt, bounded: the timer is the retry, and a shutdown's flush that finds the try running waits for it.
        self.maybe_replay(queues, policy=COMEBACK_TRY)


_holding: weakref.WeakSet[SpoolFallback] = weakref.WeakSet()
"""Fallbacks that held rows in memory (`_spool_failed`): what they still hold as the process exits goes to the spool, or
is reported lost, each logged (`_spooled_at_exit`); a program ending without `shutdown_runtime()` left them unsaid."""


@atexit.register
def _spooled_at_exit() -> None:
    # Registered at import, after `logging`'s own exit hook: run before it (last in, first out), so the lines are said.
    for fallback in list(_holding):
        fallback.spool_held_now(exiting=True)


def _forget_the_parents() -> list[object]:
    """In a forked child, the rows held are the parent's (the parent spools or reports them): not the child's exit's."""
    global _holding
    left, _holding = _holding, weakref.WeakSet()
    return [left]


forget_in_child(_forget_the_parents)
