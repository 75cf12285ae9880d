"""`lookup_tenant`: one statement, built once per shape, its slugs passed as parameters on each call."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import delete, select, text

from agentrt.db.driver import driver_transaction
from agentrt.db.errors import ConfigError, InvalidInputError
from agentrt.db.models import Account, AgentInstance
from agentrt.db.session import Unscoped, get_db_session, get_read_only_session
from agentrt.services.demo_data import MEDICAL_ACCOUNT, PRODUCE_ACCOUNT
from agentrt.services.tenancy import (
    UnknownTenantError,
    _has_ledger_rows,
    account_slug_or_id,
    lookup_tenant,
    lookup_tenant_on,
)
from tests.factories import ledger_record, write_ledger_row


@pytest.mark.parametrize('enter', [False, True], ids=['read', 'enter'])
async def test_each_lookup_finds_its_own_account_and_agent(demo_data: None, enter: bool) -> None:
    """The statement is reused across calls: the slugs of each call, not of the first, decide what it finds."""
    for account, agent in [
        (MEDICAL_ACCOUNT, None),
        (PRODUCE_ACCOUNT, None),
        (MEDICAL_ACCOUNT, 'provider-finder'),
        (PRODUCE_ACCOUNT, 'supplier-finder'),
    ]:
        async with get_db_session(account=Unscoped.TENANT_LOOKUP) as session:
            tenant = await lookup_tenant(account, agent, session=session, enter=enter)
        assert tenant.account_slug == account
        assert tenant.agent_instance_slug == {MEDICAL_ACCOUNT: 'provider-finder'}.get(account, 'supplier-finder')
        assert tenant.has_budget is False


async def test_an_agent_of_another_account_is_not_found(demo_data: None) -> None:
    async with get_read_only_session(account=Unscoped.TENANT_LOOKUP) as session:
        await lookup_tenant(PRODUCE_ACCOUNT, 'supplier-finder', session=session)
        with pytest.raises(UnknownTenantError, match="unknown agent 'supplier-finder'"):
            await lookup_tenant(MEDICAL_ACCOUNT, 'supplier-finder', session=session)


@pytest.mark.parametrize(
    ('config', 'said'),
    [
        ([1, 2], 'must be a JSON object (or null), not an array'),
        ('medical_providers', 'must be a JSON object (or null), not a string'),
        ({'schemas': 'medical_providers'}, '"schemas" must be a list of schema names (text), not a string'),
        ({'schemas': [1, 2]}, '"schemas" must be a list of schema names (text), not an array holding other values'),
        ({'schemas': {'a': 1}}, '"schemas" must be a list of schema names (text), not an object'),
        # A JSON string holding an object's text: it was decoded twice on the driver path, and the turn ran with it.
        ('{"schemas": ["medical_providers"]}', 'must be a JSON object (or null), not a string'),
    ],
)
async def test_a_malformed_agent_config_is_a_config_error_naming_the_instance_on_both_lookups(
    demo_data: None, config: object, said: str
) -> None:
    # A hand-written config was a raw TypeError in the turn, a string of schemas was read letter by letter, and the
    # directory tools took schemas they could not read as no restriction at all.
    async with get_db_session(account=Unscoped.ADMIN) as session:
        account = (await session.execute(select(Account).where(Account.slug == MEDICAL_ACCOUNT))).scalar_one()
        session.add(AgentInstance(account_id=account.id, slug='odd-config', agent_type='assistant', config=config))
    expected = f"the config of agent instance 'odd-config' of account '{MEDICAL_ACCOUNT}'"
    async with get_read_only_session(account=Unscoped.TENANT_LOOKUP) as session:
        with pytest.raises(ConfigError, match=re.escape(said)) as raised:
            await lookup_tenant(MEDICAL_ACCOUNT, 'odd-config', session=session)
    assert str(raised.value).startswith(expected)
    async with driver_transaction(account=Unscoped.TENANT_LOOKUP) as transaction:
        with pytest.raises(ConfigError, match=re.escape(said)):
            await lookup_tenant_on(transaction, MEDICAL_ACCOUNT, 'odd-config', enter=True)
    async with get_read_only_session(account=Unscoped.TENANT_LOOKUP) as session:  # a null or a good one is read
        assert (await lookup_tenant(MEDICAL_ACCOUNT, 'provider-finder', session=session)).config['schemas']


async def test_an_all_digit_slug_or_id_is_the_account_it_names_and_refused_when_it_names_two(demo_data: None) -> None:
    """Slugs may be all digits: such a value is a slug, an id, or both (refused when they are two accounts)."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        green = (await session.execute(select(Account.id).where(Account.slug == PRODUCE_ACCOUNT))).scalar_one()
        session.add_all(
            [
                Account(id=900_001, slug=str(green), name='Clash'),
                Account(id=900_007, slug='007', name='Zeros'),
                Account(id=900_008, slug='900008', name='Itself'),
            ]
        )
    big = str(2**70)
    async with get_read_only_session(account=Unscoped.ADMIN) as session:
        named = [await account_slug_or_id(value, session=session) for value in ('007', '900001', '900008', '424242')]
        assert named == ['007', 900_001, '900008', 424242]  # a slug, an id, both of one account, no account's slug
        assert [await account_slug_or_id(value, session=session) for value in (big, '²', 'acme')] == [big, '²', 'acme']
        with pytest.raises(InvalidInputError) as refused:
            await account_slug_or_id(str(green), session=session)
    assert refused.value.field == 'account'
    assert str(refused.value) == (
        f"account '{green}' is ambiguous: '{green}' is the slug of account 900001 and the id of account {green} "
        f'(green-grocer); give id:900001 for account 900001, or id:{green} / green-grocer for account {green}'
    )


