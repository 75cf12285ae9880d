"""Settlement: in the ledger writer's transaction, once per ledger row however often it is written or replayed."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from agentrt.db.engine import get_engine
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.budgets import Hold, account_budget_status, reserve
from agentrt.services.ledger import LedgerRecord, LLMRequestTracker, RetryPolicy, new_request_id, utc_now
from tests.factories import fast_config, ledger_record, scalar
from tests.services.budgets.helpers import give_budget, period_row, reservations

_OUT = {'output_bound_usd': Decimal('0.03')}
"""What the output a cut-off request received can cost at most."""


async def _hold(account_id: int, full: str = '0.10', input_usd: str = '0.02') -> Hold:
    hold = await reserve(
        request_id=new_request_id(),
        account_id=account_id,
        full_usd=Decimal(full),
        minimum_usd=Decimal(full),
        input_usd=Decimal(input_usd),
        at=utc_now(),
        ttl_seconds=3600,
    )
    assert isinstance(hold, Hold)
    return hold


def _record(hold: Hold, **fields: Any) -> LedgerRecord:
    return ledger_record(id=hold.id, account_id=hold.account_id, account_slug='alpha', **fields)


async def _written(tracker: LLMRequestTracker, *records: LedgerRecord) -> None:
    outcomes = await asyncio.gather(*(tracker.track_request(record) for record in records))
    assert set(outcomes) == {'written'}


@pytest.mark.parametrize(
    ('fields', 'charged'),
    [
        ({'cost': '0.0123'}, '0.0123'),  # the ledger's cost
        ({'cost': None}, '0'),  # unpriced, usage reported: 0 USD (tokens still counted)
        ({'cost': None, 'usage_reported': False}, '0.10'),  # complete, usage never reported: the whole hold
        ({'success': False, 'usage_reported': False, 'error_status_code': 429}, '0'),  # the provider said no
        ({'success': False, 'usage_reported': False}, '0.02'),  # failed without an answer: the input's share
        ({'success': False, 'status': 'cancelled', 'usage_reported': False}, '0.02'),  # cancelled: the input's share
        ({'success': False, 'status': 'cancelled', 'cost': '0.004'}, '0.004'),  # cut off with partial usage
        # Cut off (or failed) after output arrived: at least the input's share and what that output can cost.
        ({'success': False, 'status': 'cancelled', 'usage_reported': False, **_OUT}, '0.05'),
        (
            {'success': False, 'status': 'cancelled', 'usage_reported': False, 'output_bound_usd': Decimal(1)},
            '0.10',
        ),  # held
        ({'success': False, 'status': 'cancelled', 'cost': '0.004', **_OUT}, '0.05'),  # more than the usage so far
        ({'success': False, 'status': 'cancelled', 'cost': '0.07', **_OUT}, '0.07'),  # less: the usage reported
        ({'success': False, 'usage_reported': False, 'error_status_code': 500, **_OUT}, '0.05'),  # an error mid-stream
    ],
    ids=[
        'priced',
        'unpriced',
        'complete-unmeasured',
        'http-error',
        'failed',
        'cancelled',
        'cancelled-partial',
        'cut-with-output',
        'cut-with-output-past-the-hold',
        'cut-with-partial-usage-and-more-output',
        'cut-with-partial-usage-over-the-bound',
        'http-error-after-output',
    ],
)
async def test_a_ledger_row_settles_its_hold_at_what_it_cost(
    two_accounts: tuple[int, int], tmp_path: Path, fields: dict[str, Any], charged: str
) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    hold = await _hold(alpha)
    await _written(LLMRequestTracker(fast_config(tmp_path)), _record(hold, total_tokens=15, **fields))
    row = await period_row(alpha)
    assert row is not None and row['spent_usd'] == Decimal(charged) and row['reserved_usd'] == 0
    assert row['spent_tokens'] == 15
    assert await reservations() == []
    # A window built from the ledger later charges the same: `budget set` changing the period reads the ledger (the
    # status, then the next admission's new window row). It summed total_cost alone: the input's share, the hold of an
    # unmeasured answer and a cut stream's output were left out.
    await give_budget('alpha', '1', period='30d')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        status = await account_budget_status(session=session, account='alpha')
    assert status is not None and status.spent_usd == Decimal(charged) and status.spent_tokens == 15
    await _hold(alpha, '0.01', '0.01')
    rebuilt = await period_row(alpha)
    assert rebuilt is not None and rebuilt['spent_usd'] == Decimal(charged) and rebuilt['spent_tokens'] == 15


async def test_a_row_written_again_or_replayed_settles_once(two_accounts: tuple[int, int], tmp_path: Path) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    holds = [await _hold(alpha) for _ in range(3)]
    records = [_record(hold, cost='0.05') for hold in holds]
    tracker = LLMRequestTracker(fast_config(tmp_path))
    await _written(tracker, *records)
    await _written(tracker, *(_record(hold, cost='0.05') for hold in holds))  # a retried write: same ids
    # A spool line of a row already written (a crash between the commit and the spool's deletion) replays as nothing.
    tracker.spool.append([_record(holds[0], cost='0.05').spool_entry(None)])
    report = await tracker.replay_spool()
    assert report.rows == 1 and report.inserted == 0
    row = await period_row(alpha)
    assert row is not None and row['spent_usd'] == Decimal('0.15') and row['reserved_usd'] == 0


async def test_a_spooled_row_settles_when_it_is_replayed(two_accounts: tuple[int, int], tmp_path: Path) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    hold = await _hold(alpha)
    tracker = LLMRequestTracker(fast_config(tmp_path))
    tracker.spool.append([_record(hold, cost='0.07').spool_entry(None)])  # written while the database was down
    assert (await period_row(alpha) or {})['reserved_usd'] == Decimal('0.10'), 'held until the row arrives'
    report = await tracker.replay_spool()
    assert report.inserted == 1
    row = await period_row(alpha)
    assert row is not None and row['spent_usd'] == Decimal('0.07') and row['reserved_usd'] == 0
    assert await reservations() == []


async def test_a_row_without_a_hold_still_counts_in_its_window(two_accounts: tuple[int, int], tmp_path: Path) -> None:
    alpha, beta = two_accounts
    await give_budget('alpha', '1')
    await _hold(alpha, '0.01')  # the window exists
    tracker = LLMRequestTracker(fast_config(tmp_path))
    # Written by a process with budgets off, or after its hold was swept: its cost counts all the same.
    await _written(
        tracker,
        ledger_record(account_id=alpha, cost='0.2'),
        ledger_record(account_id=alpha, cost='9', started_at=utc_now().replace(year=2000)),  # another window
        ledger_record(account_id=beta, cost='9'),  # an account without a budget
        ledger_record(account_id=alpha, cost='0', status='refused', success=False),
    )
    row = await period_row(alpha)
    assert row is not None and row['spent_usd'] == Decimal('0.2') and row['reserved_usd'] == Decimal('0.01')


async def test_a_row_the_database_refuses_to_settle_is_written_all_the_same(
    two_accounts: tuple[int, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    hold = await _hold(alpha)
    # The database refuses the settlement (as it would a bug's): the billing row must be written all the same.
    await _ddl(
        'CREATE FUNCTION agentrt_test_refuse() RETURNS trigger LANGUAGE plpgsql '
        "AS $$ BEGIN RAISE EXCEPTION 'no'; END $$",
        'CREATE TRIGGER agentrt_test_refuse BEFORE INSERT ON budget_settlements '
        'FOR EACH ROW EXECUTE FUNCTION agentrt_test_refuse()',
    )
    try:
        await _written(LLMRequestTracker(fast_config(tmp_path)), _record(hold, cost='0.05'))
    finally:
        await _ddl('DROP TRIGGER agentrt_test_refuse ON budget_settlements', 'DROP FUNCTION agentrt_test_refuse()')
    assert 'not settled' in caplog.text
    assert await scalar('SELECT count(*) FROM llm_requests WHERE id = :id', id=hold.id) == 1, 'billing row kept'
    assert len(await reservations(alpha)) == 1, 'the hold stays until the sweeper releases it'


async def test_a_lock_timeout_on_the_settlement_is_retried_not_written_without_settling(
    two_accounts: tuple[int, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer's lock timeout (on its BEGIN) ends a wait on a settlement lock; the driver's own error (55P03) is
    transient: the write is repeated, and settles, once the lock is gone."""
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    hold = await _hold(alpha)
    retry = RetryPolicy(attempts=200, base_delay=0.01, max_delay=0.05, attempt_timeout=10)
    tracker = LLMRequestTracker(fast_config(tmp_path, lock_timeout_ms=50, retry=retry))
    async with get_engine().connect() as locker:
        await locker.execute(text('LOCK TABLE budget_settlements IN EXCLUSIVE MODE'))
        ack = tracker.submit(_record(hold, cost='0.05'))
        tracker.commit_now([ack])
        for _ in range(3000):  # until the writer's lock timeout has ended an attempt
            if tracker.stats.retries:
                break
            await asyncio.sleep(0.01)
        assert tracker.stats.retries, 'the writer never timed out on the lock'
        await locker.rollback()
    assert await asyncio.wait_for(ack, 30) == 'written'
    assert 'not settled' not in caplog.text
    row = await period_row(alpha)
    assert row is not None and row['spent_usd'] == Decimal('0.05') and row['reserved_usd'] == 0
    assert await reservations(alpha) == []


async def _ddl(*statements: str) -> None:
    async with get_db_session(account=Unscoped.OWNER) as session:
        for statement in statements:
            await session.execute(text(statement))
