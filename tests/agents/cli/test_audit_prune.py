"""`agentrt audit prune`: stored bodies removed by age or conversation, billing kept; bad input refused, nothing
deleted; `audit show` of a pruned request."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from click.testing import Result

from agentrt.services.ledger import LedgerRecord, LLMRequestTracker
from tests.agents.cli.conftest import DeletedIdSlug, DigitAccounts
from tests.agents.cli.helpers import invoke
from tests.factories import ledger_record, scalar

NOW = datetime.now(UTC)


def _record(account: int, slug: str, conversation: str, days_ago: int, cost: str) -> LedgerRecord:
    return ledger_record(
        started_at=NOW - timedelta(days=days_ago),
        cost=cost,
        account_id=account,
        account_slug=slug,
        chat_session_id=conversation,
        raw_contents=[('prompt', '{"messages": ["hello there"]}'), ('response', '{"parts": ["general kenobi"]}')],
    )


async def _seed(tracker: LLMRequestTracker) -> list[LedgerRecord]:
    records = [
        _record(1, 'acme', 'chat-1', 100, '0.001'),
        _record(1, 'acme', 'chat-2', 100, '0.002'),
        _record(1, 'acme', 'chat-1', 1, '0.004'),
        _record(2, 'globex', 'chat-1', 100, '0.008'),
    ]
    for record in records:
        await tracker.track_request(record)
    await tracker.flush()
    return records


async def _stored() -> set[str]:
    return set(
        await scalar('SELECT coalesce(array_agg(DISTINCT request_id::text), ARRAY[]::text[]) FROM llm_request_contents')
    )


async def _prune(*args: str, database_url: str) -> Result:
    return await invoke('audit', 'prune', *args, env={'DATABASE_URL': database_url})


async def test_bodies_older_than_the_cut_go_billing_and_costs_stay(tracker: LLMRequestTracker, database_url: str):
    records = await _seed(tracker)
    env = {'DATABASE_URL': database_url}
    costs = await invoke('costs', '--source', 'ledger', '--json', env=env)
    assert costs.exit_code == 0, costs.stderr
    pruned = await _prune('--before', '90d', '--json', database_url=database_url)
    assert pruned.exit_code == 0, pruned.stderr
    report = json.loads(pruned.stdout)
    assert (report['bodies'], report['requests']) == (6, 3) and report['bytes'] > 0
    assert await _stored() == {str(records[2].id)}
    assert await scalar('SELECT count(*) FROM llm_requests') == 4
    assert (await invoke('costs', '--source', 'ledger', '--json', env=env)).stdout == costs.stdout
    # An ISO time works the same; nothing left before it.
    again = await _prune('--before', (NOW - timedelta(days=50)).date().isoformat(), database_url=database_url)
    assert again.exit_code == 0, again.stderr
    assert 'removed 0 stored bodies (0 bytes) of 0 model requests; their billing rows are kept' in again.stdout


async def test_a_conversation_of_one_account_only(tracker: LLMRequestTracker, database_url: str) -> None:
    records = await _seed(tracker)
    # chat-1 is a conversation id of two accounts: which one is meant must be said.
    ambiguous = await _prune('--conversation', 'chat-1', database_url=database_url)
    assert ambiguous.exit_code == 2 and ambiguous.stderr.count('error:') == 1, ambiguous.stderr
    assert '--account is required with --conversation' in ambiguous.stderr and 'acme, globex' in ambiguous.stderr
    assert len(await _stored()) == 4
    pruned = await _prune('--conversation', 'chat-1', '--account', 'acme', database_url=database_url)
    assert pruned.exit_code == 0, pruned.stderr
    assert 'removed 4 stored bodies' in pruned.stdout and 'of 2 model requests' in pruned.stdout
    assert await _stored() == {str(records[1].id), str(records[3].id)}


async def test_bad_input_is_one_error_line_and_deletes_nothing(
    tracker: LLMRequestTracker, demo_data: None, database_url: str
) -> None:
    await _seed(tracker)
    future = (NOW + timedelta(days=1)).isoformat()
    for args, said in (
        ((), 'give --before, --conversation, or both'),
        (('--account', 'acme'), 'give --before, --conversation, or both'),
        (('--before', future), 'is in the future'),
        (('--before', 'last week'), '--before must be an ISO date or time'),
        (('--before', '90y'), '--before takes an age in hours, days or weeks'),
        # minutes to one reader, months to another: `6m` meant six months and pruned all but six minutes (QA)
        (('--before', '6m'), 'm is not taken, minutes or months'),
        (('--before', '6M'), 'm is not taken, minutes or months'),
        (('--before', '1.5d'), 'or an age (e.g. 90d, 12h, 2w)'),
        (('--before', '9' * 5000 + 'd'), 'is out of range'),
        (('--before', '9' * 40 + 'd'), 'is out of range'),
        (('--before', '90d', '--account', 'umbrella'), "unknown account 'umbrella'"),
        (('--conversation', 'chat-9', '--account', 'acme'), "no model request of conversation 'chat-9' of account"),
        # One conversation of one account in the ledger, but the database has several accounts (the demo's).
        (('--conversation', 'chat-2'), '--account is required with --conversation'),
    ):
        refused = await _prune(*args, database_url=database_url)
        assert refused.exit_code == 2, (args, refused.stdout, refused.stderr)
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error:') and said in lines[0], (args, refused.stderr)
        assert len(lines[0]) < 400, args  # an age of 5,000 digits was printed in full
        assert len(await _stored()) == 4, args


async def test_audit_show_of_a_pruned_request(tracker: LLMRequestTracker, database_url: str) -> None:
    records = await _seed(tracker)
    assert (await _prune('--before', '30d', database_url=database_url)).exit_code == 0
    env = {'DATABASE_URL': database_url}
    shown = await invoke('audit', 'show', str(records[0].id), env=env)
    assert shown.exit_code == 0, shown.stderr
    assert str(records[0].id) in shown.stdout and '0.001' in shown.stdout
    assert 'no prompt, response or error is stored for this request' in shown.stdout
    as_json = await invoke('audit', 'show', str(records[0].id), '--json', env=env)
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)['contents'] == []


async def _stored_of(account: int) -> int:
    return int(
        await scalar(
            'SELECT count(*) FROM llm_request_contents c JOIN llm_requests r ON r.id = c.request_id '
            'WHERE r.account_id = :account',
            account=account,
        )
    )


async def test_an_all_digit_account_is_its_slug_and_one_that_is_also_an_id_is_refused(
    digit_accounts: DigitAccounts, database_url: str
) -> None:
    # Slugs may be all digits: `--account 2` was always the id 2 and pruned green-grocer's bodies, not those of the
    # account whose slug is `2` (QA).
    accounts = digit_accounts
    everyone = (accounts.acme, accounts.green, accounts.clash, accounts.zeros)
    refused = await _prune('--before', '0h', '--account', accounts.clash_slug, database_url=database_url)
    assert refused.exit_code == 2 and refused.stderr.count('error:') == 1, refused.stderr
    said = ' '.join(refused.stderr.split())
    assert (
        f"'{accounts.clash_slug}' is the slug of account {accounts.clash} and the id of account {accounts.green} "
        f'(green-grocer); give id:{accounts.clash} for account {accounts.clash}, or id:{accounts.green} / '
        f'green-grocer for account {accounts.green}'
    ) in said, said
    assert [await _stored_of(account) for account in everyone] == [2, 2, 2, 2]
    for account, gone in (
        ('007', accounts.zeros),
        (str(accounts.clash), accounts.clash),
        (str(accounts.acme), accounts.acme),
        (f'id:{accounts.green}', accounts.green),  # what the error suggests for the refused value's id
    ):
        pruned = await _prune('--before', '0h', '--account', account, '--json', database_url=database_url)
        assert pruned.exit_code == 0 and json.loads(pruned.stdout)['bodies'] == 2, (account, pruned.stderr)
        assert await _stored_of(gone) == 0, account


async def test_a_live_slug_that_is_a_deleted_accounts_id_with_ledger_rows_is_refused(
    deleted_id_slug: DeletedIdSlug, database_url: str
) -> None:
    # Account 300 deleted (its requests still in the ledger), account 19's slug `300`: `audit prune --account 300`
    # pruned the live account's bodies and `audit list` listed its rows, without a word (QA).
    accounts, env = deleted_id_slug, {'DATABASE_URL': database_url}
    for args in (('list',), ('prune', '--before', '0h')):
        refused = await invoke('audit', *args, '--account', accounts.live_slug, env=env)
        assert refused.exit_code == 2 and refused.stderr.count('error:') == 1, (args, refused.stderr)
        assert (
            f"'{accounts.live_slug}' is the slug of account {accounts.live} and the id of a deleted account "
            f'{accounts.deleted} whose model requests are in the ledger; give id:{accounts.live} for account '
            f'{accounts.live}, or id:{accounts.deleted} for the deleted account {accounts.deleted}'
        ) in ' '.join(refused.stderr.split()), args
    assert [await _stored_of(account) for account in (accounts.deleted, accounts.live)] == [2, 2]
    for account in (accounts.live, accounts.deleted):
        listed = await invoke('audit', 'list', '--account', f'id:{account}', '--json', env=env)
        assert [row['account_id'] for row in json.loads(listed.stdout)['items']] == [account], listed.stderr
        pruned = await _prune('--before', '0h', '--account', f'id:{account}', '--json', database_url=database_url)
        assert pruned.exit_code == 0 and json.loads(pruned.stdout)['bodies'] == 2, (account, pruned.stderr)
        assert await _stored_of(account) == 0, account
