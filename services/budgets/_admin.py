"""Setting, removing and reading account budgets (the `agentrt budget` commands and `GET /api/v1/budget`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from sqlalchemy import delete, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.errors import InvalidInputError
from agentrt.db.models import AccountBudget, BudgetPeriod
from agentrt.services.budgets._settle import WINDOW_LOCK
from agentrt.services.budgets._windows import Period, default_anchor, window_sql
from agentrt.services.tenancy import get_account

_INFINITE = (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))
"""The instants asyncpg stores as -infinity and infinity."""

MAX_LIMIT_USD = Decimal('1000000000')
MAX_LIMIT_PLACES = 12
"""Decimal places a limit may have: a millionth of a micro-dollar."""
_FINEST = Decimal(1).scaleb(-MAX_LIMIT_PLACES)
_AMOUNT = re.compile(r'(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?')
_START, _END = window_sql('b', 'now()')

_WINDOWS_LOCKED = text('SELECT pg_advisory_xact_lock(:key)')
"""`WINDOW_LOCK` exclusive, until the transaction ends: no ledger write settles into a window being deleted."""

_STATUS = text(f"""
SELECT a.id AS account_id, a.slug AS account_slug, b.limit_usd, b.period, b.window_seconds, b.window_anchor,
       w.period_start, w.period_end,
       coalesce(p.spent_usd + u.spent, s.spent, 0) AS spent_usd,
       coalesce(p.reserved_usd - u.held, 0) AS reserved_usd,
       coalesce(p.spent_tokens + u.tokens, s.tokens, 0)::bigint AS spent_tokens,  -- sums of bigint are numeric
       coalesce(p.refused_requests, 0) AS refused_requests,
       (SELECT count(*) FROM budget_reservations AS h
        WHERE h.account_id = b.account_id AND h.period_start = w.period_start) AS holds,
       b.updated_at
FROM account_budgets AS b
JOIN accounts AS a ON a.id = b.account_id
CROSS JOIN LATERAL (SELECT {_START} AS period_start, {_END} AS period_end) AS w
LEFT JOIN budget_periods AS p ON p.account_id = b.account_id AND p.period_start = w.period_start
-- Settlements the writer appended that no admission has folded into the window row yet.
CROSS JOIN LATERAL (
    SELECT coalesce(sum(x.held_usd), 0) AS held, coalesce(sum(x.spent_usd), 0) AS spent,
           coalesce(sum(x.tokens), 0) AS tokens
    FROM budget_settlements AS x WHERE x.account_id = b.account_id AND x.period_start = w.period_start
) AS u
LEFT JOIN LATERAL (
    -- What settlements charged beyond a row's total_cost (`budget_charges`), as the window row would have.
    SELECT coalesce(sum(r.total_cost), 0) + (
               SELECT coalesce(sum(c.extra_usd), 0) FROM budget_charges AS c
               WHERE p.account_id IS NULL AND c.account_id = b.account_id
                 AND c.started_at >= w.period_start AND c.started_at < w.period_end
           ) AS spent,
           coalesce(sum(r.total_tokens), 0) AS tokens
    FROM llm_requests AS r
    WHERE p.account_id IS NULL AND r.account_id = b.account_id AND r.status <> 'refused'
      AND r.started_at >= w.period_start AND r.started_at < w.period_end
) AS s ON true
WHERE CAST(:account_id AS bigint) IS NULL OR b.account_id = CAST(:account_id AS bigint)
ORDER BY a.slug
""")


@dataclass(frozen=True)
class BudgetStatus:
    """An account's budget and where its current period stands."""

    account_id: int
    account_slug: str
    limit_usd: Decimal
    period: str
    """`month`, `week`, `day`, or a custom window such as `7d`."""
    window_anchor: datetime | None
    """Where a custom window's periods are counted from (None for calendar periods)."""
    period_start: datetime
    period_end: datetime
    spent_usd: Decimal
    """What the period's requests cost (settled ledger rows)."""
    reserved_usd: Decimal
    """What requests in flight hold."""
    remaining_usd: Decimal
    """`limit - spent - reserved`, at least 0."""
    holds: int
    """Reservations held now (requests in flight)."""
    spent_tokens: int
    refused_requests: int
    updated_at: datetime


def parse_limit(value: str | Decimal | float | int) -> Decimal:
    """A limit in USD: a finite decimal from 0 to 1,000,000,000, with at most `MAX_LIMIT_PLACES` decimal places; as
    text, in ASCII digits (`50`, `$12.50`, `1e3`).

    Raises:
        InvalidInputError: anything else (field `limit`).
    """
    text = str(value).strip().lstrip('$')
    not_an_amount = InvalidInputError(
        f'the limit must be an amount in USD such as 50 or 12.50, got {value!r}', field='limit'
    )
    try:
        limit = Decimal(text)
    except (InvalidOperation, ValueError):
        raise not_an_amount from None
    if not limit.is_finite() or limit < 0 or limit > MAX_LIMIT_USD:
        raise InvalidInputError(
            f'the limit must be an amount in USD from 0 to {MAX_LIMIT_USD:,}, got {value!r}', field='limit'
        )
    # Python's Decimal reads digits of every script and digit groups (`1_000`): a limit typed in another script's
    # digits was taken as its value, silently.
    if isinstance(value, str) and not _AMOUNT.fullmatch(text):
        raise not_an_amount
    exponent = limit.as_tuple().exponent
    assert isinstance(exponent, int)  # a finite decimal's
    # PostgreSQL's numeric keeps 16,383 digits after the point: past them the driver's own error reached the user,
    # and within them a limit of thousands of digits was stored and shown. Far finer than any request's cost.
    if exponent < -MAX_LIMIT_PLACES and limit != limit.quantize(_FINEST):
        raise InvalidInputError(
            f'the limit must be an amount in USD with at most {MAX_LIMIT_PLACES} decimal places, got {value!r}',
            field='limit',
        )
    if exponent > 0:  # `1e3`: stored and shown as 1000
        return limit.quantize(Decimal(1))
    return limit.quantize(_FINEST) if exponent < -MAX_LIMIT_PLACES else limit  # only zeros past the last place


