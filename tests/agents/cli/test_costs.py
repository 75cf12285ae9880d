"""`agentrt costs`: rendering, the command in-process, one subprocess run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlalchemy import text

from agentrt.agents.cli.costs import render_costs
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import LedgerRecord, LLMRequestTracker, summarise_costs
from tests.agents.cli.conftest import STARTED, DeletedIdSlug, DigitAccounts, cli_record
from tests.agents.cli.helpers import invoke, run_cli
from tests.factories import fast_config, ledger_record, write_ledger_row


async def test_costs_table_and_json(seeded: list[LedgerRecord], capsys: pytest.CaptureFixture[str]):
    async with get_db_session(account=Unscoped.ADMIN) as session:
        by_account = await summarise_costs(session=session, by='account')
    render_costs('account', by_account, as_json=True)
    totals = {group['key']: group for group in json.loads(capsys.readouterr().out)['groups']}
    assert totals['acme']['total_cost'] == '0.004250' and totals['acme']['failed'] == 1
    assert totals['globex']['requests'] == 1 and totals['globex']['input_tokens'] == 1200
    render_costs('account', by_account, as_json=False)
    table = capsys.readouterr().out
    assert 'costs by account' in table and '0.004250' in table and '2,400' in table


async def test_costs_in_a_subprocess(seeded: list[LedgerRecord], database_url: str) -> None:
    by_model = await asyncio.to_thread(run_cli, 'costs', '--by', 'model', env={'DATABASE_URL': database_url})
    assert by_model.returncode == 0, by_model.stderr
    assert 'gpt-4o-mini' in by_model.stdout and '0.001000' in by_model.stdout


async def test_costs_from_the_ledger_and_bad_choices(seeded: list[LedgerRecord], database_url: str) -> None:
    env = {'DATABASE_URL': database_url}
    by_day = await invoke('costs', '--by', 'day', '--source', 'ledger', '--json', env=env)
    assert by_day.exit_code == 0, by_day.stderr
    assert [(group['key'], group['requests']) for group in json.loads(by_day.stdout)['groups']] == [('2026-03-01', 3)]
    bad_by = await invoke('costs', '--by', 'weekday', env=env)
    assert bad_by.exit_code == 2 and '--by must be one of account, agent, model, day' in bad_by.stderr
    bad_source = await invoke('costs', '--source', 'cache', env=env)
    assert bad_source.exit_code == 2 and '--source must be one of rollup, ledger' in bad_source.stderr


async def test_costs_from_the_rollup_count_rows_recorded_long_ago_that_no_roll_up_reached(
    seeded: list[LedgerRecord], database_url: str
) -> None:
    """`agentrt costs` caught up only the rows recorded in its last seven days, so a row no roll-up reached in time
    (an agent of one's own, a roll-up dropped at a process's end) was left out of a month's report (QA)."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(text("UPDATE llm_requests SET recorded_at = now() - interval '30 days'"))
    by_day = await invoke('costs', '--by', 'day', '--json', env={'DATABASE_URL': database_url})
    assert by_day.exit_code == 0, by_day.stderr
    assert [(group['key'], group['requests']) for group in json.loads(by_day.stdout)['groups']] == [('2026-03-01', 3)]


async def test_costs_from_the_rollup_while_another_roll_up_holds_queued_rows_count_them(
    seeded: list[LedgerRecord], database_url: str
) -> None:
    """The command's roll-up skipped the queued rows another roll-up was taking and printed the rollup without them
    (QA: an under-count of nine tenths, no warning): now the ledger answers while rows are left queued."""
    env = {'DATABASE_URL': database_url}
    async with get_db_session(account=Unscoped.JOBS) as other_roll_up:
        await other_roll_up.execute(text('SELECT 1 FROM usage_pending_requests ORDER BY request_id LIMIT 2 FOR UPDATE'))
        held = await invoke('costs', '--by', 'day', '--json', env=env)
    assert held.exit_code == 0, held.stderr
    assert [(group['key'], group['requests']) for group in json.loads(held.stdout)['groups']] == [('2026-03-01', 3)]
    released = await invoke('costs', '--by', 'day', '--json', env=env)
    assert json.loads(released.stdout) == json.loads(held.stdout)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        assert (await session.execute(text('SELECT count(*) FROM usage_pending_requests'))).scalar_one() == 0


