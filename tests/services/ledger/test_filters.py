"""`LedgerFilters`: an account named by its slug is matched by its id (indexed), a deleted account's by the slug."""

from __future__ import annotations

from sqlalchemy import text

from agentrt.db.models.tenancy import Account
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import LedgerFilters, conversation_accounts, list_requests, summarise_costs
from tests.factories import ledger_record, write_ledger_row


async def test_an_accounts_slug_filters_by_its_id_and_a_deleted_accounts_by_its_slug() -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        session.add(Account(slug='tiny', name='Tiny'))
        await session.flush()
        tiny = (await session.execute(text("SELECT id FROM accounts WHERE slug = 'tiny'"))).scalar_one()
    ids = {'tiny': tiny, 'gone': tiny + 1000, 'big': tiny + 2000}  # `gone`: rows outlive their deleted account
    records = [
        ledger_record(account_id=ids[slug], account_slug=slug, chat_session_id=f'{slug}-chat')
        for slug in ('tiny', 'gone', 'big', 'big', 'tiny')
    ]
    for record in records:
        await write_ledger_row(record)

    async with get_db_session(account=Unscoped.ADMIN) as session:
        by_slug = await LedgerFilters(account='tiny').resolved(session)
        deleted = await LedgerFilters(account='gone').resolved(session)
        assert by_slug.account == tiny and deleted.account == 'gone'  # no account has 'gone' any more
        # The condition is on `account_id` (indexed with `started_at`), not the unindexed `account_slug`.
        assert [str(c.compile()) for c in by_slug.conditions()] == ['llm_requests.account_id = :account_id_1']
        assert [str(c.compile()) for c in deleted.conditions()] == ['llm_requests.account_slug = :account_slug_1']

        # The same rows as the slug found, through every reader that takes the filter.
        for slug in ('tiny', 'gone'):
            page = await list_requests(session=session, filters=LedgerFilters(account=slug))
            assert page.total == sum(r.account_slug == slug for r in records)
            assert {r.id for r in page.items} == {r.id for r in records if r.account_slug == slug}
            costs = await summarise_costs(session=session, by='account', filters=LedgerFilters(account=slug))
            assert [row.requests for row in costs] == [page.total]
            found = await conversation_accounts(session=session, conversation=f'{slug}-chat', account=slug)
            assert found == [slug]
