"""Ledger queries: filters, pages capped at 100, one request with its content, cost summaries."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from agentrt.db.session import get_db_session
from agentrt.services.ledger._queries import (
    AmbiguousRequestIdError,
    LedgerFilters,
    get_request,
    list_requests,
    summarise_costs,
)
from agentrt.services.ledger._record import LedgerRecord, new_request_id
from agentrt.services.ledger._tracker import LLMRequestTracker
from tests.ledger_support import fast_config

DAY1 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DAY2 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _row(
    account: str, agent: str, model: str, started: datetime, cost: str | None, success: bool = True, **extra: object
) -> LedgerRecord:
    return LedgerRecord(
        id=new_request_id(),
        model=model,
        streamed=False,
        status='complete' if success else 'error',
        success=success,
        latency_ms=100.0,
        started_at=started,
        finished_at=started + timedelta(seconds=1),
        account_id={'acme': 1, 'globex': 2}[account],
        account_slug=account,
        agent_instance_slug=agent,
        chat_session_id=f'{account}-chat',
        input_tokens=100,
        output_tokens=10,
        total_tokens=110,
        total_cost=None if cost is None else Decimal(cost),
        error_type=None if success else 'ModelHTTPError',
        raw_contents=[('prompt', '{"q": 1}'), ('response', '{"a": 2}')] if success else [('error', '{"e": 3}')],
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
async def seeded(tmp_path: Path) -> list[LedgerRecord]:
    records = [
        _row('acme', 'helper', 'gpt-4o-mini', DAY1, '0.001'),
        _row('acme', 'helper', 'gpt-4o-mini', DAY1 + timedelta(minutes=1), '0.002'),
        _row('acme', 'helper', 'gpt-4o', DAY2, '0.050', success=False),
        _row('globex', 'support', 'gpt-4o', DAY2 + timedelta(minutes=1), '0.100'),
        _row('globex', 'support', 'local-llama', DAY2 + timedelta(minutes=2), None),
    ]
    tracker = LLMRequestTracker(fast_config(tmp_path))
    for record in records:
        await tracker.track_request(record)
    await tracker.flush()
    return records


async def test_list_filters_and_orders_newest_first(seeded: list[LedgerRecord]):
    async with get_db_session() as session:
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
    async with get_db_session() as session:
        first = await list_requests(session=session, page=1, page_size=2)
        third = await list_requests(session=session, page=3, page_size=2)
        capped = await list_requests(session=session, page_size=10_000)
    assert (first.total, first.pages, len(first.items)) == (5, 3, 2)
    assert [r.id for r in third.items] == [seeded[0].id]
    assert capped.page_size == 100


async def test_get_request_by_id_or_prefix_with_its_contents(seeded: list[LedgerRecord]):
    target = seeded[0]
    async with get_db_session() as session:
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


async def test_cost_summaries_by_account_agent_model_and_day(seeded: list[LedgerRecord]):
    async with get_db_session() as session:
        by = {
            grouping: await summarise_costs(session=session, by=grouping)
            for grouping in ('account', 'agent', 'model', 'day')
        }
        acme_only = await summarise_costs(session=session, by='model', filters=LedgerFilters(account='acme'))
    accounts = {s.key: s for s in by['account']}
    assert accounts['acme'].total_cost == Decimal('0.053') and accounts['acme'].failed == 1
    assert accounts['globex'].total_cost == Decimal('0.100') and accounts['globex'].unpriced == 1
    assert [s.key for s in by['account']] == ['globex', 'acme']  # highest cost first
    assert {s.key for s in by['agent']} == {'acme/helper', 'globex/support'}
    models = {s.key: s for s in by['model']}
    assert models['gpt-4o'].requests == 2 and models['gpt-4o'].total_cost == Decimal('0.150')
    assert models['local-llama'].total_cost is None and models['local-llama'].total_tokens == 110
    assert [(s.key, s.requests) for s in by['day']] == [('2026-03-01', 2), ('2026-03-02', 3)]
    assert sum(s.input_tokens for s in by['day']) == 500 and isinstance(by['day'][0].input_tokens, int)
    assert {s.key for s in acme_only} == {'gpt-4o-mini', 'gpt-4o'}
    with pytest.raises(ValueError, match='cannot group'):
        async with get_db_session() as session:
            await summarise_costs(session=session, by='weekday')  # type: ignore[arg-type]
