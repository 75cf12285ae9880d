"""`prune_contents`: stored bodies removed by time, account and conversation, in batches; billing rows kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from agentrt.db.errors import InvalidInputError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import (
    LedgerRecord,
    LLMRequestTracker,
    conversation_accounts,
    ledger_knows_account,
    prune_contents,
    summarise_costs,
)
from tests.factories import fast_config, ledger_record, scalar
from tests.services.ledger.conftest import DAY2

BILLING = 'SELECT count(*), sum(total_cost), sum(total_tokens), sum(input_tokens) FROM llm_requests'


async def _stored() -> dict[str, set[str]]:
    """The kinds of body stored, by request id."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = (await session.execute(text('SELECT request_id, kind FROM llm_request_contents'))).all()
    stored: dict[str, set[str]] = {}
    for request_id, kind in rows:
        stored.setdefault(str(request_id), set()).add(kind)
    return stored


async def _billing() -> tuple[object, ...]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return tuple((await session.execute(text(BILLING))).one())


async def test_bodies_before_the_cut_go_the_rest_stay_and_billing_is_untouched(seeded: list[LedgerRecord]) -> None:
    billing = await _billing()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        costs = await summarise_costs(session=session, by='account')
    report = await prune_contents(before=DAY2)
    # The two requests of the first day, a prompt and a response each.
    assert (report.bodies, report.requests) == (4, 2) and report.bytes > 0
    assert set(await _stored()) == {str(r.id) for r in seeded[2:]}
    assert await _billing() == billing and billing[0] == 5
    async with get_db_session(account=Unscoped.ADMIN) as session:
        assert await summarise_costs(session=session, by='account') == costs
    again = await prune_contents(before=DAY2)
    assert (again.bodies, again.requests, again.bytes) == (0, 0, 0)


async def test_a_conversation_of_an_account_only(seeded: list[LedgerRecord], tmp_path: Path) -> None:
    # Another account with a conversation of the same id: untouched.
    twin = ledger_record(account_id=3, account_slug='initech', chat_session_id='globex-chat', started_at=DAY2)
    tracker = LLMRequestTracker(fast_config(tmp_path))
    await tracker.track_request(twin)
    await tracker.flush()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        assert await conversation_accounts(session=session, conversation='globex-chat') == ['globex', 'initech']
        assert await conversation_accounts(session=session, conversation='globex-chat', account=2) == ['globex']
        assert await conversation_accounts(session=session, conversation='nope') == []
        assert await ledger_knows_account(session=session, account='initech')
        assert not await ledger_knows_account(session=session, account='umbrella')
    report = await prune_contents(conversation='globex-chat', account='globex')
    assert (report.bodies, report.requests) == (4, 2)
    assert set(await _stored()) == {str(r.id) for r in seeded[:3]} | {str(twin.id)}


async def test_small_batches_walk_every_request_once(seeded: list[LedgerRecord], tmp_path: Path) -> None:
    # A request stored without bodies among them, and a cut after every request.
    bare = ledger_record(started_at=DAY2 - timedelta(hours=1), raw_contents=[])
    tracker = LLMRequestTracker(fast_config(tmp_path))
    await tracker.track_request(bare)
    await tracker.flush()
    report = await prune_contents(before=datetime.now(UTC), account=1, batch_requests=1)
    # acme: two complete requests (prompt and response) and a failed one (its error).
    assert (report.bodies, report.requests) == (5, 3)
    assert set(await _stored()) == {str(r.id) for r in seeded[3:]}


async def test_no_selection_or_a_future_cut_is_refused_with_nothing_deleted(seeded: list[LedgerRecord]) -> None:
    before = await _stored()
    with pytest.raises(InvalidInputError, match='a time to prune before, a conversation, or both'):
        await prune_contents(account=1)
    with pytest.raises(InvalidInputError, match='in the future'):
        await prune_contents(before=datetime.now(UTC) + timedelta(minutes=5), conversation='acme-chat')
    assert await _stored() == before and await scalar('SELECT count(*) FROM llm_requests') == 5
