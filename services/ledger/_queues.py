"""The tracker's in-memory state: rows being prepared and waiting for a group commit, and its counters."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from agentrt.services.ledger._journal import LoopJournal
from agentrt.services.ledger._record import LedgerRecord

WriteOutcome = Literal['written', 'spooled', 'held', 'lost']

STALL_FRACTION = 0.2
"""A writer's wake-up later than this fraction of the commit delay says the event loop stalled."""
STALL_MIN_SECONDS = 0.005
"""...and later than this in any case: a busy loop runs a due timer a millisecond or two late."""


@dataclass
class TrackerStats:
    """Counters for measuring the tracker, cumulative since it was created."""

    submitted: int = 0
    written: int = 0
    spooled: int = 0
    held: int = 0
    """Rows neither the database nor the spool took, kept in memory for a later write (counted once each)."""
    lost: int = 0
    retries: int = 0
    batches: int = 0
    largest_batch: int = 0
    batch_seconds: float = 0.0
    ack_seconds: float = 0.0
    contents_written: int = 0
    content_failures: int = 0
    replayed_rows: int = 0
    replay_duplicates: int = 0
    journaled: int = 0
    """Rows written to the journal while held (`_journal.py`): what a process killed then would not have lost."""
    stalls: int = 0
    """Times the writer woke up late enough to say its event loop had stalled (`LoopQueues.sleep_past_stalls`), which
    restarted the commit delay of the rows waiting then."""

    def as_dict(self) -> dict[str, Any]:
        """The counters, plus mean rows per batch and mean time from submit to durable acknowledgement."""
        acked = self.written + self.spooled
        return {
            **asdict(self),
            'mean_batch_rows': acked / self.batches if self.batches else 0.0,
            'mean_ack_ms': 1000 * self.ack_seconds / acked if acked else 0.0,
        }


@dataclass(slots=True)
class PendingRow:
    """A row submitted to the tracker and the future its submitter may await."""

    record: LedgerRecord
    future: asyncio.Future[WriteOutcome]
    submitted: float
    waits_from: float
    """When its commit delay started: `submitted`, or once (a row's delay restarts at most once, so a row whose
    `waits_from` is not `submitted` any more has had its restart) as its event loop came back from a stall
    (`LoopQueues.sleep_past_stalls`)."""
    prepared: asyncio.Future[None] | None = None
    """The record's `prepare()` running in a worker thread; None when there was nothing worth a thread."""
    sealing: bool = False
    """Its record waits to be sealed (a response pydantic-ai stamps after it was recorded) before it is prepared."""
    journaled: bool = False
    """Written to its loop's journal (`_journal.py`) while held for the commit delay or a retry."""
    hurried: object | None = None
    """Set (to a token shared by the rows of one run) when its run ended: commit it without the commit delay, as soon
    as every row with the same token is ready."""
    spooled: bool = False
    """Handed to the spool (`handed_to_spool`): by the writer's worker thread or by its event loop's end, whichever
    took it first; the other leaves it."""

    @property
    def ready(self) -> bool:
        """Sealed and prepared (or needing no preparation): it can join the next group commit."""
        return not self.sealing and (self.prepared is None or self.prepared.done())


# One lock for every tracker: a row is handed to the spool by a worker thread, or by the thread an event loop ends on.
_handing = threading.Lock()


def handed_to_spool(items: list[PendingRow]) -> list[PendingRow]:
    """The rows of `items` no one has handed to the spool yet, handed now (`PendingRow.spooled`): each row is spooled
    once. The writer's spool append runs in a worker thread, which its event loop's end does not stop: the loop's end
    spooled the rows the writer still held as well, each twice in the spool (QA)."""
    with _handing:
        fresh = [item for item in items if not item.spooled]
        for item in fresh:
            item.spooled = True
    return fresh


