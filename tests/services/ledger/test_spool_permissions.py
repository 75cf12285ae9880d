"""The spool holds prompts and billing rows, and a replay writes whatever it finds into the ledger of any account:
it must be private. A data directory under a shared one (`AGENTRT_DATA_DIR=/tmp/agentrt`) puts the default spool in
`/tmp/ledger-spool`, a directory anyone could have made first."""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import pytest

from agentrt.db.errors import ConfigError
from agentrt.services.ledger import LedgerRecord, LedgerSpool, LLMRequestTracker, utc_now
from tests.factories import fast_config, ledger_record, scalar


def _row(record: LedgerRecord) -> dict[str, object]:
    row: dict[str, object] = record.spool_entry(None)['row']
    return row


def _forged_line() -> str:
    now = utc_now()
    return json.dumps({'v': 1, 'row': _row(ledger_record(started_at=now, finished_at=now)), 'contents': []}) + '\n'


async def test_a_spool_directory_others_may_write_is_neither_written_nor_replayed(tmp_path: Path) -> None:
    shared = tmp_path / 'ledger-spool'
    shared.mkdir()
    shared.chmod(0o777)  # made first by someone else, as /tmp/ledger-spool could be
    spool_path = shared / 'llm-ledger.jsonl'
    # A planted file a replay would take for one a crashed replay left behind: forged rows of any account.
    (shared / f'{spool_path.name}.replaying-1-1').write_text(_forged_line())
    tracker = LLMRequestTracker(fast_config(tmp_path, spool_path=spool_path))
    with pytest.raises(ConfigError, match='writable by others'):
        await tracker.replay_spool()
    assert await scalar('SELECT count(*) FROM llm_requests') == 0
    assert tracker.spool.pending_files() == []
    with pytest.raises(ConfigError, match=str(shared)):
        tracker.spool.append([{'v': 1, 'row': {}, 'contents': []}])
    assert not spool_path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason='making a directory another user owns needs root')
async def test_a_spool_directory_another_user_owns_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / 'ledger-spool'
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    spool = LedgerSpool(theirs / 'llm-ledger.jsonl')
    with pytest.raises(ConfigError, match='owned by'):
        spool.append([{'v': 1, 'row': {}, 'contents': []}])
    with pytest.raises(ConfigError, match='owned by'), spool.replay_lock():
        pass


async def test_a_spool_path_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    directory = tmp_path / 'spool'
    directory.mkdir(mode=0o700)
    victim = tmp_path / 'victim'
    victim.write_text('keep me\n')
    spool = LedgerSpool(directory / 'llm-ledger.jsonl')
    spool.path.symlink_to(victim)
    with pytest.raises(OSError):
        spool.append([{'v': 1, 'row': {}, 'contents': []}])
    assert victim.read_text() == 'keep me\n'


async def test_a_spool_symlink_to_a_file_of_spooled_rows_is_not_replayed(tmp_path: Path) -> None:
    # The privacy check looks at the directory holding the link; its target, a file anyone could write, was
    # replayed into the ledger and the link renamed away (QA).
    directory = tmp_path / 'spool'
    directory.mkdir(mode=0o700)
    public = tmp_path / 'public'
    public.mkdir(mode=0o777)
    planted, forged = public / 'rows.jsonl', _forged_line()
    planted.write_text(forged)
    tracker = LLMRequestTracker(fast_config(tmp_path, spool_path=directory / 'llm-ledger.jsonl'))
    tracker.spool.path.symlink_to(planted)
    assert tracker.spool.pending_files() == []
    report = await tracker.replay_spool()
    assert report.rows == 0 and await scalar('SELECT count(*) FROM llm_requests') == 0
    assert tracker.spool.path.is_symlink() and planted.read_text() == forged  # both left as they were


async def test_lines_set_aside_are_as_private_as_the_spool(tmp_path: Path) -> None:
    tracker = LLMRequestTracker(fast_config(tmp_path))
    tracker.spool.append([{'v': 1, 'row': _row(ledger_record(started_at=utc_now(), id=uuid.uuid4())), 'contents': []}])
    tracker.spool.path.write_text(tracker.spool.path.read_text() + '{"v": 1, "row": {"id": "torn, with a prompt')
    old = os.umask(0o022)  # the usual one: a file opened with open(..., 'a') was readable by everyone
    try:
        report = await tracker.replay_spool()
    finally:
        os.umask(old)
    assert report.rejected == 1
    assert stat.S_IMODE(tracker.spool.rejected_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(tracker.spool.path.parent.stat().st_mode) == 0o700