async def set_budget(
    *,
    session: AsyncSession,
    account: str | int,
    limit_usd: Decimal,
    period: Period,
    window_anchor: datetime | None = None,
) -> BudgetStatus:
    """Set (or change) the account's budget; it applies to the next model request of every process (for an account
    that had no budget, to the next chat turn: a turn reads whether there is one when it starts).

    Changing only the limit keeps the current period's spending. Changing the period (or a window's anchor) starts
    the new period from what the ledger holds for it; reservations of requests in flight are dropped with the old
    periods (their ledger rows still count when they arrive).

    Raises:
        UnknownTenantError: no such account. InvalidInputError: a limit out of range, an anchor without a window.
    """
    account_row = await get_account(account, session=session)
    limit_usd = parse_limit(limit_usd)
    if window_anchor is not None and period.kind != 'window':
        raise InvalidInputError('an anchor applies to a custom window (e.g. --period 7d) only', field='anchor')
    anchor = None
    if period.kind == 'window':
        anchor = (window_anchor or default_anchor()).astimezone(UTC)
        if anchor in _INFINITE:
            # The driver sends these two instants as -infinity/infinity: every period computed from one was out of
            # range ('timestamp out of range' from the database, naming nothing).
            raise InvalidInputError(
                'an anchor (--anchor) must be after 0001-01-01 00:00 UTC and before 9999-12-31 23:59:59.999999 UTC',
                field='anchor',
            )
    existing = await session.get(AccountBudget, account_row.id, with_for_update=True)
    changed_window = existing is not None and (
        existing.period != period.kind
        or existing.window_seconds != period.window_seconds
        or existing.window_anchor != anchor
    )
    values = {
        'account_id': account_row.id,
        'limit_usd': limit_usd,
        'period': period.kind,
        'window_seconds': period.window_seconds,
        'window_anchor': anchor,
    }
    upsert = pg_insert(AccountBudget).values(values)
    upsert = upsert.on_conflict_do_update(index_elements=['account_id'], set_={**values, 'updated_at': text('now()')})
    await session.execute(upsert)
    if changed_window:
        # Exclusive against the ledger writes (which take it shared): a write whose statement still saw a window row
        # this deletes settled into it, and its settlement failed the foreign key (written unsettled, an ERROR) (QA).
        await session.execute(_WINDOWS_LOCKED, {'key': WINDOW_LOCK})
        await session.execute(delete(BudgetPeriod).where(BudgetPeriod.account_id == account_row.id))
    statuses = await budget_statuses(session=session, account_id=account_row.id)
    return statuses[0]


async def remove_budget(*, session: AsyncSession, account: str | int) -> bool:
    """Remove the account's budget (its periods and reservations go with it). False when it had none.

    Raises:
        UnknownTenantError: no such account.
    """
    account_row = await get_account(account, session=session)
    await session.execute(_WINDOWS_LOCKED, {'key': WINDOW_LOCK})  # its windows go with it: as `set_budget`
    result = await session.execute(
        delete(AccountBudget).where(AccountBudget.account_id == account_row.id).returning(AccountBudget.account_id)
    )
    return result.first() is not None


async def budget_statuses(*, session: AsyncSession, account_id: int | None = None) -> list[BudgetStatus]:
    """Every budget (or the account's), with its current period's figures, by account slug."""
    rows = (await session.execute(_STATUS, {'account_id': account_id})).mappings().all()
    statuses = []
    for row in rows:
        period = Period(row['period'], row['window_seconds'])
        remaining = row['limit_usd'] - row['spent_usd'] - row['reserved_usd']
        statuses.append(
            BudgetStatus(
                account_id=row['account_id'],
                account_slug=row['account_slug'],
                limit_usd=row['limit_usd'],
                period=period.describe(),
                window_anchor=row['window_anchor'],
                period_start=row['period_start'],
                period_end=row['period_end'],
                spent_usd=_plain(row['spent_usd']),
                reserved_usd=_plain(row['reserved_usd']),
                remaining_usd=_plain(max(remaining, Decimal(0))),
                holds=row['holds'],
                spent_tokens=row['spent_tokens'],
                refused_requests=row['refused_requests'],
                updated_at=row['updated_at'],
            )
        )
    return statuses


def _plain(amount: Decimal) -> Decimal:
    """A zero as `0`, not `0E-7` (what subtracting two amounts of seven decimals gives)."""
    return amount if amount != 0 else Decimal(0)


async def account_budget_status(*, session: AsyncSession, account: str | int) -> BudgetStatus | None:
    """The account's budget and current period, or None when it has no budget.

    Raises:
        UnknownTenantError: no such account.
    """
    account_row = await get_account(account, session=session)
    statuses = await budget_statuses(session=session, account_id=account_row.id)
    return statuses[0] if statuses else None
