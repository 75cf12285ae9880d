"""Rows neither the database nor the spool took (a full disk under both), held in memory: never gone without a trace.

The write of the held rows took them out of memory and gave them back only on an `Exception`: a cancellation (a
script's second `asyncio.run` ending the background replay its first write started, or a shutdown's timeout around
`aclose()` against a database that does not answer) dropped every held row, in no spool, no journal, no log line (QA).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agentrt.db.errors import DatabaseUnavailableError
from agentrt.services.ledger import LedgerSpool, LLMRequestTracker, RetryPolicy
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
