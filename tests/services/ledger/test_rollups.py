"""The daily usage rollup: equal to the ledger after concurrent turns, retries and recomputes."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import func, select, text

from agentrt.db.engine import pool_status
from agentrt.db.models.ledger import LLMRequestRow
from agentrt.db.models.usage_rollups import UsageRolledUpRequest
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import drain_supervisor
from agentrt.services.ledger import (
    _rollups,
    catch_up_rollup,
    recompute_usage_rollups,
    roll_up_account_usage,
    roll_up_pending,
    summarise_costs,
)
from agentrt.services.post_turn import schedule_post_turn_work
from tests.factories import ledger_record, write_ledger_row
from tests.services.ledger.usage_oracle import GROUPINGS, ledger_totals, rollup_totals
from tests.services.ledger.usage_rows import ledger_row as _ledger
from tests.services.ledger.usage_rows import tenants as _tenants

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def _today() -> date:
    """Today (UTC) when asked, not when the module was imported: a run that crosses midnight writes today's rows."""
    return datetime.now(UTC).date()


@pytest_asyncio.fixture(autouse=True)
async def _drain() -> AsyncIterator[None]:
    """Leave no post-turn task running into the next test."""
    yield
    await drain_supervisor(30)


async def _assert_rollup_equals_ledger(**filters: object) -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        for by in GROUPINGS:
            assert await rollup_totals(by, session=session, **filters) == await ledger_totals(
                by, session=session, **filters
            ), by


async def _total_requests() -> int:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return sum(t.requests for t in await rollup_totals('day', session=session))


async def test_roll_up_counts_every_ledger_row_once() -> None:
    (a1, g1), (_, g2), (a2, g3), *_ = await _tenants()
    await _ledger(a1, g1, tokens=(1000, 200), cost=Decimal('0.0015'))
    await _ledger(a1, g1, tokens=(10, 2), cost=None, model='unpriced-model')
    await _ledger(a1, g2, success=False, tokens=(0, 0), cost=None)
    await _ledger(a2, g3, started_at=datetime.now(UTC) - timedelta(days=3))
    await _ledger(None, None)  # a request outside any tenant still counts, under NULL keys

    assert await roll_up_pending(LONG_AGO) == 5
    assert await roll_up_pending(LONG_AGO) == 0  # a retry finds nothing left to count
    await _assert_rollup_equals_ledger()

    async with get_db_session(account=Unscoped.ADMIN) as session:
        [account] = await rollup_totals('account', session=session, account_id=a1)
    assert (account.requests, account.failed_requests, account.unpriced_requests) == (3, 1, 2)
    assert (account.input_tokens, account.output_tokens, account.total_tokens) == (1010, 202, 1212)
    assert account.total_cost == Decimal('0.0015') and account.input_cost == Decimal('0.00075')
    assert account.account_slug == f'account-{a1}' and account.agent_instance_slug is None
    assert all(type(getattr(account, name)) is int for name in ('requests', 'input_tokens', 'total_tokens'))


async def test_requests_a_budget_refused_are_in_no_total() -> None:
    (a1, g1), *_ = await _tenants()
    await _ledger(a1, g1, tokens=(1000, 200), cost=Decimal('0.0015'))
    await write_ledger_row(ledger_record(account_id=a1, status='refused', success=False, cost='0', input_tokens=0))
    assert await roll_up_pending(LONG_AGO) == 1
    await _assert_rollup_equals_ledger()
    assert await _total_requests() == 1
    today = _today()
    recomputed = await recompute_usage_rollups(today, today)
    assert recomputed == 1 and await _total_requests() == 1
    async with get_db_session(account=Unscoped.ADMIN) as session:
        (ledger,) = await summarise_costs(session=session, by='account')
        (rolled,) = await summarise_costs(session=session, by='account', source='rollup')
    assert ledger.requests == rolled.requests == 1 and ledger.failed == 0


