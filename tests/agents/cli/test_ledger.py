"""`agentrt ledger replay`: spooled rows written once, however often it runs; one run in a subprocess."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from agentrt.services.ledger import LedgerSpool
from tests.agents.cli.conftest import cli_record
from tests.agents.cli.helpers import invoke, run_cli
from tests.factories import scalar


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
