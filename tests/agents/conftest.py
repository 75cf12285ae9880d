"""Helpers for agent tests."""

from __future__ import annotations

from logfire.testing import capfire  # noqa: F401 - the fixture, here rather than through logfire's pytest plugin
from sqlalchemy import select

from agentrt.db.models import Account
from agentrt.db.session import Unscoped, get_db_session


async def account_id(slug: str) -> int:
    """The id of the account `slug`."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(select(Account.id).where(Account.slug == slug))).scalar_one()