async def test_post_turn_roll_up_counts_its_accounts_rows_however_old_they_are() -> None:
    """Every ledger row is queued for the rollup as it is written: the roll-ups looked back by time before (an hour
    after a turn, a week for `agentrt costs`), and a row none reached in time was never counted (QA)."""
    (a1, g1), _, (a2, g3), *_ = await _tenants()
    await _ledger(a1, g1)
    await _ledger(a2, g3)
    eight_days_ago = datetime.now(UTC) - timedelta(days=8)
    await _ledger(a1, g1, started_at=eight_days_ago, recorded_at=eight_days_ago)

    assert await roll_up_account_usage(a1) == 2  # today's bucket and the one eight days ago
    assert await _total_requests() == 2  # not the other account's row
    assert await roll_up_account_usage(a1) == 0
    await roll_up_pending()
    assert await _total_requests() == 3
    await _assert_rollup_equals_ledger()


async def test_roll_up_pending_since_takes_only_rows_recorded_since() -> None:
    (a1, g1), *_ = await _tenants()
    await _ledger(a1, g1)
    two_days_ago = datetime.now(UTC) - timedelta(days=2)
    await _ledger(a1, g1, started_at=two_days_ago, recorded_at=two_days_ago)
    assert await roll_up_pending(datetime.now(UTC) - timedelta(days=1)) == 1
    assert await _total_requests() == 1
    assert await roll_up_pending() == 1
    await _assert_rollup_equals_ledger()


async def test_concurrent_turns_and_retried_roll_ups_match_the_ledger() -> None:
    tenants = await _tenants()
    rng = random.Random(5)

    async def chat_turn(i: int) -> None:
        account_id, agent_id = tenants[i % len(tenants)]
        for _ in range(rng.randint(1, 3)):  # one ledger row per model request of the turn
            await _ledger(
                account_id,
                agent_id,
                model=rng.choice(['gpt-4o-mini', 'gpt-4o', 'unpriced-model']),
                tokens=(rng.randint(1, 5000), rng.randint(1, 500)),
                cost=Decimal(rng.randint(1, 10**6)) / 10**9,
                success=rng.random() > 0.1,
            )
        schedule_post_turn_work(account_id, f'conversation-{i}')
        if i % 5 == 0:
            schedule_post_turn_work(account_id, f'conversation-{i}')  # a retried task

    await asyncio.gather(*(chat_turn(i) for i in range(60)))
    report = await drain_supervisor(timeout=60)
    assert report is not None and report.failed == 0 and report.cancelled == 0
    # What the next process does first. At shutdown a pending roll-up of an account is not started beside a run of it
    # still under way (`spawn_throttled`), and that run's statement cannot see a row committed after it began: such a
    # row is left queued for the next process's roll-up, by design (README, "Background work"; 1 row in about 40 runs
    # of this test). Counted then, and only then: nothing twice.
    await roll_up_pending()

    async with get_db_session(account=Unscoped.ADMIN) as session:
        ledger_rows = (await session.execute(select(func.count()).select_from(LLMRequestRow))).scalar_one()
        claimed = (await session.execute(select(func.count()).select_from(UsageRolledUpRequest))).scalar_one()
    assert claimed == ledger_rows > 60
    assert await _total_requests() == ledger_rows
    await _assert_rollup_equals_ledger()
    await _assert_rollup_equals_ledger(account_id=tenants[0][0], first_day=_today(), last_day=_today())
    assert pool_status().checked_out == 0


async def _queued_and_claimed() -> tuple[int, int]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        queued = (await session.execute(text('SELECT count(*) FROM usage_pending_requests'))).scalar_one()
        claimed = (await session.execute(select(func.count()).select_from(UsageRolledUpRequest))).scalar_one()
    return queued, claimed


