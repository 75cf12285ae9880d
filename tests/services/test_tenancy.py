"""`lookup_tenant`: one statement, built once per shape, its slugs passed as parameters on each call."""

from __future__ import annotations

import pytest

from agentrt.db.session import Unscoped, get_db_session, get_read_only_session
from agentrt.services.demo_data import MEDICAL_ACCOUNT, PRODUCE_ACCOUNT
from agentrt.services.tenancy import UnknownTenantError, lookup_tenant


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
