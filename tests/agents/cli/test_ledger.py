"""`agentrt ledger replay`: spooled rows written once, however often it runs; one run in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from agentrt.services.ledger import LedgerSpool
from tests.agents.cli.conftest import cli_record
from tests.agents.cli.helpers import invoke, run_cli
from tests.factories import journal_left_by_a_killed_process, scalar


async def test_ledger_replay_writes_spooled_rows_once(tmp_path: Path, database_url: str):
    spool = LedgerSpool(tmp_path / 'spool.jsonl')
    records = [cli_record('acme', 'gpt-4o-mini', '0.000100', minute=i) for i in range(3)]
    spool.append([r.spool_entry(1 << 20) for r in records])
    first = await asyncio.to_thread(
        run_cli, 'ledger', 'replay', '--spool', str(spool.path), '--json', env={'DATABASE_URL': database_url}
    )
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert (report['files'], report['rows'], report['inserted'], report['contents']) == (1, 3, 3, 6)
    assert not spool.has_pending()
    spool.append([records[0].spool_entry(None)])  # replayed again: no second row
    again = await invoke('ledger', 'replay', '--spool', str(spool.path), env={'DATABASE_URL': database_url})
    assert again.exit_code == 0 and '1 row(s), 0 new, 1 already there' in again.stdout
    assert await scalar('SELECT count(*) FROM llm_requests') == 3
    assert await scalar('SELECT count(*) FROM llm_request_contents') == 6


async def test_a_spool_path_that_is_a_directory_is_refused_and_left_where_it_is(
    tmp_path: Path, database_url: str
) -> None:
    # `--spool /tmp` renamed /tmp to /tmp.replaying-<ns>-<pid> (a directory's size is not 0), then failed with an
    # internal IsADirectoryError: the directory and everything in it had moved.
    victim = tmp_path / 'victim'
    (victim / 'sub').mkdir(parents=True)
    (victim / 'keep.txt').write_text('keep')
    cli = await invoke('ledger', 'replay', '--spool', str(victim), env={'DATABASE_URL': database_url})
    assert cli.exit_code == 2 and 'is not a file' in cli.stderr, cli.stderr
    env = await invoke('ledger', 'replay', env={'DATABASE_URL': database_url, 'AGENTRT_LEDGER_SPOOL': str(victim)})
    assert env.exit_code == 2 and 'AGENTRT_LEDGER_SPOOL' in env.stderr and 'is not a file' in env.stderr, env.stderr
    spool = LedgerSpool(victim)  # a library's own configuration: the spool leaves it alone too
    assert spool.pending_files() == [] and spool.claim() == []
    assert sorted(os.listdir(tmp_path)) == ['victim']
    assert (victim / 'keep.txt').read_text() == 'keep'


async def test_a_spool_path_that_is_not_a_spool_file_is_refused_and_left_as_it_is(
    tmp_path: Path, database_url: str
) -> None:
    # A replay renames the file, moves the lines it cannot write to `.rejected` as text (bytes that are not UTF-8
    # replaced) and deletes it: `--spool ~/notes.txt` or a photo lost the file under its name (and a photo's bytes).
    for name, content in (
        ('notes.txt', b'dear diary\n'),
        ('photo.jpg', b'\xff\xd8\xff\xe0' + bytes(range(256))),
        ('a.json', b'{"v": 1}\n'),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        result = await invoke('ledger', 'replay', '--spool', str(path), env={'DATABASE_URL': database_url})
        assert result.exit_code == 2 and 'is not a ledger spool file' in result.stderr, result.stderr
        assert path.read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == ['a.json', 'notes.txt', 'photo.jpg']
    blank = tmp_path / 'blank.jsonl'
    blank.write_text('\n\n')
    result = await invoke('ledger', 'replay', '--spool', str(blank), env={'DATABASE_URL': database_url})
    assert result.exit_code == 0, result.stderr


async def test_a_spool_path_that_does_not_exist_is_a_usage_error_unless_a_crashed_replay_left_its_files(
    tmp_path: Path, database_url: str
) -> None:
    # A mistyped `--spool` said "replayed 0 spool file(s)" and left `<name>.lock` behind.
    missing = tmp_path / 'spool.jsonl'
    result = await invoke('ledger', 'replay', '--spool', str(missing), env={'DATABASE_URL': database_url})
    assert result.exit_code == 2 and 'does not exist' in result.stderr and 'nothing to replay' in result.stderr
    assert os.listdir(tmp_path) == []
    # A replay killed after claiming the file leaves only `<name>.replaying-*`: that is still replayed. The name holds
    # glob characters, which the lookup for those files must take literally.
    spool = LedgerSpool(tmp_path / 'spool[1].jsonl')
    spool.append([cli_record('acme', 'gpt-4o-mini', '0.000100', minute=7).spool_entry(None)])
    spool.path.rename(spool.path.with_name(spool.path.name + '.replaying-1-1'))
    again = await invoke('ledger', 'replay', '--spool', str(spool.path), env={'DATABASE_URL': database_url})
    assert again.exit_code == 0 and '1 row(s), 1 new' in again.stdout, again.stdout + again.stderr
    assert await scalar('SELECT count(*) FROM llm_requests') == 1
    assert not any(name.startswith('spool[1].jsonl.replaying-') for name in os.listdir(tmp_path))


async def test_a_spool_path_whose_only_file_is_an_ended_processs_journal_is_replayed(
    tmp_path: Path, database_url: str
) -> None:
    """A process killed while its writer held rows leaves only its journal beside the spool (`_journal.py`): `ledger
    replay --spool` replays it, not "does not exist"."""
    spool = LedgerSpool(tmp_path / 'spool[1].jsonl')  # glob characters, taken literally by the journals' lookup
    record = cli_record('acme', 'gpt-4o-mini', '0.000100', minute=9)
    journal = await asyncio.to_thread(journal_left_by_a_killed_process, spool.path, [record])
    result = await invoke('ledger', 'replay', '--spool', str(spool.path), env={'DATABASE_URL': database_url})
    assert result.exit_code == 0 and '1 row(s), 1 new' in result.stdout, result.stdout + result.stderr
    assert await scalar('SELECT count(*) FROM llm_requests') == 1
    assert await scalar('SELECT count(*) FROM llm_request_contents') == 2
    assert not journal.exists()