async def test_a_queue_of_many_batches_is_rolled_up_whole_and_each_bucket_reported_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One statement took the whole queue: with millions of rows queued (an upgrade of a ledger never rolled up) it
    outran its statement timeout, rolled back and made no progress, at every roll-up again (QA). Now it takes the
    queue a batch at a time."""
    monkeypatch.setattr(_rollups, 'ROLL_UP_BATCH', 10)
    (a1, g1), (_, g2), *_ = await _tenants(1)
    for i in range(37):
        await _ledger(a1, g1 if i % 2 else g2)
    real, transactions = _rollups.get_side_session, 0

    def counted(**kwargs: Any) -> Any:
        nonlocal transactions
        transactions += 1
        return real(**kwargs)

    monkeypatch.setattr(_rollups, 'get_side_session', counted)
    assert await roll_up_pending() == 2  # two buckets, touched by all four batches
    assert transactions == 4  # 10 + 10 + 10 + 7 rows, each batch committed in its own transaction
    assert await _queued_and_claimed() == (0, 37)
    assert await _total_requests() == 37
    await _assert_rollup_equals_ledger()
    assert await roll_up_pending() == 0


@pytest.mark.parametrize('stop', [RuntimeError('lost'), asyncio.CancelledError()], ids=['fails', 'cancelled'])
async def test_a_roll_up_stopped_after_its_first_batch_keeps_it_and_the_next_finishes_the_rest(
    monkeypatch: pytest.MonkeyPatch, stop: BaseException
) -> None:
    monkeypatch.setattr(_rollups, 'ROLL_UP_BATCH', 10)
    (a1, g1), *_ = await _tenants(1)
    for _ in range(35):
        await _ledger(a1, g1)
    real, batches = _rollups.get_side_session, 0

    @asynccontextmanager
    async def stopped_in_second_batch(**kwargs: Any) -> AsyncIterator[Any]:
        nonlocal batches
        batches += 1
        async with real(**kwargs) as session:
            yield session
            if batches == 2:
                raise stop  # the second batch ran its statement, not committed yet

    monkeypatch.setattr(_rollups, 'get_side_session', stopped_in_second_batch)
    with pytest.raises(type(stop)):
        await roll_up_pending()
    assert await _queued_and_claimed() == (25, 10)  # the first batch committed, the second rolled back
    assert await _total_requests() == 10
    monkeypatch.setattr(_rollups, 'get_side_session', real)
    assert await roll_up_pending() == 1
    assert await _queued_and_claimed() == (0, 35)
    assert await _total_requests() == 35
    await _assert_rollup_equals_ledger()


async def test_a_read_rolls_up_for_its_seconds_only_and_says_whether_its_scope_is_caught_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read drained the whole backlog before it answered (minutes after an upgrade): now it rolls up for a few
    seconds, and the rollup answers only when nothing of the read's scope is left queued."""
    monkeypatch.setattr(_rollups, 'ROLL_UP_BATCH', 10)
    (a1, g1), _, (a2, g2), _ = await _tenants(2)
    for _ in range(25):
        await _ledger(a1, g1)
    await _ledger(a2, g2)
    assert await catch_up_rollup(a1, seconds=0) is False  # one batch, then its time is up
    assert await _queued_and_claimed() == (16, 10)
    assert await catch_up_rollup(a1) is True  # the other account's queued row is not in this read's scope
    assert await _queued_and_claimed() == (1, 25)
    async with get_db_session(account=Unscoped.JOBS) as other_roll_up:
        await other_roll_up.execute(text('SELECT 1 FROM usage_pending_requests FOR UPDATE'))
        assert await catch_up_rollup() is False  # a row another roll-up holds is still queued
    assert await catch_up_rollup() is True
    assert await _queued_and_claimed() == (0, 26)
    await _assert_rollup_equals_ledger()


async def test_recompute_rebuilds_the_same_totals_and_repairs_drift() -> None:
    (a1, g1), _, (a2, g2), _ = await _tenants(2)
    yesterday = datetime.now(UTC) - timedelta(days=1)
    for started in (None, yesterday, yesterday - timedelta(days=5)):
        await _ledger(a1, g1, started_at=started)
        await _ledger(a2, g2, started_at=started, model='gpt-4o')
    await roll_up_pending(LONG_AGO)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        before = {by: await rollup_totals(by, session=session) for by in GROUPINGS}
        await session.execute(text('UPDATE usage_daily_rollups SET requests = requests + 7, total_cost = 99'))

    today = _today()
    assert await recompute_usage_rollups(today - timedelta(days=10), today) == 6
    async with get_db_session(account=Unscoped.ADMIN) as session:
        assert {by: await rollup_totals(by, session=session) for by in GROUPINGS} == before
    await _assert_rollup_equals_ledger()
    assert await roll_up_pending(LONG_AGO) == 0  # the recompute marked every row of the range counted


