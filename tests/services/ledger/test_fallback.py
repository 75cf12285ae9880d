"""Rows neither the database nor the spool took (a full disk under both), held in memory: never gone without a trace.

The write of the held rows took them out of memory and gave them back only on an `Exception`: a cancellation (a
script's second `asyncio.run` ending the background replay its first write started, or a shutdown's timeout around
`aclose()` against a database that does not answer) dropped every held row, in no spool, no journal, no log line (QA).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agentrt.db.errors import DatabaseUnavailableError
from agentrt.services.ledger import LedgerSpool, LLMRequestTracker, RetryPolicy, _fallback
from tests.factories import content_rows, fast_config, ledger_record, scalar


class _Database:
    """The tracker's transaction opener, as a test sets it: `down` (refused at once), `stuck` (the transaction
    commits, then its reply never comes: `reached` is set), `hangs` (never answers) or `up`."""

    def __init__(self, tracker: LLMRequestTracker) -> None:
        self.state = 'down'
        self.reached = asyncio.Event()
        self._opened = tracker._session_factory

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[object]:
        if self.state == 'down':
            raise DatabaseUnavailableError('the ledger database cannot be reached (test)')
        if self.state == 'hangs':
            self.reached.set()
            await asyncio.sleep(3600)
        async with self._opened() as connection:
            yield connection
        if self.state == 'stuck':
            self.reached.set()
            await asyncio.sleep(3600)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool's disk is full: every append with rows is refused (ENOSPC)."""

    def refused(spool: LedgerSpool, entries: list[dict[str, object]]) -> None:
        if entries:
            raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(LedgerSpool, 'append', refused)


class _Disk:
    """The spool's disk: while `full`, every append with rows is refused (ENOSPC); `full = False` makes room."""

    full = True


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> _Disk:
    state = _Disk()
    append = LedgerSpool.append

    def appended(spool: LedgerSpool, entries: list[dict[str, object]]) -> None:
        if entries and state.full:
            raise OSError(errno.ENOSPC, 'No space left on device')
        append(spool, entries)

    monkeypatch.setattr(LedgerSpool, 'append', appended)
    return state


def _held_tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[LLMRequestTracker, _Database]:
    # One attempt, and no come-back timer within the test: the test decides when the held rows are tried.
    tracker = LLMRequestTracker(fast_config(tmp_path, retry=RetryPolicy(attempts=1), replay_retry_seconds=60))
    database = _Database(tracker)
    monkeypatch.setattr(tracker, '_session_factory', database.opened)
    return tracker, database


