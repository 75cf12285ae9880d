"""Helpers of budget tests: setting a budget, and readers of the budget tables."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import text

from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.budgets import Hold, Period, Refusal, reserve, set_budget
from agentrt.services.ledger import new_request_id, utc_now

HOUR = 3600.0


async def give_budget(account: str | int, limit: str, period: str = 'month') -> None:
    """Set the account's budget."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await set_budget(session=session, account=account, limit_usd=Decimal(limit), period=Period.parse(period))


async def hold_usd(
    account_id: int, full: str, minimum: str | None = None, *, at: datetime | None = None
) -> Hold | Refusal | None:
    """`reserve` for a new request of the account: `full` USD, at least `minimum` (`full` when None), for an hour."""
    least = Decimal(minimum if minimum is not None else full)
    return await reserve(
        request_id=new_request_id(),
        account_id=account_id,
        full_usd=Decimal(full),
        minimum_usd=least,
        input_usd=least / 2,
        at=at or utc_now(),
        ttl_seconds=HOUR,
    )


_WINDOW = text("""
SELECT p.account_id, p.period_start, p.period_end, p.refused_requests,
       p.spent_usd + coalesce(sum(s.spent_usd), 0) AS spent_usd,
       p.reserved_usd - coalesce(sum(s.held_usd), 0) AS reserved_usd,
       p.spent_tokens + coalesce(sum(s.tokens), 0) AS spent_tokens,
       count(s.id) AS unfolded
FROM budget_periods AS p
LEFT JOIN budget_settlements AS s ON s.account_id = p.account_id AND s.period_start = p.period_start
WHERE p.account_id = :a
GROUP BY p.account_id, p.period_start
""")


async def period_row(account_id: int) -> dict[str, Any] | None:
    """The account's (only) window: its row with the settlements not folded into it yet added in."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        row = (await session.execute(_WINDOW, {'a': account_id})).mappings().first()
    return dict(row) if row is not None else None


async def reservations(account_id: int | None = None) -> list[dict[str, Any]]:
    """Reservations held, for one account or all."""
    where = 'WHERE account_id = :a' if account_id is not None else ''
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = (await session.execute(text(f'SELECT * FROM budget_reservations {where}'), {'a': account_id})).mappings()
        return [dict(row) for row in rows]
