"""A spool replayed a batch at a time: every row written once across batches, the lines set aside wherever they are,
and each batch read and parsed in a worker thread, not on the event loop."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from agentrt.services.ledger import LedgerRecord, LLMRequestTracker, _replay, utc_now
from agentrt.services.ledger._spool import LedgerSpool
from tests.factories import fast_config, ledger_record, scalar


def _entry(content_max_bytes: int | None = None) -> tuple[LedgerRecord, dict[str, Any]]:
    now = utc_now()
    record = ledger_record(started_at=now, finished_at=now)
    return record, record.spool_entry(content_max_bytes)


async def test_a_spool_of_several_batches_is_replayed_whole_with_its_bad_lines_set_aside_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_replay, 'REPLAY_CHUNK_ROWS', 2)
    tracker = LLMRequestTracker(fast_config(tmp_path))
    made = [_entry() for _ in range(5)]
    damaged = {**made[0][1], 'row': {**made[0][1]['row'], 'id': 12}}  # an id that is not text: never writable
    tracker.spool.append([entry for _, entry in made[:3]])
    with tracker.spool.path.open('a') as spool:
        spool.write('not a spooled row\n')
    tracker.spool.append([damaged, *(entry for _, entry in made[3:])])
    loop_thread = threading.current_thread()
    parsed_in: list[threading.Thread] = []
    batches: list[int] = []
    parse, read_batch = _replay.parse_spool_entry, LedgerSpool.read_batch

    def recorded_parse(entry: dict[str, Any]) -> Any:
        parsed_in.append(threading.current_thread())
        return parse(entry)

    def recorded_read(self: LedgerSpool, path: Path, offset: int, size: int) -> Any:
        batches.append(offset)
        return read_batch(self, path, offset, size)

    monkeypatch.setattr(_replay, 'parse_spool_entry', recorded_parse)
    monkeypatch.setattr(LedgerSpool, 'read_batch', recorded_read)
    report = await tracker.replay_spool()
    assert (report.rows, report.inserted, report.rejected) == (5, 5, 2)
    assert await scalar('SELECT count(*) FROM llm_requests') == 5
    assert (
        await scalar('SELECT count(DISTINCT id) FROM llm_requests WHERE id = ANY(:ids)', ids=[r.id for r, _ in made])
        == 5
    )
    assert (
        len(batches) >= 3 and batches[0] == 0 and len(set(batches)) == len(batches)
    )  # each batch from where the last ended
    assert len(parsed_in) == 6 and all(thread is not loop_thread for thread in parsed_in)
    rejected = tracker.spool.rejected_path.read_text().splitlines()
    assert rejected[0] == 'not a spooled row' and json.loads(rejected[1]) == json.loads(json.dumps(damaged))
    assert not tracker.spool.has_pending()


def test_read_batch_walks_a_file_in_batches_to_what_one_batch_of_the_whole_file_gives(tmp_path: Path) -> None:
    spool = LedgerSpool(tmp_path / 'spool' / 'ledger.jsonl')
    spool.append([_entry()[1] for _ in range(5)])
    with spool.path.open('a') as handle:
        handle.write('\n{"torn": \n')
    entries, bad, offset = [], [], 0
    while True:
        batch = spool.read_batch(spool.path, offset, 2)
        assert len(batch.entries) <= 2
        entries += batch.entries
        bad += batch.bad
        offset = batch.end
        if batch.done:
            break
    whole = spool.read_batch(spool.path, 0, 100)
    assert whole.done and (entries, bad) == (whole.entries, whole.bad)
    assert len(entries) == 5 and bad == ['{"torn": \n']


async def test_a_content_the_database_refuses_keeps_the_other_rows_contents_and_goes_to_rejected(
    tmp_path: Path,
) -> None:
    # One content of an unknown kind made the batch's contents statement fail: every row was written without its
    # contents, and the spool deleted, so the good rows' prompts and responses were lost (QA).
    tracker = LLMRequestTracker(fast_config(tmp_path))
    made = [_entry(content_max_bytes=100_000) for _ in range(3)]
    odd = {**made[1][1], 'contents': [{**made[1][1]['contents'][0], 'kind': 'bogus'}]}
    tracker.spool.append([made[0][1], odd, made[2][1]])
    report = await tracker.replay_spool()
    assert (report.rows, report.inserted, report.rejected) == (3, 3, 1)
    for record, entry in (made[0], made[2]):
        stored = await scalar('SELECT count(*) FROM llm_request_contents WHERE request_id = :id', id=record.id)
        assert stored == len(entry['contents']) > 0
    [rejected] = tracker.spool.rejected_path.read_text().splitlines()
    assert json.loads(rejected)['contents'][0]['kind'] == 'bogus'


@pytest.mark.parametrize(
    ('field', 'value'),
    [
        ('total_cost', '1e400'),
        ('total_cost', '-1'),
        ('total_cost', 'NaN'),
        ('total_cost', '1e-20000'),  # PostgreSQL's numeric cannot encode it: the row refused
        ('total_cost', '1e-400'),  # taken, and every sum carried 400 digits (QA)
        ('input_tokens', -5),
        ('input_tokens', 2**61),  # fits its column, overflowed every sum of them (QA)
        ('latency_ms', -1),
    ],
)
async def test_a_spooled_row_with_an_amount_no_request_has_is_set_aside(
    tmp_path: Path, field: str, value: object
) -> None:
    # The database took them: `agentrt costs` then reported 10^400 USD (QA).
    tracker = LLMRequestTracker(fast_config(tmp_path))
    (good, entry), (bad, damaged) = _entry(), _entry()
    damaged = {**damaged, 'row': {**damaged['row'], field: value}}
    tracker.spool.append([entry, damaged])
    report = await tracker.replay_spool()
    assert (report.rows, report.inserted, report.rejected) == (1, 1, 1)
    assert await scalar('SELECT count(*) FROM llm_requests WHERE id = :id', id=bad.id) == 0
    assert await scalar('SELECT count(*) FROM llm_requests WHERE id = :id', id=good.id) == 1