async def test_held_rows_whose_write_is_cancelled_are_held_again_and_written_once_later(
    clean_database: None, full_disk: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker, database = _held_tracker(tmp_path, monkeypatch)
    held = ledger_record()
    assert await tracker.track_request(held) == 'held'

    # The replay of the held rows commits them, then is cancelled before it hears so (`asyncio.run` ending).
    database.state = 'stuck'
    assert tracker.replay_pending_in_background()
    await asyncio.wait_for(database.reached.wait(), 10)
    replay = tracker._queues(asyncio.get_running_loop()).replay_task
    assert replay is not None
    replay.cancel()
    with pytest.raises(asyncio.CancelledError):
        await replay

    # Held again: the next write writes them after its own, once (the committed row is not inserted twice).
    database.state = 'up'
    after = ledger_record()
    assert await tracker.track_request(after) == 'written'
    await tracker.flush()
    assert await scalar('SELECT count(*) FROM llm_requests WHERE id = :id', id=held.id) == 1
    assert await scalar('SELECT count(*) FROM llm_requests') == 2
    assert len(await content_rows(held.id)) == 2
    await tracker.aclose()
    assert tracker.stats.lost == 0


async def test_a_close_cut_off_by_its_bound_reports_each_held_row_lost(
    clean_database: None,
    full_disk: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker, database = _held_tracker(tmp_path, monkeypatch)
    held = ledger_record()
    assert await tracker.track_request(held) == 'held'

    # At the stop the database does not answer (frozen, not down), and `shutdown_runtime` bounds the close.
    database.state = 'hangs'
    with caplog.at_level(logging.ERROR, logger='agentrt.ledger'), pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await tracker.aclose()
    assert database.reached.is_set()
    assert tracker.stats.lost == 1
    lost = [record.getMessage() for record in caplog.records if 'took this row' in record.getMessage()]
    assert len(lost) == 1 and str(held.id) in lost[0] and 'cut off' in lost[0], caplog.text
    assert await scalar('SELECT count(*) FROM llm_requests') == 0


async def test_rows_held_as_the_event_loop_ends_are_spooled_if_the_spool_takes_them_then(
    clean_database: None, disk: _Disk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A program ending `asyncio.run()` without `shutdown_runtime()` (which a turn does not need): the held rows were
    # left in memory, the spool never tried though it had room again, and the process exited with them unsaid (QA).
    tracker, database = _held_tracker(tmp_path, monkeypatch)
    held = ledger_record()

    async def program() -> None:
        assert await tracker.track_request(held) == 'held'
        disk.full = False  # room again before the loop ends

    await asyncio.to_thread(asyncio.run, program())
    assert [json.loads(line)['row']['id'] for line in tracker.spool.path.read_text().splitlines()] == [str(held.id)]
    assert not tracker._fallback._held and tracker.stats.spooled == 1 and tracker.stats.lost == 0
    database.state = 'up'
    assert (await tracker.replay_spool()).inserted == 1
    assert await scalar('SELECT count(*) FROM llm_requests WHERE id = :id', id=held.id) == 1
    await tracker.aclose()


async def test_rows_held_past_their_event_loop_are_written_by_a_later_loops_first_write(
    clean_database: None, disk: _Disk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The spool still refuses as the loop ends: held for the next event loop (a script's second `asyncio.run()`),
    # whose first successful write tries them, though the periodic check is not due: a write of this loop checked the
    # spool a moment ago. They were never tried, `lost` 0, no line at the exit (QA).
    tracker, database = _held_tracker(tmp_path, monkeypatch)
    database.state = 'up'
    assert await tracker.track_request(ledger_record()) == 'written'
    held = ledger_record()

    async def program() -> None:
        database.state = 'down'
        assert await tracker.track_request(held) == 'held'

    with caplog.at_level(logging.WARNING, logger='agentrt.ledger'):
        await asyncio.to_thread(asyncio.run, program())
    assert len(tracker._fallback._held) == 1 and 'the event loop ended with 1 row(s) held' in caplog.text
    database.state = 'up'
    assert await tracker.track_request(ledger_record()) == 'written'  # this test's loop: a later one
    await tracker.flush()
    assert await scalar('SELECT count(*) FROM llm_requests WHERE id = :id', id=held.id) == 1
    assert await scalar('SELECT count(*) FROM llm_requests') == 3
    assert not tracker._fallback._held and tracker.stats.lost == 0
    await tracker.aclose()


async def test_rows_held_are_written_as_their_loop_ends_though_the_replay_of_them_was_cancelled(
    clean_database: None, full_disk: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A script running one turn per `asyncio.run()`: the second loop's first write succeeds and starts the replay of
    # the held rows, which the loop's end cancels at once (with the loop's tasks); with the disk still full they were
    # reported lost at the exit, the database up all along (QA). The loop's end gives them one more bounded write.
    tracker, database = _held_tracker(tmp_path, monkeypatch)
    held = ledger_record()
    assert await tracker.track_request(held) == 'held'
    database.state = 'up'
    replay = asyncio.get_running_loop().create_task(tracker._fallback._write_held())
    await asyncio.sleep(0)
    replay.cancel()  # what `asyncio.run()` does to the loop's tasks before it closes its async generators
    with pytest.raises(asyncio.CancelledError):
        await replay
    assert len(tracker._fallback._held) == 1
    await tracker._fallback.write_held_as_the_loop_ends(replay, _fallback.LOOP_END_WRITE_SECONDS)
    assert await scalar('SELECT count(*) FROM llm_requests WHERE id = :id', id=held.id) == 1
    assert not tracker._fallback._held and tracker.stats.lost == 0

    # The database still away as the loop ends: bounded, and held again for the spool, a later loop or the exit.
    database.state = 'down'
    assert await tracker.track_request(ledger_record()) == 'held'
    database.state = 'hangs'
    await tracker._fallback.write_held_as_the_loop_ends(None, 0.3)
    assert len(tracker._fallback._held) == 1 and tracker.stats.lost == 0


async def test_rows_still_held_as_the_process_exits_are_spooled_or_each_reported_lost(
    clean_database: None, disk: _Disk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tracker, database = _held_tracker(tmp_path, monkeypatch)
    first, second = ledger_record(), ledger_record()
    assert await tracker.track_request(first) == 'held'
    assert tracker._fallback in _fallback._holding  # the process's exit hook (`_spooled_at_exit`) knows it

    # The exit with the spool still full: each row said, with its contents, and counted lost.
    with caplog.at_level(logging.ERROR, logger='agentrt.ledger'):
        tracker._fallback.spool_held_now(exiting=True)
    lost = [record.getMessage() for record in caplog.records if 'took this row' in record.getMessage()]
    assert len(lost) == 1 and str(first.id) in lost[0] and 'exited' in lost[0], caplog.text
    assert tracker.stats.lost == 1 and not tracker._fallback._held

    # The exit with room on the disk again: spooled, written by the next replay.
    assert await tracker.track_request(second) == 'held'
    disk.full = False
    tracker._fallback.spool_held_now(exiting=True)
    assert tracker.stats.spooled == 1 and tracker.stats.lost == 1
    database.state = 'up'
    assert (await tracker.replay_spool()).inserted == 1
    assert await scalar('SELECT count(*) FROM llm_requests') == 1
    await tracker.aclose()
