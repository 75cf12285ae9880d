"""Reading the LLM ledger: list requests with filters and pages, show one with its stored contents."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, exists, func, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from agentrt.db.models.ledger import LLMRequestContentRow, LLMRequestRow
from agentrt.db.models.tenancy import Account, AgentInstance
from agentrt.services.ledger._filters import LedgerFilters
from agentrt.services.pg_text import storable_text

MAX_PAGE_SIZE = 100


class AmbiguousRequestIdError(LookupError):
    """A request id prefix matches more than one ledger row."""


@dataclass(frozen=True)
class LedgerPage:
    """One page of ledger rows, newest first."""

    items: list[LLMRequestRow]
    page: int
    page_size: int
    total: int | None
    """How many rows the filters match; None when the listing was asked not to count them (`count=False`)."""

    @property
    def pages(self) -> int | None:
        """How many pages there are at this page size (None when the rows were not counted)."""
        return None if self.total is None else max(1, -(-self.total // self.page_size))


@dataclass(frozen=True)
class LedgerDetail:
    """One ledger row with its stored contents (prompt, response, error)."""

    request: LLMRequestRow
    contents: list[LLMRequestContentRow]


async def list_requests(
    *,
    session: AsyncSession,
    filters: LedgerFilters | None = None,
    page: int = 1,
    page_size: int = 20,
    after: tuple[datetime, uuid.UUID] | None = None,
    count: bool = True,
) -> LedgerPage:
    """List ledger rows, newest first.

    Args:
        session: the session to read with.
        filters: which rows; all of them when omitted.
        page: 1-based page number (counted from `after` when it is given).
        page_size: rows per page, capped at `MAX_PAGE_SIZE` (100).
        after: a keyset cursor, the `(started_at, id)` of the last row already seen: only older rows are listed,
            however many rows were added since. `total` still counts every row the filters match.
        count: whether to count the rows the filters match (`total`). The count reads every matching row (a
            fifth of a second at a million), so a walk by `after` over a large ledger can leave it out.
    """
    page = max(page, 1)
    page_size = min(max(page_size, 1), MAX_PAGE_SIZE)
    conditions = (await (filters or LedgerFilters()).resolved(session)).conditions()
    total = None
    if count:
        counted = select(func.count()).select_from(LLMRequestRow).where(*conditions)
        total = (await session.execute(counted)).scalar_one()
    if after is not None:
        conditions.append(tuple_(LLMRequestRow.started_at, LLMRequestRow.id) < tuple_(*after))
    query = (
        select(LLMRequestRow)
        .where(*conditions)
        .order_by(LLMRequestRow.started_at.desc(), LLMRequestRow.id.desc())
        .offset((page - 1) * page_size)
        .limit(page_size)
    )
    items = list((await session.execute(query)).scalars())
    return LedgerPage(items=items, page=page, page_size=page_size, total=total)


async def request_position(*, session: AsyncSession, request_id: str | uuid.UUID) -> tuple[datetime, uuid.UUID] | None:
    """The `(started_at, id)` of a request named by its id or a unique prefix of it: the `after` of `list_requests`
    for the rows older than it. None when no request has that id.

    Raises:
        ValueError: `request_id` is not a UUID or a hex prefix of one.
        AmbiguousRequestIdError: the prefix matches several rows.
    """
    query = select(LLMRequestRow.started_at, LLMRequestRow.id).where(_id_condition(request_id)).limit(2)
    found = (await session.execute(query)).all()
    if len(found) > 1:
        raise AmbiguousRequestIdError(f'{request_id!s} matches several requests; give more of the id')
    return (found[0][0], found[0][1]) if found else None


async def get_request(
    *, session: AsyncSession, request_id: str | uuid.UUID, account_id: int | None = None
) -> LedgerDetail | None:
    """One ledger row with its contents, by its id or a unique prefix of it (at least 8 hex digits).

    Args:
        session: the session to read with.
        request_id: the id, or a unique prefix of it.
        account_id: only a row of this account (another account's row is not found, as if it did not exist).

    Raises:
        ValueError: `request_id` is not a UUID or a hex prefix of one.
        AmbiguousRequestIdError: the prefix matches several rows.
    """
    query = select(LLMRequestRow).where(_id_condition(request_id)).limit(2)
    if account_id is not None:
        query = query.where(LLMRequestRow.account_id == account_id)
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


async def agent_is_known(*, session: AsyncSession, agent: str, account: str | int | None = None) -> bool:
    """Whether `agent` names an agent instance, or the agent of a ledger row (an instance's slug or an agent's name,
    as `LedgerFilters.agent` matches), of `account` (an id or a slug) when it is given.

    For a listing that found nothing: to tell "no such agent" (a misspelt `--agent`) from "no activity".
    """
    instances = _instances_of(AgentInstance.id, account).where(AgentInstance.slug == storable_text(agent))
    filters = await LedgerFilters(account=account, agent=agent).resolved(session)
    rows = select(LLMRequestRow.id).where(*filters.conditions())
    return bool((await session.execute(select(or_(exists(instances), exists(rows))))).scalar_one())


async def agent_slugs(*, session: AsyncSession, account: str | int | None = None) -> list[str]:
    """The agent instances' slugs (of `account`, an id or a slug, when given), once each, sorted: what a message
    about an unknown agent lists."""
    query = _instances_of(AgentInstance.slug, account).distinct().order_by(AgentInstance.slug)
    return list((await session.execute(query)).scalars())


def _instances_of(column: InstrumentedAttribute[Any], account: str | int | None) -> Select[tuple[Any]]:
    """`column` of the agent instances of `account` (an id or a slug), or of every account when it is None."""
    query = select(column).join(Account, Account.id == AgentInstance.account_id)
    if isinstance(account, int):
        return query.where(AgentInstance.account_id == account)
    if account is not None:
        return query.where(Account.slug == storable_text(account))
    return query


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
