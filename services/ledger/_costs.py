"""Cost reports: requests, tokens and cost per account, agent, model or UTC day, from the ledger or the daily rollup.

One query shape for both sources: the same filters (`LedgerFilters`), the same group labels and order, the same
`CostSummary` rows. The ledger scan sees every row at once; the rollup answers without the scan, for what the
post-turn roll-up (or `roll_up_pending()`) has reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import BigInteger, ColumnElement, Select, String, case, cast, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.models.ledger import LLMRequestRow
from agentrt.db.models.usage_rollups import UsageDailyRollup
from agentrt.services.ledger._filters import CostSource, LedgerFilters

CostGrouping = Literal['account', 'agent', 'model', 'day']
COST_GROUPINGS: tuple[CostGrouping, ...] = ('account', 'agent', 'model', 'day')
COST_SOURCES: tuple[CostSource, ...] = ('ledger', 'rollup')


@dataclass(frozen=True)
class CostSummary:
    """Totals for one group of requests."""

    key: str
    requests: int
    failed: int
    """Requests that failed (a provider error, an unusable answer): not the cancelled ones."""
    cancelled: int
    """Requests the caller stopped (a stopped stream, a cancelled turn): counted apart from `failed`."""
    input_tokens: int
    output_tokens: int
    total_tokens: int
    total_cost: Decimal | None
    unpriced: int
    """Requests without a price (unknown model, or usage not reported): counted in tokens, not in cost."""


async def summarise_costs(
    *,
    session: AsyncSession,
    by: CostGrouping,
    filters: LedgerFilters | None = None,
    source: CostSource = 'ledger',
) -> list[CostSummary]:
    """Sum requests, tokens and cost per account, agent, model or UTC day.

    Days are listed in date order; other groupings by cost, highest first. Both sources give the same rows for
    the same requests; the rollup holds what has been rolled up (rows the post-turn task has not reached yet, or
    replayed from the spool later, show after the next roll-up or `roll_up_pending()`).

    Args:
        session: the session to read with.
        by: the grouping.
        filters: which requests; all of them when omitted.
        source: `'ledger'` scans `llm_requests`; `'rollup'` reads `usage_daily_rollups`.

    Raises:
        ValueError: `by` is not one of `COST_GROUPINGS`, or `source` not one of `COST_SOURCES`.
        RollupCannotAnswer: `source` is `'rollup'` and a filter needs the ledger; ask the ledger instead.
    """
    if by not in COST_GROUPINGS:  # the allowlist: `by` picks an expression, it never reaches SQL as text
        raise ValueError(f'cannot group costs by {by!r}; choose one of {", ".join(COST_GROUPINGS)}')
    if source not in COST_SOURCES:
        raise ValueError(f'unknown cost source {source!r}; choose one of {", ".join(COST_SOURCES)}')
    conditions = (await (filters or LedgerFilters()).resolved(session)).conditions(source)
    if source == 'ledger':  # a request a budget refused was never sent: it is in the audit, not in the costs
        conditions.append(LLMRequestRow.status != 'refused')
    key = _group_key(by, source).label('key')
    totals = _ledger_totals() if source == 'ledger' else _rollup_totals()
    columns = [expression.label(name) for name, expression in totals.items()]
    query: Select[Any] = select(key, *columns).where(*conditions).group_by(key)
    if by == 'day':
        query = query.order_by(key)
    else:
        query = query.order_by(totals['total_cost'].desc().nulls_last(), key)
    return [CostSummary(**dict(row)) for row in (await session.execute(query)).mappings()]


def _group_key(by: CostGrouping, source: CostSource) -> ColumnElement[Any]:
    """The group label; both tables carry the same id and label columns, only the day differs.

    An agent is its instance's slug, or its name when it has no instance: a rollup bucket is one agent instance and
    one agent name (migration 0021), so the rollup's groups hold the same requests as the ledger's.
    """
    table = LLMRequestRow if source == 'ledger' else UsageDailyRollup
    none = literal('(none)')
    if by == 'account':
        return func.coalesce(table.account_slug, cast(table.account_id, String), none)
    if by == 'agent':
        account = func.coalesce(table.account_slug, cast(table.account_id, String), literal('-'))
        return account + literal('/') + func.coalesce(table.agent_instance_slug, table.agent_name, none)
    if by == 'model':
        return table.model.expression
    if source == 'ledger':
        return cast(func.date(func.timezone('UTC', LLMRequestRow.started_at)), String)
    return cast(UsageDailyRollup.day, String)


def _ledger_totals() -> dict[str, ColumnElement[Any]]:
    """`CostSummary`'s totals over ledger rows."""
    row = LLMRequestRow
    return {
        'requests': func.count(),
        'failed': func.count().filter(row.success.is_(False), row.status != 'cancelled'),
        'cancelled': func.count().filter(row.status == 'cancelled'),
        'input_tokens': cast(func.coalesce(func.sum(row.input_tokens), 0), BigInteger),
        'output_tokens': cast(func.coalesce(func.sum(row.output_tokens), 0), BigInteger),
        'total_tokens': cast(func.coalesce(func.sum(row.total_tokens), 0), BigInteger),
        'total_cost': func.sum(row.total_cost),
        'unpriced': func.count().filter(row.total_cost.is_(None)),
    }


def _rollup_totals() -> dict[str, ColumnElement[Any]]:
    """The same totals over rollup buckets, which hold sums already."""
    r = UsageDailyRollup
    # The rollup stores 0 for a bucket without a priced request; the ledger's sum is NULL when none was priced.
    all_unpriced = func.sum(r.requests) == func.sum(r.unpriced_requests)
    return {
        'requests': cast(func.sum(r.requests), BigInteger),
        'failed': cast(func.sum(r.failed_requests), BigInteger),
        'cancelled': cast(func.sum(r.cancelled_requests), BigInteger),
        'input_tokens': cast(func.sum(r.input_tokens), BigInteger),
        'output_tokens': cast(func.sum(r.output_tokens), BigInteger),
        'total_tokens': cast(func.sum(r.total_tokens), BigInteger),
        'total_cost': case((all_unpriced, None), else_=func.sum(r.total_cost)),
        'unpriced': cast(func.sum(r.unpriced_requests), BigInteger),
    }
