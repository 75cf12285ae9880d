"""`agentrt audit list` and `agentrt audit show`: rendering, the commands in-process, one subprocess run."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agentrt.agents.cli.audit import render_detail, render_page
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import LedgerRecord, LLMRequestTracker, get_request, list_requests
from tests.agents.cli.conftest import DigitAccounts
from tests.agents.cli.helpers import invoke, run_cli
from tests.factories import fast_config, ledger_record, scalar, write_ledger_row


async def test_list_table_and_json(seeded: list[LedgerRecord], capsys: pytest.CaptureFixture[str]) -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        page = await list_requests(session=session)
    render_page(page, as_json=False)
    table = capsys.readouterr().out
    assert all(str(r.id) in table for r in seeded) and 'page 1 of 1 (3 in all)' in table
    assert 'error: ModelHTTPError' in table and '1,200/80' in table and '0.004000' in table
    render_page(page, as_json=True)
    payload = json.loads(capsys.readouterr().out)
    assert (payload['total'], payload['pages']) == (3, 1)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        past = await list_requests(session=session, page=5)
    render_page(past, as_json=False)
    assert capsys.readouterr().out.strip() == 'model requests: page 5 is past the last, page 1 (3 in all at 20 a page)'
    assert [item['id'] for item in payload['items']] == [str(r.id) for r in reversed(seeded)]
    assert payload['items'][1]['total_cost'] == '0.004000' and payload['items'][1]['success'] is False


async def test_a_row_started_before_the_year_1000_shows_its_year_in_4_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # glibc's strftime `%Y` does not pad: a row started at 0001-01-01 00:00+00 showed as `1-01-01 00:00:00` (QA).
    record = ledger_record(started_at=datetime(1, 1, 1, 0, 0, 5, tzinfo=UTC), cost='0.000100', account_slug='acme')
    tracker = LLMRequestTracker(fast_config(tmp_path))
    await tracker.track_request(record)
    await tracker.flush()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        page = await list_requests(session=session)
    render_page(page, as_json=False)
    assert '0001-01-01 00:00:05' in capsys.readouterr().out


async def test_show_prints_the_row_and_each_body(seeded: list[LedgerRecord], capsys: pytest.CaptureFixture[str]):
    async with get_db_session(account=Unscoped.ADMIN) as session:
        detail = await get_request(session=session, request_id=seeded[0].id)
    assert detail is not None
    render_detail(detail, as_json=False)
    out = capsys.readouterr().out
    assert 'hello there' in out and 'general kenobi' in out and 'gpt-4o-mini' in out and 'prompt: ' in out
    render_detail(detail, as_json=True)
    shown = json.loads(capsys.readouterr().out)
    assert shown['id'] == str(seeded[0].id) and [c['kind'] for c in shown['contents']] == ['prompt', 'response']


async def test_audit_list_in_a_subprocess(seeded: list[LedgerRecord], database_url: str) -> None:
    failed = await asyncio.to_thread(run_cli, 'audit', 'list', '--failed', '--json', env={'DATABASE_URL': database_url})
    assert failed.returncode == 0, failed.stderr
    assert [item['id'] for item in json.loads(failed.stdout)['items']] == [str(seeded[1].id)]


async def test_audit_show_by_id_prefix(seeded: list[LedgerRecord], database_url: str) -> None:
    shown = await invoke('audit', 'show', seeded[2].id.hex[:24], env={'DATABASE_URL': database_url})
    assert shown.exit_code == 0, shown.stderr
    assert str(seeded[2].id) in shown.stdout and 'general kenobi' in shown.stdout


async def test_page_size_over_100_is_a_usage_error(database_url: str) -> None:
    too_big = await invoke('audit', 'list', '--page-size', '101', env={'DATABASE_URL': database_url})
    assert too_big.exit_code == 2 and '--page-size' in too_big.stderr


async def test_a_chat_turn_shows_up_in_the_audit_trail(demo_data: None, database_url: str, tmp_path: Path):
    spool = {'AGENTRT_LEDGER_SPOOL': str(tmp_path / 'spool.jsonl')}
    env = {'DATABASE_URL': database_url, **spool}
    chat = await invoke('chat', 'Find cardiologists in Seattle', '--session', 'audited', '--delay', '0', env=env)
    assert chat.exit_code == 0, chat.stderr
    listed = await invoke('audit', 'list', '--session', 'audited', '--json', env=env)
    assert listed.exit_code == 0, listed.stderr
    items = json.loads(listed.stdout)['items']
    assert len(items) == 3 and {item['status'] for item in items} == {'complete'}  # 'model demo · 3 requests'
    assert all(item['input_tokens'] > 0 and item['account_slug'] == 'acme-health' for item in items)
    assert all(item['streamed'] and item['price_source'] == 'unpriced' for item in items)  # the demo model has no price
    assert await scalar("SELECT count(*) FROM llm_request_contents WHERE kind = 'prompt'") == 3  # stored before exit


async def test_filters_with_unstorable_text_find_the_rows_of_that_text(
    tracker: LLMRequestTracker, database_url: str
) -> None:
    """The ledger stores NUL and lone surrogates as U+FFFD; a filter with the same text (an undecodable argument
    arrives as a lone surrogate) matches it the same way, and is never a driver error."""
    hostile, plain = ledger_record(agent_name='desk\x00bot', model='gpt\udce9'), ledger_record()
    assert await asyncio.gather(tracker.submit(hostile), tracker.submit(plain)) == ['written', 'written']
    env = {'DATABASE_URL': database_url}
    for args in (
        ['--agent', 'desk\x00bot'],
        ['--model', 'gpt\udce9'],
        ['--agent', 'desk\x00bot', '--model', 'gpt\udce9'],
    ):
        listed = await invoke('audit', 'list', *args, '--json', env=env)
        assert listed.exit_code == 0, listed.stderr
        assert [item['id'] for item in json.loads(listed.stdout)['items']] == [str(hostile.id)], args
    costs = await invoke('costs', '--source', 'ledger', '--agent', 'desk\x00bot', '--model', 'gpt\udce9', env=env)
    assert costs.exit_code == 0 and 'error' not in costs.stderr, costs.stderr


async def test_an_agent_that_does_not_exist_is_a_usage_error_not_an_empty_page(
    tracker: LLMRequestTracker, demo_data: None, database_url: str
) -> None:
    # `audit list --agent provdier-finder` (misspelt) printed an empty page, as if the agent had done nothing, where a
    # misspelt --account is an error listing the accounts.
    own = ledger_record(agent_name='my-own-agent')  # an agent of the user's own: a name on ledger rows, no instance
    assert await tracker.submit(own) == 'written'
    env = {'DATABASE_URL': database_url}
    for command in (('audit', 'list'), ('costs', '--source', 'ledger')):
        unknown = await invoke(*command, '--agent', 'provdier-finder', env=env)
        assert unknown.exit_code == 2, unknown.stderr
        assert "unknown agent 'provdier-finder'" in unknown.stderr
        assert 'agent instances: provider-finder, supplier-finder' in unknown.stderr
        elsewhere = await invoke(*command, '--agent', 'provider-finder', '--account', 'green-grocer', env=env)
        assert elsewhere.exit_code == 2, elsewhere.stderr
        assert (
            "for account 'green-grocer'" in elsewhere.stderr and 'agent instances: supplier-finder' in elsewhere.stderr
        )
        # Agents that exist, with nothing in the window asked for: an empty answer, no error.
        for agent in ('provider-finder', 'my-own-agent'):
            quiet = await invoke(*command, '--agent', agent, '--since', '2099-01-01', '--json', env=env)
            assert quiet.exit_code == 0 and 'error' not in quiet.stderr, (agent, quiet.stderr)


async def test_an_all_digit_account_is_its_slug_and_one_that_is_also_an_id_is_refused(
    digit_accounts: DigitAccounts, database_url: str
) -> None:
    # `--account 2` listed green-grocer's requests (id 2), not those of the account whose slug is `2` (QA).
    accounts, env = digit_accounts, {'DATABASE_URL': database_url}
    refused = await invoke('audit', 'list', '--account', accounts.clash_slug, env=env)
    assert refused.exit_code == 2 and refused.stderr.count('error:') == 1, refused.stderr
    assert f'the id of account {accounts.green} (green-grocer)' in ' '.join(refused.stderr.split())
    for account, slug in (('007', '007'), (str(accounts.clash), accounts.clash_slug)):
        listed = await invoke('audit', 'list', '--account', account, '--json', env=env)
        assert listed.exit_code == 0, (account, listed.stderr)
        assert [row['account_slug'] for row in json.loads(listed.stdout)['items']] == [slug], account


async def test_audit_list_walks_by_after_every_row_once_in_order(database_url: str) -> None:
    # `audit list --page 45000` read and sorted every row before its page (3.4 s at a year of ledger) and counted
    # them all: --after walks from a row's id instead, without the offset or the count.
    start = datetime(2026, 3, 1, tzinfo=UTC)
    records = [ledger_record(started_at=start + timedelta(minutes=n // 2), success=n != 3) for n in range(8)]
    for record in records:  # two rows a minute: the id orders rows that started together
        await write_ledger_row(record)
    expected = [str(r.id) for r in sorted(records, key=lambda r: (r.started_at, r.id), reverse=True)]
    env = {'DATABASE_URL': database_url}
    seen: list[str] = []
    after: list[str] = []
    while True:
        listed = await invoke('audit', 'list', '--page-size', '3', '--json', *after, env=env)
        assert listed.exit_code == 0, listed.stderr
        payload = json.loads(listed.stdout)
        assert (payload['total'], payload['pages']) == ((8, 3) if not after else (None, None))  # not counted
        seen += [item['id'] for item in payload['items']]
        if payload['next_after'] is None:
            break
        assert payload['next_after'] == seen[-1]
        after = ['--after', seen[-1][:24]]  # a prefix of the id, as `audit show` takes
    assert seen == expected
    # The table says where the next page starts, and not a count it did not make; filters apply after the position.
    table = await invoke('audit', 'list', '--page-size', '2', '--after', expected[1], env=env)
    assert table.exit_code == 0, table.stderr
    assert 'model requests: 2 older than --after' in table.stdout and f'older: --after {expected[3]}' in table.stdout
    failed = await invoke('audit', 'list', '--failed', '--after', expected[0], '--json', env=env)
    assert [item['id'] for item in json.loads(failed.stdout)['items']] == [str(records[3].id)]
    unknown = await invoke('audit', 'list', '--after', 'ffffffffffffffff', env=env)
    assert unknown.exit_code == 2 and 'no model request ffffffffffffffff' in unknown.stderr
    both = await invoke('audit', 'list', '--after', expected[0], '--page', '2', env=env)
    assert both.exit_code == 2 and '--after and --page exclude each other' in both.stderr


@pytest.mark.parametrize(
    'args',
    [
        ('audit', 'list', '--model', ' '),
        ('audit', 'list', '--session', ''),
        ('audit', 'list', '--agent', '\t'),
        ('costs', '--source', 'ledger', '--model', '  '),
    ],
)
async def test_a_blank_filter_is_a_usage_error_not_an_empty_page(database_url: str, args: tuple[str, ...]) -> None:
    # `audit list --model ' '` printed an empty page (exit 0), as if nothing had run; the HTTP API answers the same
    # blank filter with a 422.
    blank = await invoke(*args, env={'DATABASE_URL': database_url})
    assert blank.exit_code == 2, blank.stderr
    assert blank.stderr.strip() == f'error: {args[-2]} is blank; leave it out to match every value'


@pytest.mark.parametrize('character', ['\u202e', '\u202a', '\u2066', '\u2069', '\u2028', '\u2029', '\u200f', '\u061c'])
def test_a_stored_prompt_cannot_reorder_or_split_what_audit_show_prints(character: str) -> None:
    # U+202E before a stored prompt showed it reversed in `audit show` (QA): anyone who can chat wrote the audit's
    # text in an order of their choosing. Shown as its escape, as the web UI and the API's errors do.
    from rich.console import Console

    from agentrt.agents.cli.transcript import render_body

    prompt = {
        'instructions': '',
        'messages': [
            {
                'kind': 'request',
                'parts': [{'part_kind': 'user-prompt', 'content': f'{character}dermatologists in Boston'}],
            }
        ],
    }
    for body, truncated in ((json.dumps(prompt), False), (f'{character}cut short', True)):
        screen = Console(width=200, record=True, color_system=None)
        screen.print(render_body('prompt', body, truncated=truncated))
        shown = screen.export_text()
        assert character not in shown
        assert f'\\u{ord(character):04x}' in shown
    assert '\u200d' in render_body('response', '👩\u200d💻', truncated=True).plain  # type: ignore[union-attr]


def test_a_newline_in_a_tool_name_stays_on_its_heading_line_in_audit_show() -> None:
    # A tool name the model invented with a newline in it split the heading (`→ name  call-id`, a retry's `name`) into
    # a line that read as the body; ESC was written out, the newline was not (QA).
    from rich.console import Console

    from agentrt.agents.cli.transcript import render_body

    name = 'search\nuser\n  forged\x1b[2J'
    shown_name = 'search\\nuser\\n  forged\\x1b[2J'
    response = {
        'kind': 'response',
        'parts': [{'part_kind': 'tool-call', 'tool_name': name, 'args': '{}', 'tool_call_id': 'c1'}],
    }
    retry = {'part_kind': 'tool-return', 'outcome': 'retried', 'tool_name': name, 'content': 'no', 'tool_call_id': 'c1'}
    prompt = {'instructions': '', 'messages': [{'kind': 'request', 'parts': [retry]}]}
    screen = Console(width=200, record=True, color_system=None)
    screen.print(render_body('response', json.dumps(response), truncated=False))
    screen.print(render_body('prompt', json.dumps(prompt), truncated=False))
    lines = screen.export_text().splitlines()
    assert lines[0] == f'assistant  → {shown_name}  (call c1)' and lines[2] == f'retry  {shown_name}  (call c1)'
    assert len(lines) == 4


def test_a_tool_calls_arguments_nested_past_pythons_parser_are_shown_as_stored() -> None:
    # The runtime stores them (a model's hostile arguments); `audit show` ended with an internal error, RecursionError
    # (exit 70), where --json and the HTTP route answered (QA).
    from rich.console import Console

    from agentrt.agents.cli.transcript import render_body

    nested = '{"text": ' + '[' * 100_000 + ']' * 100_000 + '}'
    response = {'kind': 'response', 'parts': [{'part_kind': 'tool-call', 'tool_name': 'echo', 'args': nested}]}
    screen = Console(width=200, record=True, color_system=None)
    screen.print(render_body('response', json.dumps(response), truncated=False))
    shown = screen.export_text()
    assert 'echo' in shown and '{"text":' in shown and '[[[[' in shown
    # A tool's result nested so (the body itself past the parser): the body's text as stored.
    body = '{"kind": "request", "parts": [{"part_kind": "tool-return", "content": ' + nested + '}]}'
    screen.print(render_body('prompt', body, truncated=False))
    shown = screen.export_text()
    assert '"tool-return", "content": {"text":' in shown and '[[[[' in shown


@pytest.mark.parametrize(
    ('content', 'expected'),
    [
        (['berries', 'apples'], '[\n  "berries",\n  "apples"\n]'),
        ([{'id': 4}], '[\n  {\n    "id": 4\n  }\n]'),
        ([], '[]'),
        ('plain text\nof two lines', 'plain text\nof two lines'),
    ],
)
def test_a_tools_result_is_shown_as_its_json_and_text_as_it_is(content: object, expected: str) -> None:
    # A list of strings was shown as lines of text, a list of one dict as the dict, `[]` as an empty line (QA).
    from rich.console import Console

    from agentrt.agents.cli.transcript import render_body

    part = {'part_kind': 'tool-return', 'tool_name': 'x_titles', 'tool_call_id': 'call_1', 'content': content}
    screen = Console(width=200, record=True, color_system=None)
    screen.print(render_body('response', json.dumps({'kind': 'request', 'parts': [part]}), truncated=False))
    lines = screen.export_text().splitlines()
    assert lines[0].split() == ['tool', 'x_titles', '(call', 'call_1)']
    assert '\n'.join(line.strip() for line in lines[1:]) == '\n'.join(line.strip() for line in expected.splitlines())


def test_a_validation_retry_is_shown_as_a_retry() -> None:
    # pydantic-ai 2.78 sends a tool's validation errors back as a `tool-return` part whose outcome is `retried`: it
    # read as the tool's result (QA).
    from rich.console import Console

    from agentrt.agents.cli.transcript import render_body

    part = {
        'part_kind': 'tool-return',
        'tool_name': 'search',
        'tool_call_id': 'c1',
        'content': [],
        'outcome': 'retried',
    }
    screen = Console(width=200, record=True, color_system=None)
    screen.print(
        render_body('prompt', json.dumps({'messages': [{'kind': 'request', 'parts': [part]}]}), truncated=False)
    )
    assert screen.export_text().split()[:2] == ['retry', 'search']