async def test_id_colon_is_always_the_id_and_what_an_ambiguous_value_suggests(demo_data: None) -> None:
    """The ambiguity error said "give the id, 13 or 2", and 2 was the value refused: `id:N` always names the id N."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        # A swapped pair: no plain value names either of them.
        session.add_all([Account(id=900_400, slug='900401', name='A'), Account(id=900_401, slug='900400', name='B')])
    async with get_read_only_session(account=Unscoped.ADMIN) as session:
        for value in ('900400', '900401'):
            with pytest.raises(InvalidInputError) as refused:
                await account_slug_or_id(value, session=session)
            other = 900_401 if value == '900400' else 900_400
            said = str(refused.value)
            # only the `id:` forms: each account's slug is the other's refused value
            assert said.endswith(f'give id:{other} for account {other}, or id:{value} for account {value}'), said
        named = [await account_slug_or_id(value, session=session) for value in ('id:900400', 'id:900401', 'id:0007')]
        assert named == [900_400, 900_401, 7]
        assert await account_slug_or_id(f'id:{2**63 - 1}', session=session) == 2**63 - 1
        for malformed in ('id:', 'id:x', 'id: 7', 'id:-1', 'id:²', f'id:{2**63}', 'id:' + '9' * 5000):
            with pytest.raises(InvalidInputError, match='is not an account id: id: takes the digits') as bad:
                await account_slug_or_id(malformed, session=session)
            assert bad.value.field == 'account' and len(str(bad.value)) < 120, malformed


async def test_a_live_slug_that_is_a_deleted_accounts_id_is_refused_for_the_ledger_only(demo_data: None) -> None:
    """Ledger rows outlive their account: for a command on them, a live slug that is a deleted account's id (one with
    ledger rows) is both, refused; for the others (budgets: a deleted account has none) it is the live account."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        session.add_all(
            [
                Account(id=900_300, slug='tmpdel', name='Gone'),
                Account(id=900_301, slug='tmpdel2', name='Gone, no requests'),
                Account(id=900_019, slug='900300', name='Live'),
                Account(id=900_020, slug='900301', name='Live too'),
            ]
        )
    await write_ledger_row(ledger_record(account_id=900_300, account_slug='tmpdel'))
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(delete(Account).where(Account.id.in_([900_300, 900_301])))
    async with get_read_only_session(account=Unscoped.ADMIN) as session:
        with pytest.raises(InvalidInputError) as refused:
            await account_slug_or_id('900300', session=session, ledger=True)
        assert str(refused.value) == (
            "account '900300' is ambiguous: '900300' is the slug of account 900019 and the id of a deleted account "
            '900300 whose model requests are in the ledger; give id:900019 for account 900019, or id:900300 for the '
            'deleted account 900300'
        )
        assert await account_slug_or_id('900300', session=session) == '900300'
        assert await account_slug_or_id('900301', session=session, ledger=True) == '900301'  # no rows: the slug
        assert await account_slug_or_id('id:900300', session=session, ledger=True) == 900_300
        # One probe of an index on the account id, not a scan of the ledger (a year of it is a million rows).
        await session.execute(text('SET LOCAL enable_seqscan = off'))
        assert await _has_ledger_rows(900_300, session) and not await _has_ledger_rows(900_301, session)
        plan = (
            await session.execute(text('EXPLAIN SELECT EXISTS (SELECT 1 FROM llm_requests WHERE account_id = 900300)'))
        ).scalars()
        assert 'ix_llm_requests_account_id_' in '\n'.join(plan)
