"""`agentrt budget set|show|remove|sweep`, and a chat turn the budget refuses (exit code 10)."""

from __future__ import annotations

import json
from decimal import Decimal

from agentrt.agents.cli.support import EXIT_BUDGET, EXIT_USAGE
from tests.agents.cli.conftest import DeletedIdSlug, DigitAccounts
from tests.agents.cli.helpers import invoke
from tests.agents.conftest import account_id
from tests.factories import ledger_record, write_ledger_row


async def test_set_show_and_remove_a_budget(demo_data: None, database_url: str) -> None:
    env = {'DATABASE_URL': database_url}
    made = await invoke('budget', 'set', '--account', 'acme-health', '--limit', '50', '--period', 'month', env=env)
    assert made.exit_code == 0, made.stderr
    assert 'acme-health' in made.stdout and '50.00' in made.stdout and 'month' in made.stdout
    await invoke('budget', 'set', '--account', 'green-grocer', '--limit', '$2.50', '--period', '12h', env=env)
    shown = json.loads((await invoke('budget', 'show', '--json', env=env)).stdout)
    assert [(b['account_slug'], b['limit_usd'], b['period']) for b in shown] == [
        ('acme-health', '50', 'month'),
        ('green-grocer', '2.50', '12h'),
    ]
    assert shown[0]['spent_usd'] == '0' and Decimal(shown[0]['remaining_usd']) == 50
    assert shown[0]['spent_tokens'] == 0 and shown[0]['holds'] == 0  # counts are JSON numbers, amounts strings
    one = json.loads((await invoke('budget', 'show', '--account', 'green-grocer', '--json', env=env)).stdout)
    assert [b['account_slug'] for b in one] == ['green-grocer']

    removed = await invoke('budget', 'remove', '--account', 'green-grocer', env=env)
    assert removed.exit_code == 0 and 'removed' in removed.stdout
    none = await invoke('budget', 'show', '--account', 'green-grocer', env=env)
    assert none.exit_code == 0 and 'has no budget' in none.stderr
    swept = await invoke('budget', 'sweep', '--json', env=env)
    assert swept.exit_code == 0 and json.loads(swept.stdout)['released_dead'] == 0


async def test_an_all_digit_account_is_its_slug_and_one_that_is_also_an_id_is_refused(
    digit_accounts: DigitAccounts, database_url: str
) -> None:
    # `budget set --account 2` set green-grocer's budget (id 2), not that of the account whose slug is `2` (QA).
    accounts, env = digit_accounts, {'DATABASE_URL': database_url}
    for args in (('set', '--limit', '5'), ('show',), ('remove',)):
        refused = await invoke('budget', *args, '--account', accounts.clash_slug, env=env)
        assert refused.exit_code == 2 and refused.stderr.count('error:') == 1, (args, refused.stderr)
        said = ' '.join(refused.stderr.split())
        assert f'is the slug of account {accounts.clash} and the id of account {accounts.green} (green-grocer)' in said
    assert json.loads((await invoke('budget', 'show', '--json', env=env)).stdout) == []
    for account, slug in (('007', '007'), (str(accounts.clash), accounts.clash_slug)):
        made = await invoke('budget', 'set', '--account', account, '--limit', '5', '--json', env=env)
        assert made.exit_code == 0, (account, made.stderr)
        assert [status['account_slug'] for status in json.loads(made.stdout)] == [slug], account
        shown = await invoke('budget', 'show', '--account', account, '--json', env=env)
        assert [status['account_slug'] for status in json.loads(shown.stdout)] == [slug], account
    assert (await invoke('budget', 'remove', '--account', '007', env=env)).exit_code == 0
    left = json.loads((await invoke('budget', 'show', '--json', env=env)).stdout)
    assert [status['account_slug'] for status in left] == [accounts.clash_slug]  # green-grocer never had one
    # What the error suggests names each: `id:` the id even where the digits alone are refused.
    made = await invoke('budget', 'set', '--account', f'id:{accounts.green}', '--limit', '3', '--json', env=env)
    assert [status['account_slug'] for status in json.loads(made.stdout)] == ['green-grocer'], made.stderr
    for account, slug in ((f'id:{accounts.green}', 'green-grocer'), (f'id:{accounts.clash}', accounts.clash_slug)):
        shown = await invoke('budget', 'show', '--account', account, '--json', env=env)
        assert [status['account_slug'] for status in json.loads(shown.stdout)] == [slug], (account, shown.stderr)


