"""Text PostgreSQL cannot store (NUL, lone surrogates) and text too long for its column, in every string column of a
ledger row: the row is written with U+FFFD in place of each unstorable character and cut to its column, exactly once,
its contents still reference it and the rollup counts it; a spool line written before rows were cleaned replays."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import String, Table

from agentrt.db.models.ledger import LLMRequestRow
from agentrt.db.session import Unscoped, get_read_only_session
from agentrt.services.ledger import LLMRequestTracker, roll_up_pending
from agentrt.services.ledger._contents import Body
from agentrt.services.ledger._record import _STRING_LIMITS, ERROR_MESSAGE_MAX_CHARS, ROW_FIELDS, row_to_json
from tests.factories import content_rows, fast_config, ledger_record, ledger_rows, scalar

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)
_TABLE = cast(Table, LLMRequestRow.__table__)
# Every text column of the row (`status` is not text anyone but the ledger sets: a CHECK constraint guards it).
TEXT_COLUMNS = [
    column.name
    for column in _TABLE.columns
    if isinstance(column.type, String) and column.name in ROW_FIELDS and column.name != 'status'
]
HUGE = 1 << 20

# Each value, and what the column stores (for the huge value: its start, cut to the column's size).
CASES: dict[str, tuple[str, str]] = {
    'nul-start': ('\x00start', '\ufffdstart'),
    'nul-middle': ('mid\x00dle', 'mid\ufffddle'),
    'nul-end': ('end\x00', 'end\ufffd'),
    'high-surrogate': ('high\ud800', 'high\ufffd'),
    'low-surrogate': ('\udfffl\udc80ow', '\ufffdl\ufffdow'),
    'huge': ('\x00big\ud800' + 'x' * HUGE + '\x00', '\ufffdbig\ufffd' + 'x' * HUGE),
}
# JSON with the same characters, in keys and values, as a body stores it (a request's metadata, say).
METADATA = {'metadata': {'k\x00ey': 'v\ud800', 'nested': ['\x00', {'\udc80': 'end\x00'}]}}


def _limit(name: str) -> int:
    length = cast(String, _TABLE.c[name].type).length
    return ERROR_MESSAGE_MAX_CHARS if length is None else length


def test_every_text_column_is_cleaned_and_cut_to_its_size() -> None:
    assert {'model', 'agent_name', 'provider', 'error_type', 'error_message', 'account_slug'} <= set(TEXT_COLUMNS)
    # `storable_row` cleans the columns it knows the size of: a new text column must be added to it.
    assert _STRING_LIMITS == {name: _limit(name) for name in [*TEXT_COLUMNS, 'status']}


@pytest.mark.parametrize('case', CASES)
async def test_unstorable_text_in_any_column_is_written_cleaned_once(tracker: LLMRequestTracker, case: str) -> None:
    value, stored = CASES[case]
    records = {
        name: ledger_record(**{name: value}, raw_contents=[('prompt', Body(METADATA)), ('response', b'{"parts": []}')])
        for name in TEXT_COLUMNS
    }
    # One batch: before the fix, each of these rows was refused and went to the spool, for good.
    outcomes = await asyncio.gather(*(tracker.submit(record) for record in records.values()))
    assert outcomes == ['written'] * len(records)
    assert await asyncio.gather(*(tracker.submit(record) for record in records.values())) == ['written'] * len(records)
    assert not tracker.spool.has_pending() and tracker.stats.spooled == 0

    rows = {row['id']: row for row in await ledger_rows()}
    assert len(rows) == len(records), 'each row once, though submitted twice'
    for name, record in records.items():
        assert rows[record.id][name] == stored[: _limit(name)], name
        contents = {content['kind']: content for content in await content_rows(record.id)}
        assert sorted(contents) == ['prompt', 'response'], name
        assert json.loads(contents['prompt']['body']) == METADATA  # escaped in the JSON, nothing lost

    assert await roll_up_pending(LONG_AGO) >= 1
    assert await scalar('SELECT sum(requests) FROM usage_daily_rollups') == len(records)
    assert await roll_up_pending(LONG_AGO) == 0


def _old_spool_entry(name: str, value: str) -> dict[str, Any]:
    """A spool line as the ledger wrote it before rows were cleaned: the value cut to its column, nothing replaced."""
    record = ledger_record(**{name: value[: _limit(name)]})
    row = {field: getattr(record, field) for field in ROW_FIELDS}
    content = {'kind': 'prompt', 'body': '{"k":"\\u0000 \\ud800"}', 'size_bytes': 24, 'truncated': False}
    return {'v': 1, 'row': row_to_json(row), 'contents': [{**content, 'redactions': 0}]}


async def test_a_spool_line_written_before_rows_were_cleaned_replays(tracker: LLMRequestTracker) -> None:
    entries = {(name, case): _old_spool_entry(name, CASES[case][0]) for name in TEXT_COLUMNS for case in CASES}
    # And contents a hand or an old version left unstorable: cleaned as the row is.
    entries['error_message', 'nul-start']['contents'][0]['body'] = 'raw\x00body\ud800'
    tracker.spool.append(list(entries.values()))
    assert '\\u0000' in tracker.spool.path.read_text() and '\\ud800' in tracker.spool.path.read_text()

    report = await tracker.replay_spool()
    assert (report.rows, report.inserted, report.rejected) == (len(entries), len(entries), 0)
    assert report.contents == len(entries) and not tracker.spool.has_pending()
    rows = {str(row['id']): row for row in await ledger_rows()}
    for (name, case), entry in entries.items():
        assert rows[entry['row']['id']][name] == CASES[case][1][: _limit(name)], (name, case)
        [content] = await content_rows(rows[entry['row']['id']]['id'])
        cleaned = (name, case) == ('error_message', 'nul-start')
        assert content['body'] == ('raw\ufffdbody\ufffd' if cleaned else entry['contents'][0]['body'])
    assert (await tracker.replay_spool()).rows == 0


async def test_a_row_the_database_refuses_is_set_aside_and_the_rows_beside_it_replay(
    tracker: LLMRequestTracker,
) -> None:
    """Rows are replayed 500 to a statement: one whose values the database refuses (a hand-edited status, a number
    out of range) no longer holds back the others replay after replay; it goes to the `.rejected` file."""
    good = [ledger_record() for _ in range(3)]
    bad_status, too_big = ledger_record(), ledger_record(run_step=2**40)
    entries = [record.spool_entry(1 << 20) for record in (good[0], bad_status, good[1], too_big, good[2])]
    entries[1]['row']['status'] = 'bogus'  # the CHECK constraint refuses it
    tracker.spool.append(entries)

    report = await tracker.replay_spool()
    assert (report.rows, report.inserted, report.rejected, report.contents) == (3, 3, 2, 6)
    assert {row['id'] for row in await ledger_rows()} == {record.id for record in good}
    rejected = [json.loads(line) for line in tracker.spool.rejected_path.read_text().splitlines()]
    assert [entry['row']['id'] for entry in rejected] == [str(bad_status.id), str(too_big.id)]
    assert not tracker.spool.has_pending()


async def test_a_statement_that_fails_whatever_the_rows_keeps_the_spool(tmp_path: Path) -> None:
    """Not the rows' fault (here a read-only transaction; a schema not migrated yet is another): nothing is set
    aside, the file stays for a later replay, which writes it."""
    entries = [ledger_record().spool_entry(None) for _ in range(2)]
    read_only = LLMRequestTracker(
        fast_config(tmp_path), session_factory=lambda: get_read_only_session(account=Unscoped.LEDGER)
    )
    read_only.spool.append(entries)
    with pytest.raises(Exception, match='read-only transaction'):
        await read_only.replay_spool()
    assert read_only.spool.has_pending() and not read_only.spool.rejected_path.exists()
    assert (await LLMRequestTracker(fast_config(tmp_path)).replay_spool()).inserted == 2