async def test_costs_show_cancelled_requests_apart_from_failed_ones(
    seeded: list[LedgerRecord], database_url: str, tmp_path: Path
) -> None:
    """A stopped stream is no failure: both sources say 1 failed and 1 cancelled for acme, in JSON, CSV and table."""
    stopped = cli_record('acme', 'gpt-4o-mini', '0.000100', success=False, minute=3)
    stopped.status, stopped.error_type, stopped.streamed = 'cancelled', None, True
    stopped.error_message = 'stream stopped before the response was complete'
    tracker = LLMRequestTracker(fast_config(tmp_path))
    await tracker.track_request(stopped)
    await tracker.flush()
    env = {'DATABASE_URL': database_url}
    by_account = await invoke('costs', '--source', 'ledger', '--json', env=env)
    groups = {group['key']: group for group in json.loads(by_account.stdout)['groups']}
    assert (groups['acme']['requests'], groups['acme']['failed'], groups['acme']['cancelled']) == (3, 1, 1)
    assert (groups['globex']['failed'], groups['globex']['cancelled']) == (0, 0)
    for source in ('ledger', 'rollup'):  # these rows have no account id: the rollup keeps them in one bucket a model
        result = await invoke('costs', '--by', 'day', '--source', source, '--json', env=env)
        assert result.exit_code == 0, result.stderr
        [day] = json.loads(result.stdout)['groups']
        assert (day['requests'], day['failed'], day['cancelled']) == (4, 1, 1), source
    as_csv = await invoke('costs', '--source', 'ledger', '--csv', env=env)
    header, *lines = as_csv.stdout.splitlines()
    assert header.split(',')[:4] == ['account', 'requests', 'failed', 'cancelled']
    assert any(line.startswith('acme,3,1,1,') for line in lines)
    table = await invoke('costs', '--source', 'ledger', env=env)
    assert 'cancelled' in table.stdout
    [acme] = [line for line in table.stdout.splitlines() if 'acme' in line]
    assert [cell.strip() for cell in acme.split('│')[1:6]] == ['acme', '3', '1', '1', '3,600'], acme


async def test_costs_of_an_agent_are_its_own_from_the_rollup_as_from_the_ledger(database_url: str) -> None:
    """The rollup kept one agent name per instance (the greatest): `costs --agent simple_chat` answered no rows and
    `--agent zeta-bot` both agents' requests, where the ledger had 2 and 1 (QA). Agents of one's own (no instance)
    were merged the same way in `--by agent`."""
    shared = {'account_slug': 'acme', 'agent_instance_id': 900_001, 'agent_instance_slug': 'helper'}
    for name, fields, n in (
        ('simple_chat', shared, 2),
        ('zeta-bot', shared, 1),
        ('billing-bot', {}, 1),
        ('alpha-bot', {}, 2),
    ):
        for _ in range(n):
            await write_ledger_row(ledger_record(agent_name=name, started_at=STARTED, cost='0.25', **fields))
    env = {'DATABASE_URL': database_url}

    async def groups(source: str, *filters: str) -> list[tuple[str, int]]:
        result = await invoke('costs', '--by', 'agent', '--source', source, '--json', *filters, env=env)
        assert result.exit_code == 0, result.stderr
        return [(group['key'], group['requests']) for group in json.loads(result.stdout)['groups']]

    assert (
        await groups('rollup')
        == await groups('ledger')
        == [('acme/helper', 3), ('-/alpha-bot', 2), ('-/billing-bot', 1)]
    )
    for agent, expected in (('simple_chat', 2), ('zeta-bot', 1), ('alpha-bot', 2), ('billing-bot', 1)):
        from_ledger = await groups('ledger', '--agent', agent)
        assert await groups('rollup', '--agent', agent) == from_ledger
        assert sum(requests for _, requests in from_ledger) == expected, agent


