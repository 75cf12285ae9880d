"""The test oracle for the daily usage rollup: the same totals summed in raw SQL from the rollup and from the ledger.

Kept in tests on purpose: it is written independently of `agentrt.services.ledger` (its own SQL), so a mistake in
the roll-up shows up as a difference between `rollup_totals()` and `ledger_totals()`. It also compares columns the
product's cost report does not show (cache and reasoning tokens, the input/output cost split).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

Grouping = Literal['account', 'agent', 'model', 'day']
GROUPINGS: tuple[Grouping, ...] = ('account', 'agent', 'model', 'day')

_COUNTERS = (
    'requests',
    'failed_requests',
    'cancelled_requests',
    'unpriced_requests',
    'input_tokens',
    'output_tokens',
    'cache_read_tokens',
    'cache_write_tokens',
    'reasoning_tokens',
    'total_tokens',
    'input_cost',
    'output_cost',
    'total_cost',
)
_LABELS = ('account_slug', 'agent_instance_slug', 'agent_name')
# Per grouping: the key columns, and the labels reported with them (the greatest in the group). An agent is its
# instance and its name: two agents on one instance, or agents without one, are apart in the ledger, and so must be in
# the rollup (they were one bucket under the greatest name, QA).
_GROUPINGS: dict[Grouping, tuple[tuple[str, ...], tuple[str, ...]]] = {
    'account': (('account_id',), ('account_slug',)),
    'agent': (('account_id', 'agent_instance_id', 'agent_name'), ('account_slug', 'agent_instance_slug')),
    'model': (('model',), ()),
    'day': (('day',), ()),
}
_LEDGER_SUMS = """
    count(*) AS requests,
    count(*) FILTER (WHERE r.status = 'error') AS failed_requests,
    count(*) FILTER (WHERE r.status = 'cancelled') AS cancelled_requests,
    count(*) FILTER (WHERE r.total_cost IS NULL) AS unpriced_requests,
    coalesce(sum(r.input_tokens), 0)::bigint AS input_tokens,
    coalesce(sum(r.output_tokens), 0)::bigint AS output_tokens,
    coalesce(sum(r.cache_read_tokens), 0)::bigint AS cache_read_tokens,
    coalesce(sum(r.cache_write_tokens), 0)::bigint AS cache_write_tokens,
    coalesce(sum(r.reasoning_tokens), 0)::bigint AS reasoning_tokens,
    coalesce(sum(r.total_tokens), 0)::bigint AS total_tokens,
    coalesce(sum(r.input_cost), 0) AS input_cost,
    coalesce(sum(r.output_cost), 0) AS output_cost,
    coalesce(sum(r.total_cost), 0) AS total_cost
"""
# sum(bigint) is numeric in PostgreSQL: counters go back to bigint, costs stay numeric.
_ROLLUP_SUMS = ', '.join(
    f'coalesce(sum(r.{name}), 0){"" if name.endswith("_cost") else "::bigint"} AS {name}' for name in _COUNTERS
)


@dataclass(frozen=True)
class UsageTotals:
    """Summed usage for one group; the key and label fields the grouping does not use are None."""

    day: date | None
    account_id: int | None
    agent_instance_id: int | None
    model: str | None
    account_slug: str | None
    agent_instance_slug: str | None
    agent_name: str | None
    requests: int
    failed_requests: int
    cancelled_requests: int
    unpriced_requests: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    total_tokens: int
    input_cost: Decimal
    output_cost: Decimal
    total_cost: Decimal


async def rollup_totals(
    by: Grouping,
    *,
    session: AsyncSession,
    first_day: date | None = None,
    last_day: date | None = None,
    account_id: int | None = None,
) -> list[UsageTotals]:
    """Usage grouped `by` account, agent, model or day, summed from `usage_daily_rollups`."""
    return await _totals('usage_daily_rollups AS r', _ROLLUP_SUMS, by, session, first_day, last_day, account_id)


async def ledger_totals(
    by: Grouping,
    *,
    session: AsyncSession,
    first_day: date | None = None,
    last_day: date | None = None,
    account_id: int | None = None,
) -> list[UsageTotals]:
    """The same totals computed by scanning `llm_requests`: what the rollup must equal."""
    # Requests a budget refused were never sent: they are in the audit, not in any total.
    source = (
        "(SELECT (r.started_at AT TIME ZONE 'UTC')::date AS day, r.* FROM llm_requests AS r"
        " WHERE r.status <> 'refused') AS r"
    )
    return await _totals(source, _LEDGER_SUMS, by, session, first_day, last_day, account_id)


async def _totals(
    source: str,
    sums: str,
    by: Grouping,
    session: AsyncSession,
    first_day: date | None,
    last_day: date | None,
    account_id: int | None,
) -> list[UsageTotals]:
    keys, labels = _GROUPINGS[by]  # the allowlist: `by` never reaches SQL as text
    conditions, params = ['TRUE'], dict[str, Any]()
    if first_day is not None:
        conditions.append('r.day >= :first_day')
        params['first_day'] = first_day
    if last_day is not None:
        conditions.append('r.day <= :last_day')
        params['last_day'] = last_day
    if account_id is not None:
        conditions.append('r.account_id = :account_id')
        params['account_id'] = account_id
    group = ', '.join(f'r.{key}' for key in keys)
    selected = ', '.join([group, *(f'max(r.{label}) AS {label}' for label in labels), sums])
    query = text(f'SELECT {selected} FROM {source} WHERE {" AND ".join(conditions)} GROUP BY {group} ORDER BY {group}')
    rows = (await session.execute(query, params)).mappings().all()
    empty = dict.fromkeys(('day', 'account_id', 'agent_instance_id', 'model', *_LABELS))
    return [UsageTotals(**{**empty, **row}) for row in rows]
