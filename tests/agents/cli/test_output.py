"""What the listing commands print: tables that fit 80 and 120 columns, conversations, JSON bodies, CSV."""

from __future__ import annotations

import csv
import io
import json
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from agentrt.agents.cli.output import csv_cell, print_csv, utc_text
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import LedgerRecord
from tests.agents.cli.helpers import invoke

CUT_BODY = '{"instructions":"cut \x1b[2J here'


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


@pytest.mark.parametrize('columns', [80, 120])
async def test_audit_list_fits_the_terminal_and_cuts_nothing(
    seeded: list[LedgerRecord], database_url: str, columns: int
) -> None:
    listed = await invoke('audit', 'list', env={'DATABASE_URL': database_url}, columns=columns)
    assert listed.exit_code == 0, listed.stderr
    lines = _lines(listed.stdout)
    assert max(len(line) for line in lines) <= columns
    assert '…' not in listed.stdout
    rows = [line for line in lines if line[:16] in {r.id.hex[:16] for r in seeded}]
    assert len(rows) == 3  # one line a request, its id's 16 hex digits first (enough for `audit show`)
    for header in ('id', 'started (UTC)', 'account', 'model', 'status', 'cost USD'):
        assert header in lines[1]
    assert 'gpt-4o-mini' in listed.stdout and '0.004000' in listed.stdout and 'globex' in listed.stdout
    if columns >= 120:  # room for the tokens, the latency and the error's type
        assert '1,200/80' in listed.stdout and 'error: ModelHTTPError' in listed.stdout and 'ms' in lines[1]


async def test_a_short_id_from_the_list_shows_its_request(seeded: list[LedgerRecord], database_url: str) -> None:
    shown = await invoke('audit', 'show', seeded[1].id.hex[:16], env={'DATABASE_URL': database_url}, columns=80)
    assert shown.exit_code == 0, shown.stderr
    assert str(seeded[1].id) in shown.stdout and 'overloaded' in shown.stdout


async def test_audit_show_reads_as_a_conversation_and_json_has_structured_bodies(
    demo_data: None, database_url: str, tmp_path: Path
) -> None:
    env = {'DATABASE_URL': database_url, 'AGENTRT_LEDGER_SPOOL': str(tmp_path / 'spool.jsonl')}
    chat = await invoke('chat', 'Find cardiologists in Seattle', '--session', 'shown', '--delay', '0', env=env)
    assert chat.exit_code == 0, chat.stderr
    listed = json.loads((await invoke('audit', 'list', '--session', 'shown', '--json', env=env)).stdout)
    last = listed['items'][0]['id']  # the final request: the whole conversation in its prompt
    shown = await invoke('audit', 'show', last, env=env, columns=80)
    assert shown.exit_code == 0, shown.stderr
    lines = _lines(shown.stdout)
    assert max(len(line) for line in lines) <= 80
    assert 'user' in lines and '  Find cardiologists in Seattle' in lines
    assert any(line.startswith('assistant  → search_directory  (call ') for line in lines)
    assert any(line.startswith('tool  search_directory  (call ') for line in lines)
    assert any(line.startswith('instructions') for line in lines) and 'assistant' in lines
    assert '{"instructions":' not in shown.stdout  # not the stored JSON line
    as_json = await invoke('audit', 'show', last, '--json', env=env)
    detail = json.loads(as_json.stdout)
    prompt = next(c for c in detail['contents'] if c['kind'] == 'prompt')
    assert prompt['format'] == 'json' and isinstance(prompt['body'], dict)
    assert prompt['body']['messages'][0]['parts'][0]['content'] == 'Find cardiologists in Seattle'
    response = next(c for c in detail['contents'] if c['kind'] == 'response')
    assert response['body']['parts'][0]['part_kind'] == 'text'
    assert detail['trace_url'] is None


async def test_audit_show_prints_a_body_that_is_not_json_as_text(seeded: list[LedgerRecord], database_url: str):
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(
            text("UPDATE llm_request_contents SET body = :body, truncated = true WHERE kind = 'prompt'"),
            {'body': CUT_BODY},
        )
    shown = await invoke('audit', 'show', str(seeded[0].id), '--json', env={'DATABASE_URL': database_url})
    prompt = json.loads(shown.stdout)['contents'][0]
    assert (prompt['format'], prompt['truncated'], prompt['body']) == ('text', True, CUT_BODY)
    table = await invoke('audit', 'show', str(seeded[0].id), env={'DATABASE_URL': database_url})
    assert '{"instructions":"cut \\x1b[2J here' in table.stdout
    assert '\x1b' not in table.stdout  # no escape sequence of a stored body reaches the terminal