LONG_MODEL = 'openrouter:anthropic/claude-3.5-sonnet-20241022-with-a-very-long-deployment-name'


async def test_a_table_written_to_a_pipe_is_printed_in_full(
    seeded: list[LedgerRecord], database_url: str, tmp_path: Path
) -> None:
    """`agentrt costs > costs.txt` (no terminal, no COLUMNS): every cell in full, not cut at rich's 80 columns."""
    tracker = LLMRequestTracker(fast_config(tmp_path))
    await tracker.track_request(cli_record('a-rather-long-account-name-for-a-wide-table', LONG_MODEL, '0.5', minute=4))
    await tracker.flush()
    env = {'DATABASE_URL': database_url}
    for by, value in (('model', LONG_MODEL), ('account', 'a-rather-long-account-name-for-a-wide-table')):
        piped = await asyncio.to_thread(run_cli, 'costs', '--by', by, '--source', 'ledger', env=env, columns=None)
        assert piped.returncode == 0, piped.stderr
        assert value in piped.stdout and '…' not in piped.stdout
        assert 'requests' in piped.stdout and 'cancelled' in piped.stdout  # headers whole too
        assert max(len(line) for line in piped.stdout.splitlines()) > 80
    # A width someone gave still holds: COLUMNS for the subprocess, the terminal's width in-process; nothing is cut to
    # an ellipsis there either (a cell too long for its column folds onto the next line).
    narrow = await asyncio.to_thread(run_cli, 'costs', '--by', 'model', '--source', 'ledger', env=env, columns=80)
    assert narrow.returncode == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80 and '…' not in narrow.stdout
    terminal = await invoke('costs', '--by', 'account', '--source', 'ledger', env=env, columns=80)
    assert terminal.exit_code == 0, terminal.stderr
    assert max(len(line) for line in terminal.stdout.splitlines()) <= 80 and '…' not in terminal.stdout


async def test_a_columns_that_is_no_positive_number_is_ignored(seeded: list[LedgerRecord], database_url: str) -> None:
    # rich took COLUMNS=0 for a width of nothing (every table printed as nothing, exit 0) and crashed on `²` as the
    # console was made, `--version` included (QA).
    env = {'DATABASE_URL': database_url}
    for columns in ('0', '²', '-5', 'wide'):
        args = ('costs', '--by', 'model', '--source', 'ledger')
        piped = await asyncio.to_thread(run_cli, *args, env=env, columns=columns)
        assert piped.returncode == 0 and 'gpt-4o-mini' in piped.stdout and 'Traceback' not in piped.stderr, columns
        version = await asyncio.to_thread(run_cli, '--version', columns=columns)
        assert version.returncode == 0 and version.stdout.startswith('agentrt '), (columns, version.stderr)


async def test_a_narrow_terminal_folds_every_cell_and_empties_none(
    seeded: list[LedgerRecord], database_url: str
) -> None:
    # At COLUMNS=30 rich squeezed the costs table's last columns to 0 cells (the cost printed as nothing) and at 40
    # `keys list`'s (QA): each column now keeps at least 3 cells, the table as wide as that needs.
    env = {'DATABASE_URL': database_url}
    args = ('costs', '--by', 'account', '--source', 'ledger')
    for columns in (30, 40):
        shown = await asyncio.to_thread(run_cli, *args, env=env, columns=columns)
        assert shown.returncode == 0, shown.stderr
        [acme] = [line for line in shown.stdout.splitlines() if '│ acm' in line]
        cells = [cell.strip() for cell in acme.split('│')[1:-1]]
        # acme: 2 requests, 1 failed, 0 cancelled, 2,400 tokens in; each cell's first line holds its start.
        assert len(cells) == 8 and all(cells), (columns, shown.stdout)
        assert cells[:5] == ['acm', '2', '1', '0', '2,4'], (columns, shown.stdout)


