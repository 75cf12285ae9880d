"""Looking up accounts and agent instances by slug, with errors that list what exists."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.errors import AgentRuntimeError
from agentrt.db.models import Account, AgentInstance


class UnknownTenantError(AgentRuntimeError):
    """An account or agent slug that does not exist.

    Attributes:
        what: `'account'` or `'agent'`: which of the two was not found.
    """

    def __init__(self, message: str, *, what: Literal['account', 'agent'] = 'account') -> None:
        super().__init__(message)
        self.what = what


async def get_account(slug: str, *, session: AsyncSession) -> Account:
    """Return the account with `slug`.

    Raises:
        UnknownTenantError: listing the accounts that exist.
    """
    account = (await session.execute(select(Account).where(Account.slug == slug))).scalar_one_or_none()
    if account is None:
        known = (await session.execute(select(Account.slug).order_by(Account.slug))).scalars().all()
        hint = ', '.join(known) if known else 'none (run `agentrt db seed`)'
        raise UnknownTenantError(f'unknown account {slug!r}; accounts: {hint}')
    return account


async def get_agent_instance(account: Account, slug: str | None, *, session: AsyncSession) -> AgentInstance:
    """Return the account's agent instance `slug`, or its first one when `slug` is None.

    Raises:
        UnknownTenantError: listing the account's agents.
    """
    query = select(AgentInstance).where(AgentInstance.account_id == account.id).order_by(AgentInstance.id)
    agents = (await session.execute(query)).scalars().all()
    for agent in agents:
        if slug is None or agent.slug == slug:
            return agent
    hint = ', '.join(a.slug for a in agents) or 'none'
    raise UnknownTenantError(f'unknown agent {slug!r} for account {account.slug!r}; agents: {hint}', what='agent')