async def test_trace_url_links_a_request_to_its_trace(seeded: list[LedgerRecord], database_url: str) -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(text("UPDATE llm_requests SET trace_id = '4bf92f3577b34da6a3ce929d0e0e4736'"))
    env = {'DATABASE_URL': database_url, 'AGENTRT_TRACE_URL': 'http://jaeger:16686/trace/{trace_id}'}
    shown = await invoke('audit', 'show', str(seeded[0].id), env=env)
    assert 'http://jaeger:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736' in shown.stdout
    as_json = json.loads((await invoke('audit', 'show', str(seeded[0].id), '--json', env=env)).stdout)
    assert as_json['trace_id'] == '4bf92f3577b34da6a3ce929d0e0e4736'
    assert as_json['trace_url'] == 'http://jaeger:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736'


@pytest.mark.parametrize('template', ['http://jaeger:16686/trace/{trace}', 'http://jaeger:16686/trace/'])
async def test_a_trace_url_without_its_placeholder_is_refused(
    seeded: list[LedgerRecord], database_url: str, template: str
) -> None:
    # It was printed as it is as every request's trace link: one address for every trace.
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(text("UPDATE llm_requests SET trace_id = '4bf92f3577b34da6a3ce929d0e0e4736'"))
    env = {'DATABASE_URL': database_url, 'AGENTRT_TRACE_URL': template}
    for json_flag in ([], ['--json']):
        shown = await invoke('audit', 'show', str(seeded[0].id), *json_flag, env=env)
        assert (shown.exit_code, shown.stdout) == (2, ''), shown.stdout
        assert shown.stderr == (
            f"error: AGENTRT_TRACE_URL='{template}' has no {{trace_id}}: give the trace's address with {{trace_id}} "
            'where its id goes, e.g. http://localhost:16686/trace/{trace_id}\n'
        )


async def test_audit_list_and_costs_as_csv(seeded: list[LedgerRecord], database_url: str) -> None:
    listed = await invoke('audit', 'list', '--csv', env={'DATABASE_URL': database_url}, columns=80)
    assert listed.exit_code == 0, listed.stderr
    rows = list(csv.DictReader(io.StringIO(listed.stdout)))
    assert [row['id'] for row in rows] == [str(r.id) for r in reversed(seeded)]
    assert rows[1]['total_cost'] == '0.004000' and rows[1]['success'] == 'false' and rows[1]['trace_id'] == ''
    assert rows[1]['error_message'] == 'status_code: 503, body: overloaded'
    costs = await invoke('costs', '--by', 'account', '--source', 'ledger', '--csv', env={'DATABASE_URL': database_url})
    assert costs.exit_code == 0, costs.stderr
    by_account = {row['account']: row for row in csv.DictReader(io.StringIO(costs.stdout))}
    assert set(by_account) == {'acme', 'globex'}
    assert (by_account['acme']['requests'], by_account['acme']['total_cost']) == ('2', '0.004250')


@pytest.mark.parametrize('args', [['audit', 'list'], ['costs']])
async def test_json_and_csv_together_is_a_usage_error(database_url: str, args: list[str]) -> None:
    both = await invoke(*args, '--json', '--csv', env={'DATABASE_URL': database_url})
    assert both.exit_code == 2 and '--json and --csv exclude each other' in both.stderr


@pytest.mark.parametrize(
    ('value', 'cell'),
    [
        (None, ''),
        (True, 'true'),
        (-3, '-3'),
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ('-1+2', "'-1+2"),
        ('@SUM(A1)', "'@SUM(A1)"),
        ('plain, with "quotes"\nand a newline', 'plain, with "quotes"\nand a newline'),
    ],
)
def test_csv_cells(value: object, cell: str) -> None:
    assert csv_cell(value) == cell


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize('terminal', [True, False], ids=['terminal', 'file or pipe'])
def test_csv_writes_control_characters_out_to_a_terminal_only(monkeypatch: pytest.MonkeyPatch, terminal: bool) -> None:
    # `costs --by model --csv` on a terminal wrote a stored model name's `ESC]0;...` raw: the terminal's title changed
    # (qa140). To a terminal the cells are written out as the table's are; to a file or a pipe they stay as stored.
    stdout = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, 'stdout', stdout)
    name = 'gpt\x1b]0;T\x07\x1b[2J\u202e\x9b\nx\ty'
    print_csv([{'model': name, 'requests': 2}], columns=['model', 'requests'])
    if terminal:
        assert stdout.getvalue() == 'model,requests\n' + r'gpt\x1b]0;T\x07\x1b[2J\u202e\x9b\nx\ty' + ',2\n'
    else:
        assert list(csv.reader(io.StringIO(stdout.getvalue()))) == [['model', 'requests'], [name, '2']]


def test_a_time_shows_its_year_in_4_digits_and_a_naive_one_is_utc() -> None:
    # glibc's `%Y` does not pad (`1-01-01`); asyncpg reads `-infinity` as a naive `datetime.min`, which `astimezone`
    # failed on (year 0).
    assert utc_text(datetime(999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-2)))) == '1000-01-01 01:00:00'
    assert utc_text(datetime(1, 1, 1, 0, 5, tzinfo=UTC), '%Y-%m-%d %H:%M') == '0001-01-01 00:05'
    assert utc_text(datetime.min) == '0001-01-01 00:00:00'