@pytest.mark.parametrize('account', ['²', '١', '１'])
async def test_an_account_of_digits_of_another_script_is_a_slug_not_an_id(database_url: str, account: str) -> None:
    # `isdigit` took them: `²` was an internal error (exit 70) and `١` (Arabic-Indic one) account 1, whose budget
    # `budget set --account ١` then set (QA).
    env = {'DATABASE_URL': database_url}
    costs = await invoke('costs', '--account', account, env=env)
    assert costs.exit_code == 2 and f"unknown account '{account}'" in costs.stderr, costs.stderr
    budget = await invoke('budget', 'set', '--account', account, '--limit', '5', env=env)
    assert budget.exit_code == 2 and 'unknown account' in budget.stderr, budget.stderr


async def test_audit_list_written_to_a_pipe_has_every_column(seeded: list[LedgerRecord], database_url: str) -> None:
    """With no terminal to fit, `audit list` shows each request's whole id and every column, as `--csv` does."""
    piped = await asyncio.to_thread(run_cli, 'audit', 'list', env={'DATABASE_URL': database_url}, columns=None)
    assert piped.returncode == 0, piped.stderr
    assert all(str(record.id) in piped.stdout for record in seeded)
    header = piped.stdout.splitlines()[1]
    for column in ('agent', 'tokens in/out', 'ms', 'cost USD'):
        assert column in header
    assert '1,200/80' in piped.stdout and '…' not in piped.stdout


async def test_an_all_digit_account_is_its_slug_and_one_that_is_also_an_id_is_refused(
    digit_accounts: DigitAccounts, database_url: str
) -> None:
    # Slugs may be all digits: `--account 2` was always the id 2 (green-grocer's costs, not those of the account whose
    # slug is `2`) and `--account 007` "unknown account id 7" (QA).
    accounts, env = digit_accounts, {'DATABASE_URL': database_url}
    for source in ('rollup', 'ledger'):
        refused = await invoke('costs', '--account', accounts.clash_slug, '--source', source, env=env)
        assert refused.exit_code == 2 and refused.stderr.count('error:') == 1, refused.stderr
        said = ' '.join(refused.stderr.split())
        assert f'is the slug of account {accounts.clash} and the id of account {accounts.green} (green-grocer)' in said
        for account, slug in (
            ('007', '007'),
            (str(accounts.clash), accounts.clash_slug),
            (str(accounts.acme), 'acme-health'),
        ):
            shown = await invoke('costs', '--account', account, '--source', source, '--json', env=env)
            assert shown.exit_code == 0, (account, shown.stderr)
            assert [group['key'] for group in json.loads(shown.stdout)['groups']] == [slug], (account, source)


async def test_a_live_slug_that_is_a_deleted_accounts_id_with_ledger_rows_is_refused(
    deleted_id_slug: DeletedIdSlug, database_url: str
) -> None:
    # `costs --account 300` showed live account 19 (slug `300`) while deleted account 300's requests are in the
    # ledger, without a word (QA).
    accounts, env = deleted_id_slug, {'DATABASE_URL': database_url}
    for source in ('rollup', 'ledger'):
        refused = await invoke('costs', '--account', accounts.live_slug, '--source', source, env=env)
        assert refused.exit_code == 2 and refused.stderr.count('error:') == 1, refused.stderr
        said = ' '.join(refused.stderr.split())
        assert f'the id of a deleted account {accounts.deleted} whose model requests are in the ledger' in said
        for account, slug in ((accounts.live, accounts.live_slug), (accounts.deleted, 'tmpdel')):
            shown = await invoke('costs', '--account', f'id:{account}', '--source', source, '--json', env=env)
            assert [group['key'] for group in json.loads(shown.stdout)['groups']] == [slug], (account, shown.stderr)
