"""Reading the LLM ledger: list interactions with filters and pages, show one with its content, sum costs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import BigInteger, ColumnElement, Select, String, and_, case, cast, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.models.ledger import LLMRequestContentRow, LLMRequestRow

MAX_PAGE_SIZE = 100
CostGrouping = Literal['account', 'agent', 'model', 'day']
COST_GROUPINGS: tuple[CostGrouping, ...] = ('account', 'agent', 'model', 'day')


class AmbiguousRequestIdError(LookupError):
    """A request id prefix matches more than one ledger row."""


@dataclass(frozen=True)
class LedgerFilters:
    """Which ledger rows to include. Every field is optional; all given ones must match."""

    success: bool | None = None
    account: str | int | None = None
    """An account id, or an account slug."""
    agent: str | None = None
    """An agent instance slug, or an agent name."""
    model: str | None = None
    """The requested model name, or the one the provider reported."""
    chat_session_id: str | None = None
    since: datetime | None = None
    """Requests started at or after this time."""
    until: datetime | None = None
    """Requests started before this time."""

    def conditions(self) -> list[ColumnElement[bool]]:
        """The filters as SQL conditions (values bound as parameters)."""
        row = LLMRequestRow
        conditions: list[ColumnElement[bool]] = []
        if self.success is not None:
            conditions.append(row.success.is_(self.success))
        if isinstance(self.account, int):
            conditions.append(row.account_id == self.account)
        elif self.account is not None:
            conditions.append(row.account_slug == self.account)
        if self.agent is not None:
            conditions.append(or_(row.agent_instance_slug == self.agent, row.agent_name == self.agent))
        if self.model is not None:
            conditions.append(or_(row.model == self.model, row.response_model == self.model))
        if self.chat_session_id is not None:
            conditions.append(row.chat_session_id == self.chat_session_id)
        if self.since is not None:
            conditions.append(row.started_at >= self.since)
        if self.until is not None:
            conditions.append(row.started_at < self.until)
        return conditions


@dataclass(frozen=True)
class LedgerPage:
    """One page of ledger rows, newest first."""

    items: list[LLMRequestRow]
    page: int
    page_size: int
    total: int

    @property
    def pages(self) -> int:
        """How many pages there are at this page size."""
        return max(1, -(-self.total // self.page_size))


@dataclass(frozen=True)
class LedgerDetail:
    """One ledger row with its stored contents (prompt, response, error)."""

    request: LLMRequestRow
    contents: list[LLMRequestContentRow]


@dataclass(frozen=True)
class CostSummary:
    """Totals for one group of requests."""

    key: str
    requests: int
    failed: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    total_cost: Decimal | None
    unpriced: int
    """Requests without a price (unknown model, or usage not reported): counted in tokens, not in cost."""


async def list_requests(
    *, session: AsyncSession, filters: LedgerFilters | None = None, page: int = 1, page_size: int = 20
) -> LedgerPage:
    """List ledger rows, newest first.

    Args:
        session: the session to read with.
        filters: which rows; all of them when omitted.
        page: 1-based page number.
        page_size: rows per page, capped at `MAX_PAGE_SIZE` (100).
    """
    page = max(page, 1)
    page_size = min(max(page_size, 1), MAX_PAGE_SIZE)
    conditions = (filters or LedgerFilters()).conditions()
    total = (await session.execute(select(func.count()).select_from(LLMRequestRow).where(*conditions))).scalar_one()
    query = (
        select(LLMRequestRow)
        .where(*conditions)
        .order_by(LLMRequestRow.started_at.desc(), LLMRequestRow.id.desc())
        .offset((page - 1) * page_size)
        .limit(page_size)
    )
    items = list((await session.execute(query)).scalars())
    return LedgerPage(items=items, page=page, page_size=page_size, total=total)


async def get_request(*, session: AsyncSession, request_id: str | uuid.UUID) -> LedgerDetail | None:
    """One ledger row with its contents, by its id or a unique prefix of it (at least 8 hex digits).

    Raises:
        ValueError: `request_id` is not a UUID or a hex prefix of one.
        AmbiguousRequestIdError: the prefix matches several rows.
    """
    query = select(LLMRequestRow).where(_id_condition(request_id)).limit(2)
    found = list((await session.execute(query)).scalars())
    if len(found) > 1:
        raise AmbiguousRequestIdError(f'{request_id!s} matches several requests; give more of the id')
    if not found:
        return None
    contents = await session.execute(
        select(LLMRequestContentRow)
        .where(LLMRequestContentRow.request_id == found[0].id)
        .order_by(case({'prompt': 0, 'response': 1}, value=LLMRequestContentRow.kind, else_=2))
    )
    return LedgerDetail(request=found[0], contents=list(contents.scalars()))


def _id_condition(request_id: str | uuid.UUID) -> ColumnElement[bool]:
    if isinstance(request_id, uuid.UUID):
        return LLMRequestRow.id == request_id
    digits = request_id.strip().lower().replace('-', '')
    if len(digits) < 8 or len(digits) > 32 or any(c not in '0123456789abcdef' for c in digits):
        raise ValueError(f'not a request id: {request_id!r} (expected a UUID or at least 8 of its hex digits)')
    if len(digits) == 32:
        return LLMRequestRow.id == uuid.UUID(digits)
    # A prefix is a range of the primary key: an index range scan, not a text match over the table.
    low, high = uuid.UUID(digits.ljust(32, '0')), uuid.UUID(digits.ljust(32, 'f'))
    return and_(LLMRequestRow.id >= low, LLMRequestRow.id <= high)


def _group_key(by: CostGrouping) -> ColumnElement[Any]:
    row = LLMRequestRow
    none = literal('(none)')
    if by == 'account':
        return func.coalesce(row.account_slug, cast(row.account_id, String), none)
    if by == 'agent':
        account = func.coalesce(row.account_slug, cast(row.account_id, String), literal('-'))
        return account + literal('/') + func.coalesce(row.agent_instance_slug, row.agent_name, none)
    if by == 'model':
        return row.model
    if by == 'day':
        return cast(func.date(func.timezone('UTC', row.started_at)), String)
    raise ValueError(f'cannot group costs by {by!r}; choose one of {", ".join(COST_GROUPINGS)}')


async def summarise_costs(
    *, session: AsyncSession, by: CostGrouping, filters: LedgerFilters | None = None
) -> list[CostSummary]:
    """Sum requests, tokens and cost per account, agent, model or UTC day.

    Days are listed in date order; other groupings by cost, highest first.

    Raises:
        ValueError: `by` is not one of `COST_GROUPINGS`.
    """
    row = LLMRequestRow
    key = _group_key(by).label('key')
    query: Select[Any] = (
        select(
            key,
            func.count().label('requests'),
            func.count().filter(row.success.is_(False)).label('failed'),
            cast(func.coalesce(func.sum(row.input_tokens), 0), BigInteger).label('input_tokens'),
            cast(func.coalesce(func.sum(row.output_tokens), 0), BigInteger).label('output_tokens'),
            cast(func.coalesce(func.sum(row.total_tokens), 0), BigInteger).label('total_tokens'),
            func.sum(row.total_cost).label('total_cost'),
            func.count().filter(row.total_cost.is_(None)).label('unpriced'),
        )
        .where(*(filters or LedgerFilters()).conditions())
        .group_by(key)
    )
    if by == 'day':
        query = query.order_by(key)
    else:
        query = query.order_by(func.sum(row.total_cost).desc().nulls_last(), key)
    result = await session.execute(query)
    return [CostSummary(**dict(r)) for r in result.mappings()]
