"""`agentrt audit`, `agentrt costs` and `agentrt ledger replay` in subprocesses against the test database."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agentrt.agents.cli.ledger import render_costs, render_detail, render_page
from agentrt.agents.cli.support import console
from agentrt.db.session import get_db_session
from agentrt.services.ledger._queries import get_request, list_requests, summarise_costs
from agentrt.services.ledger._record import LedgerRecord, new_request_id
from agentrt.services.ledger._spool import LedgerSpool
from agentrt.services.ledger._tracker import LLMRequestTracker
from agentrt.services.ledger._writes import content_rows, spool_entry
from tests.agents.cli_helpers import run_cli
from tests.ledger_support import fast_config, scalar

STARTED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _record(account: str, model: str, cost: str | None, *, success: bool = True, minute: int = 0) -> LedgerRecord:
    return LedgerRecord(
        id=new_request_id(),
        model=model,
        streamed=False,
        status='complete' if success else 'error',
        success=success,
        latency_ms=250.0,
        started_at=STARTED + timedelta(minutes=minute),
        finished_at=STARTED + timedelta(minutes=minute, seconds=1),
        account_slug=account,
        agent_instance_slug='helper',
        input_tokens=1200,
        output_tokens=80,
        total_tokens=1280,
        total_cost=None if cost is None else Decimal(cost),
        error_type=None if success else 'ModelHTTPError',
        error_message=None if success else 'status_code: 503, body: overloaded',
        raw_contents=[('prompt', '{"messages": ["hello there"]}'), ('response', '{"parts": ["general kenobi"]}')],
    )


@pytest.fixture
async def seeded(tmp_path: Path) -> list[LedgerRecord]:
    records = [
        _record('acme', 'gpt-4o-mini', '0.000250', minute=0),
        _record('acme', 'gpt-4o', '0.004000', success=False, minute=1),
        _record('globex', 'gpt-4o-mini', '0.000750', minute=2),
    ]
    tracker = LLMRequestTracker(fast_config(tmp_path))
    for record in records:
        await tracker.track_request(record)
    await tracker.flush()
    return records


async def _cli(database_url: str, *args: str, **env: str) -> Any:
    return await asyncio.to_thread(run_cli, *args, env={'DATABASE_URL': database_url, **env})


# Rendering, in-process (each subprocess costs seconds of imports).


@pytest.fixture(autouse=True)
def _wide_console() -> Iterator[None]:
    width = console.width
    console.width = 240
    yield
    console.width = width


async def test_list_table_and_json(seeded: list[LedgerRecord], capsys: pytest.CaptureFixture[str]):
    async with get_db_session() as session:
        page = await list_requests(session=session)
    render_page(page, as_json=False)
    table = capsys.readouterr().out
    assert all(str(r.id) in table for r in seeded) and 'page 1 of 1 (3 in all)' in table
    assert 'error: ModelHTTPError' in table and '1,200/80' in table and '0.004000' in table
    render_page(page, as_json=True)
    payload = json.loads(capsys.readouterr().out)
    assert (payload['total'], payload['pages']) == (3, 1)
    assert [item['id'] for item in payload['items']] == [str(r.id) for r in reversed(seeded)]
    assert payload['items'][1]['total_cost'] == '0.004000' and payload['items'][1]['success'] is False


async def test_show_prints_the_row_and_each_body(seeded: list[LedgerRecord], capsys: pytest.CaptureFixture[str]):
    async with get_db_session() as session:
        detail = await get_request(session=session, request_id=seeded[0].id)
    assert detail is not None
    render_detail(detail, as_json=False)
    out = capsys.readouterr().out
    assert 'hello there' in out and 'general kenobi' in out and 'gpt-4o-mini' in out and 'prompt: ' in out
    render_detail(detail, as_json=True)
    shown = json.loads(capsys.readouterr().out)
    assert shown['id'] == str(seeded[0].id) and [c['kind'] for c in shown['contents']] == ['prompt', 'response']


async def test_costs_table_and_json(seeded: list[LedgerRecord], capsys: pytest.CaptureFixture[str]):
    async with get_db_session() as session:
        by_account = await summarise_costs(session=session, by='account')
    render_costs('account', by_account, as_json=True)
    totals = {group['key']: group for group in json.loads(capsys.readouterr().out)['groups']}
    assert totals['acme']['total_cost'] == '0.004250' and totals['acme']['failed'] == 1
    assert totals['globex']['requests'] == 1 and totals['globex']['input_tokens'] == 1200
    render_costs('account', by_account, as_json=False)
    table = capsys.readouterr().out
    assert 'costs by account' in table and '0.004250' in table and '2,400' in table


# The commands themselves, end to end.


async def test_audit_and_costs_commands(seeded: list[LedgerRecord], database_url: str):
    failed = await _cli(database_url, 'audit', 'list', '--failed', '--json')
    assert failed.returncode == 0, failed.stderr
    assert [item['id'] for item in json.loads(failed.stdout)['items']] == [str(seeded[1].id)]

    shown = await _cli(database_url, 'audit', 'show', seeded[2].id.hex[:24])
    assert shown.returncode == 0, shown.stderr
    assert str(seeded[2].id) in shown.stdout and 'general kenobi' in shown.stdout

    by_model = await _cli(database_url, 'costs', '--by', 'model')
    assert by_model.returncode == 0, by_model.stderr
    assert 'gpt-4o-mini' in by_model.stdout and '0.001000' in by_model.stdout


async def test_page_size_over_100_is_a_usage_error(database_url: str):
    too_big = await _cli(database_url, 'audit', 'list', '--page-size', '101')
    assert too_big.returncode == 2 and '--page-size' in too_big.stderr


async def test_ledger_replay_writes_spooled_rows_once(tmp_path: Path, database_url: str):
    spool = LedgerSpool(tmp_path / 'spool.jsonl')
    records = [_record('acme', 'gpt-4o-mini', '0.000100', minute=i) for i in range(3)]
    spool.append([spool_entry(r.to_row(), content_rows(r.id, r.raw_contents, 1 << 20)) for r in records])
    first = await _cli(database_url, 'ledger', 'replay', '--spool', str(spool.path), '--json')
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert (report['files'], report['rows'], report['inserted'], report['contents']) == (1, 3, 3, 6)
    assert not spool.has_pending()
    spool.append([spool_entry(records[0].to_row(), [])])  # replayed again: no second row
    again = await _cli(database_url, 'ledger', 'replay', '--spool', str(spool.path))
    assert again.returncode == 0 and '1 row(s), 0 new, 1 already there' in again.stdout
    assert await scalar('SELECT count(*) FROM llm_requests') == 3
    assert await scalar('SELECT count(*) FROM llm_request_contents') == 6


async def test_a_chat_turn_shows_up_in_the_audit_trail(demo_data: None, database_url: str, tmp_path: Path):
    spool = {'AGENTRT_LEDGER_SPOOL': str(tmp_path / 'spool.jsonl')}
    chat = await _cli(
        database_url, 'chat', 'Find cardiologists in Seattle', '--session', 'audited', '--delay', '0', **spool
    )
    assert chat.returncode == 0, chat.stderr
    listed = await _cli(database_url, 'audit', 'list', '--session', 'audited', '--json', **spool)
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)['items']
    assert len(items) == 3 and {item['status'] for item in items} == {'complete'}  # 'model demo · 3 requests'
    assert all(item['input_tokens'] > 0 and item['account_slug'] == 'acme-health' for item in items)
    assert all(item['streamed'] and item['price_source'] == 'unpriced' for item in items)  # the demo model has no price
    assert await scalar("SELECT count(*) FROM llm_request_contents WHERE kind = 'prompt'") == 3  # stored before exit