async def test_bad_flags_are_usage_errors_with_one_line(demo_data: None, database_url: str) -> None:
    env = {'DATABASE_URL': database_url}
    for args, message in [
        (('--account', 'acme-health', '--limit', 'lots'), 'the limit must be an amount in USD'),
        (('--account', 'acme-health', '--limit', '-1'), 'from 0 to 1,000,000,000'),
        (('--account', 'acme-health', '--limit', 'NaN'), 'from 0 to'),
        # finer than PostgreSQL's numeric stores: the driver's "cannot encode Decimal value into numeric" reached
        # the user; 1e-16383 was taken, a 16,383-digit limit in every `budget show`
        (('--account', 'acme-health', '--limit', '1e-16384'), 'at most 12 decimal places'),
        (('--account', 'acme-health', '--limit', '1e-13'), 'at most 12 decimal places'),
        (('--account', 'acme-health', '--limit', '0.0000000000001'), 'at most 12 decimal places'),
        # digits Python reads and a person may not: another script's, digit groups
        (('--account', 'acme-health', '--limit', '\u0665'), 'the limit must be an amount in USD'),
        (('--account', 'acme-health', '--limit', '1_000'), 'the limit must be an amount in USD'),
        (('--account', 'acme-health', '--limit', '5', '--period', 'fortnight'), 'month, week, day or a window'),
        (('--account', 'acme-health', '--limit', '5', '--period', '0d'), 'month, week, day or a window'),
        # a month to most readers: was a 1-minute window (QA)
        (('--account', 'acme-health', '--limit', '5', '--period', '1M'), 'ambiguous, months or minutes'),
        (('--account', 'acme-health', '--limit', '5', '--anchor', '2026-01-01'), 'custom window'),
        (('--account', 'acme-health', '--limit', '5', '--period', '7d', '--anchor', 'soon'), '--anchor must be'),
        # the first and last instants in UTC: the driver sends them as -infinity/infinity (was the database's
        # 'timestamp out of range', naming no option)
        (('--account', 'acme-health', '--limit', '5', '--period', '7d', '--anchor', '0001-01-01'), '--anchor'),
        (
            ('--account', 'acme-health', '--limit', '5', '--period', '7d', '--anchor', '9999-12-31T23:59:59.999999'),
            '--anchor',
        ),
        (('--account', 'nobody', '--limit', '5'), "unknown account 'nobody'"),
        (('--account', 'acme-health'), "Missing option '--limit'"),
    ]:
        result = await invoke('budget', 'set', *args, env=env)
        assert result.exit_code == EXIT_USAGE, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error:') and message in lines[0], (args, result.stderr)
    assert (await invoke('budget', 'show', '--json', env=env)).stdout.strip() == '[]', 'nothing was set'


async def test_a_chat_turn_the_budget_refuses_exits_10_and_sends_nothing(demo_data: None, database_url: str) -> None:
    # Nothing listens at this address: a request that were sent would fail with a connection error, not exit 10.
    env = {'DATABASE_URL': database_url, 'OPENAI_API_KEY': 'sk-test', 'OPENAI_BASE_URL': 'http://127.0.0.1:9/v1'}
    await invoke('budget', 'set', '--account', 'acme-health', '--limit', '0', env=env)
    priced = ('chat', '--session', 'broke', '--model', 'openai-chat:gpt-4o-mini', 'Find cardiologists')
    result = await invoke(*priced, env=env)
    assert result.exit_code == EXIT_BUDGET == 10, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the budget of account 'acme-health' does not cover") and 'not sent' in lines[-1]
    unpriced = await invoke('chat', '--session', 'broke', '--model', 'demo', 'Find cardiologists', env=env)
    assert unpriced.exit_code == EXIT_BUDGET and "model 'demo' has no price" in unpriced.stderr
    audit = json.loads((await invoke('audit', 'list', '--account', 'acme-health', '--json', env=env)).stdout)
    assert [(item['status'], item['total_cost']) for item in audit['items']] == [('refused', '0'), ('refused', '0')]
    costs = json.loads((await invoke('costs', '--source', 'ledger', '--json', env=env)).stdout)
    assert costs['groups'] == [], 'a refusal is not a model request'