async def test_recompute_and_roll_ups_running_together_stay_equal_to_the_ledger() -> None:
    tenants = await _tenants()

    async def writer(i: int) -> None:
        account_id, agent_id = tenants[i % len(tenants)]
        await _ledger(account_id, agent_id, started_at=datetime.now(UTC) - timedelta(hours=i % 30))
        await roll_up_pending(LONG_AGO, account_id=account_id)

    today = _today()
    first_day: date = today - timedelta(days=3)
    await asyncio.gather(
        *(writer(i) for i in range(40)), *(recompute_usage_rollups(first_day, today) for _ in range(3))
    )
    await roll_up_pending(LONG_AGO)
    await _assert_rollup_equals_ledger()
    assert await _total_requests() == 40


async def test_grouping_is_an_allowlist() -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        with pytest.raises(ValueError, match='cannot group costs by'):
            await summarise_costs(session=session, by='account; DROP TABLE llm_requests', source='rollup')  # type: ignore[arg-type]


async def test_a_read_whose_roll_up_is_held_up_answers_within_its_seconds() -> None:
    """A read's seconds were checked only between batches: one batch walking a queue just drained of millions of
    rows took 11-53 s of a `source=rollup` read (QA). Each statement of a read's roll-up now ends with its seconds."""
    (a1, g1), *_ = await _tenants(1)
    await _ledger(a1, g1)
    assert await catch_up_rollup(a1) is True  # the bucket exists
    await _ledger(a1, g1)  # queued for the same bucket
    async with get_db_session(account=Unscoped.ADMIN) as holder:  # the bucket locked: the batch's upsert waits
        await holder.execute(text('SELECT 1 FROM usage_daily_rollups WHERE account_id = :a FOR UPDATE'), {'a': a1})
        started = time.monotonic()
        assert await catch_up_rollup(a1, seconds=0.5) is False  # the ledger answers
        assert time.monotonic() - started < 10  # not the roll-ups' 30 s lock timeout
    assert await catch_up_rollup(a1) is True
    await _assert_rollup_equals_ledger()


async def test_agents_sharing_an_instance_or_without_one_have_buckets_of_their_own() -> None:
    """A bucket was a day, account, agent instance and model, the agent's name a label (the greatest seen): two agents
    on one instance (`simple_chat(agent=...)`) or agents of one's own without one (`ledger_capability()`) were one
    bucket under one name, and `costs --agent`/`--by agent` moved a day's usage to the wrong agent (QA)."""
    (a1, g1), *_ = await _tenants(1)
    for agent_id, name, n in ((g1, 'simple_chat', 2), (g1, 'zeta-bot', 1), (None, 'billing-bot', 1)):
        for _ in range(n):
            await _ledger(a1, agent_id, agent_name=name, tokens=(100, 20))
    await _ledger(a1, None, agent_name='alpha-bot', tokens=(7, 3))
    await _ledger(a1, None, agent_name=None, tokens=(1, 1))  # a request of no named agent

    assert await roll_up_pending() == 5  # one bucket per name, the instance's two apart
    await _assert_rollup_equals_ledger()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        agents = {t.agent_name: t.requests for t in await rollup_totals('agent', session=session)}
    assert agents == {'simple_chat': 2, 'zeta-bot': 1, 'billing-bot': 1, 'alpha-bot': 1, None: 1}

    for name in ('zeta-bot', 'alpha-bot', None):  # more of a name into its own bucket, none into another's
        await _ledger(a1, g1 if name == 'zeta-bot' else None, agent_name=name)
    assert await roll_up_pending() == 3
    await _assert_rollup_equals_ledger()
    today = _today()
    assert await recompute_usage_rollups(today, today) == 5
    await _assert_rollup_equals_ledger()
