"""Helpers of budget tests: setting a budget, and readers of the budget tables."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import text

from agentrt.db.session import get_db_session
from agentrt.services.budgets import Period, set_budget


async def give_budget(account: str | int, limit: str, period: str = 'month') -> None:
    """Set the account's budget."""
    async with get_db_session() as session:
        await set_budget(session=session, account=account, limit_usd=Decimal(limit), period=Period.parse(period))


async def period_row(account_id: int) -> dict[str, Any] | None:
    """The account's (only) window row."""
    async with get_db_session() as session:
        row = (
            (await session.execute(text('SELECT * FROM budget_periods WHERE account_id = :a'), {'a': account_id}))
            .mappings()
            .first()
        )
    return dict(row) if row is not None else None


async def reservations(account_id: int | None = None) -> list[dict[str, Any]]:
    """Reservations held, for one account or all."""
    where = 'WHERE account_id = :a' if account_id is not None else ''
    async with get_db_session() as session:
        rows = (await session.execute(text(f'SELECT * FROM budget_reservations {where}'), {'a': account_id})).mappings()
        return [dict(row) for row in rows]
