"""The ledger's spool on a file system that fails it: a write cut off part way (a full disk), a line torn by a crash.

A full disk takes what fits of a write, then refuses the rest (ENOSPC): the spool kept the torn line, and the next
append, once there was room, went on from it, so the replay set that next row aside (`.rejected`) with the torn one:
a row the tracker had reported `spooled` never reached the ledger. A file size limit (`RLIMIT_FSIZE`, in a process of
its own) cuts a write off the same way (EFBIG).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from agentrt.services.ledger import LedgerRecord, LLMRequestTracker, utc_now
from agentrt.services.ledger._record import row_to_json
from tests.factories import fast_config, ledger_record, scalar

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
