"""The ledger's spool on a file system that fails it: a write cut off part way (a full disk), a line torn by a crash.

A full disk takes what fits of a write, then refuses the rest (ENOSPC): the spool kept the torn line, and the next
append, once there was room, went on from it, so the replay set that next row aside (`.rejected`) with the torn one:
a row the tracker had reported `spooled` never reached the ledger. A file size limit (`RLIMIT_FSIZE`, in a process of
its own) cuts a write off the same way (EFBIG).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import text

from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import LedgerRecord, LLMRequestTracker, utc_now
from agentrt.services.ledger._record import row_to_json
from tests.factories import fast_config, ledger_record, ledger_rows, scalar

_CUT_OFF = """
import json, resource, sys
from pathlib import Path
from agentrt.services.ledger import LedgerSpool

spool = LedgerSpool(Path(sys.argv[1]))
first, big, last = json.loads(sys.argv[2])
spool.append([first])
# Room for 100 more bytes: the big entry's write is cut off part way, as on a disk that fills up under it.
resource.setrlimit(resource.RLIMIT_FSIZE, (spool.path.stat().st_size + 100, resource.RLIM_INFINITY))
try:
    spool.append([big])
    print('appended')
except OSError as exc:
    print('refused', exc.errno)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
spool.append([last])  # room again
"""


def _entry(record: LedgerRecord) -> dict[str, object]:
    return {'v': 1, 'row': row_to_json(record.to_row()), 'contents': []}


def _records(count: int) -> list[LedgerRecord]:
    now = utc_now()
    return [ledger_record(started_at=now, finished_at=now) for _ in range(count)]


async def test_an_append_cut_off_by_a_full_disk_leaves_no_torn_line_to_swallow_the_next_row(
    clean_database: None, tmp_path: Path
) -> None:
    tracker = LLMRequestTracker(fast_config(tmp_path))
    first, big, last = _records(3)
    big_entry = {**_entry(big), 'contents': [{'kind': 'prompt', 'body': 'x' * 5000}]}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, '-c', _CUT_OFF, str(tracker.spool.path), json.dumps([_entry(first), big_entry, _entry(last)])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith('refused'), 'the append that did not fit raised (the tracker then reports it)'
    lines = tracker.spool.path.read_text().splitlines()
    assert [json.loads(line)['row']['id'] for line in lines] == [str(first.id), str(last.id)], 'whole lines only'

    report = await tracker.replay_spool()
    assert (report.inserted, report.rejected) == (2, 0)
    assert not tracker.spool.rejected_path.exists()
    assert await scalar('SELECT count(*) FROM llm_requests') == 2


async def test_a_line_a_crash_tore_does_not_take_the_next_append_with_it(clean_database: None, tmp_path: Path) -> None:
    tracker = LLMRequestTracker(fast_config(tmp_path))
    kept, after = _records(2)
    tracker.spool.append([_entry(kept)])
    with tracker.spool.path.open('a') as handle:
        handle.write('{"v": 1, "row": {"id": "trunc')  # the process died mid-write
    tracker.spool.append([_entry(after)])
    report = await tracker.replay_spool()
    assert (report.inserted, report.rejected) == (2, 1)
    assert tracker.spool.rejected_path.read_text() == '{"v": 1, "row": {"id": "trunc\n'
    assert await scalar('SELECT count(*) FROM llm_requests') == 2


async def test_a_row_glued_to_a_torn_line_by_an_earlier_version_is_replayed(
    clean_database: None, tmp_path: Path
) -> None:
    # A spool written before appends cut off what they tore: the row after the torn write is on the same line.
    tracker = LLMRequestTracker(fast_config(tmp_path))
    (glued,) = _records(1)
    tracker.spool.path.parent.mkdir(mode=0o700)
    tracker.spool.path.write_text(
        '{"v":1,"row":{"id":"torn","model":"x' + json.dumps(_entry(glued), separators=(',', ':')) + '\n'
    )
    report = await tracker.replay_spool()
    assert (report.inserted, report.rejected) == (1, 1)
    assert tracker.spool.rejected_path.read_text() == '{"v":1,"row":{"id":"torn","model":"x\n'
    assert await scalar('SELECT count(*) FROM llm_requests WHERE id = :id', id=glued.id) == 1


async def _owner(*statements: str) -> None:
    async with get_db_session(account=Unscoped.OWNER) as session:
        for statement in statements:
            await session.execute(text(statement))


async def _disk_full_under_the_ledger() -> None:
    """The ledger's inserts meet PostgreSQL's disk-full error (SQLSTATE 53100), as on a full data directory."""
    await _owner(
        'CREATE FUNCTION agentrt_test_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION '
        "'could not extend file \"base/5/16514\": No space left on device' USING ERRCODE = 'disk_full'; END $$",
        'CREATE TRIGGER agentrt_test_disk_full BEFORE INSERT ON llm_requests '
        'FOR EACH ROW EXECUTE FUNCTION agentrt_test_disk_full()',
    )


async def _room_in_the_database() -> None:
    await _owner(
        'DROP TRIGGER IF EXISTS agentrt_test_disk_full ON llm_requests',
        'DROP FUNCTION IF EXISTS agentrt_test_disk_full()',
    )


@pytest_asyncio.fixture
async def full_database(clean_database: None) -> AsyncIterator[None]:
    await _disk_full_under_the_ledger()
    try:
        yield
    finally:
        await _room_in_the_database()


async def test_rows_neither_the_database_nor_the_spool_takes_are_held_then_written_once(
    full_database: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One full disk under the data directory and the default spool beside it: the rows were logged and lost. The
    # spool fails here because a directory stands where its file goes (an OSError, as ENOSPC is).
    tracker = LLMRequestTracker(fast_config(tmp_path))
    tracker.spool.path.mkdir(parents=True)
    first, second, after = _records(3)
    with caplog.at_level(logging.WARNING, logger='agentrt.ledger'):
        assert await asyncio.gather(tracker.track_request(first), tracker.track_request(second)) == ['held'] * 2
    assert tracker.stats.held == 2 and tracker.stats.lost == 0
    assert 'held in memory' in caplog.text and 'No space left on device' in caplog.text

    await _room_in_the_database()  # space freed: the next write succeeds and writes the held rows after it
    assert await tracker.track_request(after) == 'written'
    await tracker.flush()
    ids = {row['id'] for row in await ledger_rows()}
    assert ids == {first.id, second.id, after.id} and await scalar('SELECT count(*) FROM llm_requests') == 3
    await tracker.aclose()
    assert tracker.stats.lost == 0 and tracker.stats.spooled == 0


async def test_a_retry_of_the_held_rows_that_fails_is_logged_as_that_not_as_a_spool_replay(
    full_database: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The spool was empty and the rows held in memory could not be written yet (the database's disk still full):
    # the warning said "spool replay failed", sending an operator to a spool file with nothing in it.
    tracker = LLMRequestTracker(fast_config(tmp_path, replay_retry_seconds=0.05, replay_check_interval=0.2))
    tracker.spool.path.mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger='agentrt.ledger'):
        assert await tracker.track_request(_records(1)[0]) == 'held'
        for _ in range(100):  # the tracker comes back to the held rows on its own, a moment later
            if 'will retry' in caplog.text:
                break
            await asyncio.sleep(0.05)
    retried = [record.getMessage() for record in caplog.records if 'will retry' in record.getMessage()]
    assert retried, caplog.text
    assert retried[0].startswith('ledger: writing the rows held in memory failed ('), retried[0]
    assert 'spool replay failed' not in caplog.text
    await _room_in_the_database()
    await tracker.aclose()
    assert tracker.stats.lost == 0


async def test_held_rows_go_to_the_spool_once_it_takes_rows_again(
    full_database: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = LLMRequestTracker(fast_config(tmp_path))
    tracker.spool.path.mkdir(parents=True)
    held, later, at_close = _records(3)
    assert await tracker.track_request(held) == 'held'
    tracker.spool.path.rmdir()  # room on the spool's disk, the database's still full
    assert await tracker.track_request(later) == 'spooled'
    spooled = [json.loads(line)['row']['id'] for line in tracker.spool.path.read_text().splitlines()]
    assert spooled == [str(held.id), str(later.id)] and tracker.stats.spooled == 2

    # A row held when the process shuts down goes to the spool then, if it takes it.
    tracker.spool.path.rename(tracker.spool.path.with_name('aside'))
    tracker.spool.path.mkdir()
    assert await tracker.track_request(at_close) == 'held'
    tracker.spool.path.rmdir()
    tracker.spool.path.with_name('aside').rename(tracker.spool.path)
    await tracker.aclose()
    assert tracker.stats.spooled == 3 and tracker.stats.lost == 0

    await _room_in_the_database()
    report = await tracker.replay_spool()
    assert (report.inserted, report.rejected) == (3, 0)
    assert await scalar('SELECT count(DISTINCT id) FROM llm_requests') == 3