@dataclass
class LoopQueues:
    """The writer state of one event loop: a tracker may serve several (threads, successive `asyncio.run`s)."""

    pending: list[PendingRow] = field(default_factory=list)
    inflight: list[PendingRow] = field(default_factory=list)
    ledger_task: asyncio.Task[None] | None = None
    replay_task: asyncio.Task[None] | None = None
    replay_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wakeup: asyncio.Future[None] | None = None
    """Set while the writer waits: for a row to be ready, a run to end, or its commit delay to pass."""
    flushing: int = 0
    """How many `flush()` calls are waiting: while any is, the writer commits what is ready at once."""
    comeback: asyncio.TimerHandle | None = None
    """Set while a try of the spool is due (`SpoolFallback.come_back_later`): rows were spooled or held."""
    comeback_after: float = 0.0
    """The wait before the due try (doubles while the database stays away; 0 once the spool was written)."""
    journal: LoopJournal = field(default_factory=LoopJournal)
    """This loop's journal of the rows the writer holds (`_journal.py`)."""
    loop_end: AsyncGenerator[None, None] | None = None
    """Finalised as the event loop ends: spools what is left (`LLMRequestTracker._spooled_as_the_loop_ends`). Held
    here, as the loop holds its async generators only weakly."""

    def wake(self) -> None:
        """Tell a waiting writer that something changed: a row is ready, a run ended, a flush started."""
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def sleep(self, seconds: float | None) -> None:
        """Wait until `wake()` is called, or `seconds` have passed (None: no time limit)."""
        loop = asyncio.get_running_loop()
        self.wakeup = loop.create_future()
        timer = None if seconds is None else loop.call_later(seconds, self.wake)
        try:
            await self.wakeup
        finally:
            self.wakeup = None
            if timer is not None:
                timer.cancel()

    async def sleep_past_stalls(self, seconds: float | None, delay: float) -> int:
        """`sleep(seconds)`; then, if the wake-up came later than a fifth of the commit `delay` (at least
        `STALL_MIN_SECONDS`), the event loop stalled (a full garbage collection, the process descheduled on a loaded
        machine, a step that held the loop): the rows whose delay ran out in the stall wait it again, from now, once
        each. Returns how many did (0: no stall).

        The delay is there so a run's rows share one transaction; a stall stops the run as much as the writer, so
        without this the run's first rows would be committed as the loop comes back, and its other rows in a second
        transaction a few milliseconds later (one demo turn in about a hundred at 0 ms model latency, each with a full
        collection of 60-80 ms in it). Once per row, so no row waits longer than twice the delay beyond the stalls.
        """
        due = None if seconds is None else time.perf_counter() + seconds
        await self.sleep(seconds)
        if due is None:
            return 0
        now = time.perf_counter()
        if now - due <= max(delay * STALL_FRACTION, STALL_MIN_SECONDS):
            return 0
        restarted = 0
        for item in self.pending:
            if item.waits_from == item.submitted and item.submitted + delay <= now:
                item.waits_from = now
                restarted += 1
        return restarted

    def tasks(self) -> list[asyncio.Task[Any]]:
        """The writer and replay tasks still running."""
        return [t for t in (self.ledger_task, self.replay_task) if t is not None and not t.done()]


SLOW_WRITE_SECONDS = 0.1
"""A batch's write still running after this long is slow (a healthy group commit takes a few milliseconds): the
writer's rows are journaled then, and again this often while it lasts (`SlowWriteWatch`)."""


class SlowWriteWatch:
    """Calls `journal` every `SLOW_WRITE_SECONDS` from the first on, until `cancel()`: a timer of the event loop, which
    costs a write that ends in time only its scheduling."""

    def __init__(self, loop: asyncio.AbstractEventLoop, journal: Callable[[], None] | None) -> None:
        self._loop = loop
        self._journal = journal
        self._timer = None if journal is None else loop.call_later(SLOW_WRITE_SECONDS, self._tick)

    def _tick(self) -> None:
        self._timer = self._loop.call_later(SLOW_WRITE_SECONDS, self._tick)
        if self._journal is not None:
            self._journal()

    def cancel(self) -> None:
        """The write ended: no more journaling for it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
