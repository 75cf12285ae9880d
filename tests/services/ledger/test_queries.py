"""Ledger queries: filters, pages capped at 100, one request with its content."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import (
    AmbiguousRequestIdError,
    LedgerFilters,
    LedgerRecord,
    get_request,
    list_requests,
)

DAY1 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DAY2 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


async def test_list_filters_and_orders_newest_first(seeded: list[LedgerRecord]):
    async with get_db_session(account=Unscoped.ADMIN) as session:
        everything = await list_requests(session=session)
        failed = await list_requests(session=session, filters=LedgerFilters(success=False))
        acme = await list_requests(session=session, filters=LedgerFilters(account='acme'))
        by_id = await list_requests(session=session, filters=LedgerFilters(account=2))
        model = await list_requests(session=session, filters=LedgerFilters(model='gpt-4o', agent='support'))
        window = await list_requests(
            session=session, filters=LedgerFilters(since=DAY2, until=DAY2 + timedelta(minutes=2))
        )
        chat = await list_requests(session=session, filters=LedgerFilters(chat_session_id='globex-chat'))
    assert everything.total == 5 and [r.id for r in everything.items] == [r.id for r in reversed(seeded)]
    assert [r.id for r in failed.items] == [seeded[2].id]
    assert acme.total == 3 and by_id.total == 2 and chat.total == 2
    assert [r.id for r in model.items] == [seeded[3].id]
    assert [r.id for r in window.items] == [seeded[3].id, seeded[2].id]


async def test_pages_and_the_page_size_cap(seeded: list[LedgerRecord]):
    async with get_db_session(account=Unscoped.ADMIN) as session:
        first = await list_requests(session=session, page=1, page_size=2)
        third = await list_requests(session=session, page=3, page_size=2)
        capped = await list_requests(session=session, page_size=10_000)
    assert (first.total, first.pages, len(first.items)) == (5, 3, 2)
    assert [r.id for r in third.items] == [seeded[0].id]
    assert capped.page_size == 100


async def test_get_request_by_id_or_prefix_with_its_contents(seeded: list[LedgerRecord]):
    target = seeded[0]
    async with get_db_session(account=Unscoped.ADMIN) as session:
        detail = await get_request(session=session, request_id=str(target.id))
        by_prefix = await get_request(session=session, request_id=target.id.hex[:20])
        missing = await get_request(session=session, request_id=uuid.uuid4())
        failed = await get_request(session=session, request_id=seeded[2].id)
        with pytest.raises(ValueError, match='not a request id'):
            await get_request(session=session, request_id='xyz')
        with pytest.raises(AmbiguousRequestIdError):
            await get_request(session=session, request_id=target.id.hex[:8])  # same minute: shared prefix
    assert detail is not None and by_prefix is not None and missing is None and failed is not None
    assert detail.request.id == by_prefix.request.id == target.id
    assert [(c.kind, c.body) for c in detail.contents] == [('prompt', '{"q": 1}'), ('response', '{"a": 2}')]
    assert [c.kind for c in failed.contents] == ['error']
