"""`agentrt costs` from the daily usage rollup: the same `CostSummary` rows as the ledger scan, without the scan."""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Select, String, case, cast, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.errors import AgentRuntimeError
from agentrt.db.models.usage_rollups import UsageDailyRollup
from agentrt.services.ledger._queries import CostGrouping, CostSummary, LedgerFilters


class RollupCannotAnswer(AgentRuntimeError):
    """The filters need the ledger itself: success, chat session, or a time that is not a UTC midnight."""


async def summarise_costs_from_rollup(
    *, session: AsyncSession, by: CostGrouping, filters: LedgerFilters | None = None
) -> list[CostSummary]:
    """Sum requests, tokens and cost per account, agent, model or UTC day, like `summarise_costs`, from the rollup.

    Groups are labelled and ordered as `summarise_costs` does. The rollup holds what has been rolled
    up: rows the post-turn task has not reached yet (or that were replayed from the spool later) show
    after the next roll-up or `roll_up_pending()`. The model filter matches the requested model only.

    Raises:
        RollupCannotAnswer: a filter needs the ledger; call `summarise_costs` instead.
        ValueError: `by` is not a grouping.
    """
    filters = filters or LedgerFilters()
    key = _group_key(by).label('key')
    r = UsageDailyRollup
    priced_none = func.sum(r.requests) == func.sum(r.unpriced_requests)
    total_cost = case((priced_none, None), else_=func.sum(r.total_cost))
    query: Select[Any] = (
        select(
            key,
            cast(func.sum(r.requests), BigInteger).label('requests'),
            cast(func.sum(r.failed_requests), BigInteger).label('failed'),
            cast(func.sum(r.input_tokens), BigInteger).label('input_tokens'),
            cast(func.sum(r.output_tokens), BigInteger).label('output_tokens'),
            cast(func.sum(r.total_tokens), BigInteger).label('total_tokens'),
            total_cost.label('total_cost'),
            cast(func.sum(r.unpriced_requests), BigInteger).label('unpriced'),
        )
        .where(*_conditions(filters))
        .group_by(key)
    )
    query = query.order_by(key) if by == 'day' else query.order_by(total_cost.desc().nulls_last(), key)
    return [CostSummary(**dict(row)) for row in (await session.execute(query)).mappings()]


def _group_key(by: CostGrouping) -> ColumnElement[Any]:
    """The labels `services.ledger_queries` gives each group, from the rollup's copied slugs."""
    r = UsageDailyRollup
    if by == 'account':
        return func.coalesce(r.account_slug, cast(r.account_id, String), literal('(none)'))
    if by == 'agent':
        account = func.coalesce(r.account_slug, cast(r.account_id, String), literal('-'))
        return account + literal('/') + func.coalesce(r.agent_instance_slug, r.agent_name, literal('(none)'))
    if by == 'model':
        return r.model
    if by == 'day':
        return cast(r.day, String)
    raise ValueError(f'cannot group costs by {by!r}; choose one of account, agent, model, day')


def _conditions(filters: LedgerFilters) -> list[ColumnElement[bool]]:
    if filters.success is not None or filters.chat_session_id is not None:
        raise RollupCannotAnswer('the usage rollup has no success or chat-session breakdown; read the ledger')
    r = UsageDailyRollup
    conditions: list[ColumnElement[bool]] = []
    if isinstance(filters.account, int):
        conditions.append(r.account_id == filters.account)
    elif filters.account is not None:
        conditions.append(r.account_slug == filters.account)
    if filters.agent is not None:
        conditions.append(or_(r.agent_instance_slug == filters.agent, r.agent_name == filters.agent))
    if filters.model is not None:
        conditions.append(r.model == filters.model)
    if filters.since is not None:
        conditions.append(r.day >= _utc_day(filters.since, '--since'))
    if filters.until is not None:
        conditions.append(r.day < _utc_day(filters.until, '--until'))
    return conditions


def _utc_day(moment: datetime, what: str) -> Any:
    utc = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    if utc.time() != time.min:
        raise RollupCannotAnswer(f'{what} {moment.isoformat()} is not a UTC day boundary; the rollup is per day')
    return utc.date()