async def test_tiny_amounts_print_in_plain_notation_never_as_exponents(demo_data: None, database_url: str) -> None:
    # `str()` of a decimal under a millionth is `1E-9`: what the JSON of `budget`, `costs` and `audit` printed.
    env = {'DATABASE_URL': database_url}
    made = await invoke('budget', 'set', '--account', 'acme-health', '--limit', '0.000000001', '--json', env=env)
    [status] = json.loads(made.stdout)
    assert (status['limit_usd'], status['remaining_usd']) == ('0.000000001', '0.000000001'), made.stdout
    table = await invoke('budget', 'show', env=env)
    [row] = [line for line in table.stdout.splitlines() if 'acme-health' in line]
    assert [cell.strip() for cell in row.split('│')[1:3]] == ['acme-health', '0.000000001'], row  # was 0.00
    await invoke('budget', 'set', '--account', 'acme-health', '--limit', '1234.5', env=env)
    wide = await invoke('budget', 'show', env=env)
    assert '1,234.50' in wide.stdout and '0.000000' in wide.stdout, wide.stdout  # cents and micro-dollars as before
    [row] = [line for line in wide.stdout.splitlines() if 'acme-health' in line]
    # What remains is grouped as the limit is (it printed 1234.500000 under a limit of 1,234.50).
    assert [cell.strip() for cell in row.split('│')][7] == '1,234.500000', row

    acme = await account_id('acme-health')
    await write_ledger_row(ledger_record(cost='0.00000015', account_id=acme, account_slug='acme-health'))
    outputs = [
        (await invoke('costs', '--source', 'ledger', '--json', env=env)).stdout,
        (await invoke('costs', '--source', 'ledger', '--csv', env=env)).stdout,
        (await invoke('audit', 'list', '--account', 'acme-health', '--json', env=env)).stdout,
        (await invoke('audit', 'list', '--account', 'acme-health', '--csv', env=env)).stdout,
    ]
    assert json.loads(outputs[0])['groups'][0]['total_cost'] == '0.00000015'
    assert json.loads(outputs[2])['items'][0]['total_cost'] == '0.00000015'
    assert all('0.00000015' in output and 'E-' not in output for output in outputs), outputs


async def test_an_interactive_chat_goes_on_after_a_turn_the_budget_refused(demo_data: None, database_url: str) -> None:
    # A refused turn ended the whole conversation (exit 10 after the first line; the next lines were never read),
    # where every other failed turn is one `error:` line and the conversation goes on: the account's owner may raise
    # the limit meanwhile, or the period end.
    env = {'DATABASE_URL': database_url}
    await invoke('budget', 'set', '--account', 'acme-health', '--limit', '5', env=env)
    lines = 'Find cardiologists\nFind dentists\nFind nurses\n'
    result = await invoke('chat', '--session', 'refused-lines', '--delay', '0', input=lines, env=env)
    assert result.exit_code == EXIT_BUDGET, result.stderr
    assert result.stderr.count("model 'demo' has no price") == 3, result.stderr
    assert 'error: 3 of 3 turns failed' in result.stderr


async def test_a_live_slug_that_is_a_deleted_accounts_id_is_the_live_account(
    deleted_id_slug: DeletedIdSlug, database_url: str
) -> None:
    # Budgets are a live account's (a deleted account's went with it): the slug names the live account, unrefused,
    # where audit and costs refuse it while the deleted account's requests are in the ledger.
    accounts, env = deleted_id_slug, {'DATABASE_URL': database_url}
    made = await invoke('budget', 'set', '--account', accounts.live_slug, '--limit', '5', '--json', env=env)
    assert made.exit_code == 0, made.stderr
    assert [status['account_slug'] for status in json.loads(made.stdout)] == [accounts.live_slug]
