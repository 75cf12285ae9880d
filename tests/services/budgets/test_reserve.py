"""`reserve`: one conditional statement admits or refuses; racing holds never exceed the limit; accounts apart."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from agentrt.db.errors import DatabaseDisconnectedError, DatabaseUnavailableError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.budgets import Hold, Holder, Period, Refusal, _reserve, reserve, set_budget, sweep_reservations
from agentrt.services.ledger import new_request_id, utc_now
from tests.factories import ledger_record, lost_commit_reply, slow_commit_reply, write_ledger_row
from tests.services.budgets.helpers import give_budget, hold_usd, period_row, reservations


async def test_an_account_without_a_budget_holds_nothing(two_accounts: tuple[int, int]) -> None:
    assert await hold_usd(two_accounts[0], '5') is None
    assert await reservations() == []


async def test_fifty_racing_holds_admit_exactly_those_that_fit(two_accounts: tuple[int, int]) -> None:
    alpha, beta = two_accounts
    await give_budget('alpha', '1.00')
    await give_budget('beta', '0.50')
    outcomes = await asyncio.gather(
        *(hold_usd(alpha, '0.03') for _ in range(50)), *(hold_usd(beta, '0.03') for _ in range(50))
    )
    for account, limit, fits in ((alpha, Decimal('1.00'), 33), (beta, Decimal('0.50'), 16)):
        held = [o for o in outcomes if isinstance(o, Hold) and o.account_id == account]
        assert len(held) == fits, 'floor(limit / 0.03), each account on its own'
        row = await period_row(account)
        assert row is not None and row['reserved_usd'] == Decimal('0.03') * fits <= limit
        assert len(await reservations(account)) == fits
    refused = [o for o in outcomes if isinstance(o, Refusal)]
    assert len(refused) == 100 - 33 - 16
    assert (await period_row(alpha) or {})['refused_requests'] == 50 - 33


async def test_a_request_near_the_limit_holds_what_is_left_if_its_minimum_fits(two_accounts: tuple[int, int]) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1.00')
    first = await hold_usd(alpha, '0.70', '0.10')
    second = await hold_usd(alpha, '0.70', '0.10')
    third = await hold_usd(alpha, '0.70', '0.10')
    assert isinstance(first, Hold) and first.amount_usd == Decimal('0.70')
    assert isinstance(second, Hold) and second.amount_usd == Decimal('0.30'), 'the rest of the limit'
    assert isinstance(third, Refusal) and third.limit_usd == Decimal('1.00')
    assert third.spent_usd == 0 and third.reserved_usd == Decimal('1.00')


async def test_a_window_created_mid_period_counts_what_the_ledger_spent_in_it(two_accounts: tuple[int, int]) -> None:
    alpha, beta = two_accounts
    now = utc_now()
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    for record in (
        ledger_record(account_id=alpha, cost='0.40', started_at=month_start + timedelta(seconds=1)),
        ledger_record(account_id=alpha, cost='0.35', started_at=now - timedelta(seconds=1)),
        ledger_record(account_id=alpha, cost='9.00', started_at=month_start - timedelta(seconds=1)),  # last month
        ledger_record(account_id=beta, cost='9.00', started_at=now - timedelta(seconds=1)),  # another account
        ledger_record(account_id=alpha, cost='9.00', status='refused', success=False, started_at=now),  # never sent
    ):
        await write_ledger_row(record)
    await give_budget('alpha', '1.00')
    assert isinstance(await hold_usd(alpha, '0.30'), Refusal), '0.75 spent this month: 0.30 does not fit'
    assert isinstance(await hold_usd(alpha, '0.25'), Hold)
    row = await period_row(alpha)
    assert row is not None and row['spent_usd'] == Decimal('0.75') and row['period_start'] == month_start


async def test_windows_follow_the_calendar_in_utc_or_repeat_from_their_anchor(two_accounts: tuple[int, int]) -> None:
    alpha, _ = two_accounts
    cases = (
        ('month', datetime(2026, 2, 14, 23, 30, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 3, 1)),
        ('week', datetime(2026, 2, 14, 23, 30, tzinfo=UTC), datetime(2026, 2, 9, tzinfo=UTC), datetime(2026, 2, 16)),
        ('day', datetime(2026, 2, 14, 23, 30, tzinfo=UTC), datetime(2026, 2, 14, tzinfo=UTC), datetime(2026, 2, 15)),
    )
    for period, at, start, end in cases:
        await give_budget('alpha', '1', period)
        hold = await hold_usd(alpha, '0.01', at=at)
        assert isinstance(hold, Hold) and hold.period_start == start, period
        row = await period_row(alpha)
        assert row is not None and row['period_end'] == end.replace(tzinfo=UTC), period


async def test_a_custom_window_repeats_every_length_from_its_anchor(two_accounts: tuple[int, int]) -> None:
    alpha, _ = two_accounts
    anchor = datetime(2026, 1, 1, 6, tzinfo=UTC)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await set_budget(session=session, account='alpha', limit_usd=Decimal(1), period=Period.parse('7d'),
                         window_anchor=anchor)  # fmt: skip
    hold = await hold_usd(alpha, '0.01', at=datetime(2026, 1, 16, 5, tzinfo=UTC))
    assert isinstance(hold, Hold) and hold.period_start == datetime(2026, 1, 15, 6, tzinfo=UTC)
    row = await period_row(alpha)
    assert row is not None and row['period_end'] == datetime(2026, 1, 22, 6, tzinfo=UTC)


async def test_a_hold_records_its_holder_and_expiry(two_accounts: tuple[int, int]) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    holder = Holder('host-x', 4242, 123.5)
    held = await reserve(
        request_id=new_request_id(),
        account_id=alpha,
        full_usd=Decimal('0.2'),
        minimum_usd=Decimal('0.1'),
        input_usd=Decimal('0.05'),
        at=utc_now(),
        ttl_seconds=60,
        holder=holder,
    )
    assert isinstance(held, Hold)
    (row,) = await reservations(alpha)
    assert (row['holder_host'], row['holder_pid'], row['holder_started']) == ('host-x', 4242, 123.5)
    assert row['amount_usd'] == Decimal('0.2') and row['input_usd'] == Decimal('0.05')
    assert timedelta(seconds=50) < row['expires_at'] - row['created_at'] <= timedelta(seconds=61)


async def test_a_hold_committed_as_its_caller_is_cancelled_is_given_back(
    two_accounts: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A request cancelled while its hold's COMMIT reply was in flight left the hold, committed, to its TTL (15 min in a
    # live process): the budget showed it held by a request in flight that no longer was.
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    with slow_commit_reply(monkeypatch) as committed:
        admission = asyncio.create_task(hold_usd(alpha, '0.10'))
        await committed.wait()
        admission.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admission
    assert await reservations() == []
    row = await period_row(alpha)
    assert row is not None and row['reserved_usd'] == 0


async def test_a_hold_whose_commit_reply_was_lost_is_given_back(
    two_accounts: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # PgBouncer restarted between a hold's COMMIT and its reply: the admission failed (DatabaseDisconnectedError, the
    # request not sent) with the hold committed, which nothing settled and the sweeper left to its TTL (15 min: the
    # process was alive), so the account's next requests were refused for holds "by requests in flight" none were.
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    with lost_commit_reply(monkeypatch), pytest.raises(DatabaseDisconnectedError):
        await hold_usd(alpha, '0.10')
    assert await reservations() == []
    row = await period_row(alpha)
    assert row is not None and row['reserved_usd'] == 0


class _AwayAfterTheFirst:
    """`scoped_connection` as the database gives it: the first connection (the hold's), then none (its release)."""

    def __init__(self, opened: Any) -> None:
        self.opened, self.calls = opened, 0

    def __call__(self, *, account: Any) -> Any:
        self.calls += 1
        if self.calls > 1:
            raise DatabaseUnavailableError('cannot connect to PostgreSQL: the test says so')
        return self.opened(account=account)


async def _released_by_the_next_sweep(account_id: int) -> None:
    """The one hold left is an orphan the next sweep releases, the account's period holding nothing after it."""
    assert len(await reservations()) == 1
    report = await sweep_reservations()
    assert (report.released_orphans, report.released_dead, report.released_expired) == (1, 0, 0)
    assert await reservations() == []
    row = await period_row(account_id)
    assert row is not None and row['reserved_usd'] == 0


async def test_a_hold_that_cannot_be_given_back_yet_is_released_by_the_next_sweep(
    two_accounts: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database still away when the hold is given back: its process remembers it, and its next sweep releases it
    # (the process is alive, so its holds were otherwise left to their TTL).
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    opened, away = _reserve.scoped_connection, _AwayAfterTheFirst(_reserve.scoped_connection)
    monkeypatch.setattr(_reserve, 'scoped_connection', away)
    with lost_commit_reply(monkeypatch), pytest.raises(DatabaseDisconnectedError):
        await hold_usd(alpha, '0.10')
    monkeypatch.setattr(_reserve, 'scoped_connection', opened)
    assert away.calls == 2
    await _released_by_the_next_sweep(alpha)
    assert (await sweep_reservations()).released_orphans == 0, 'released once'


async def test_a_hold_whose_undo_on_a_cancellation_fails_is_released_by_the_next_sweep(
    two_accounts: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The request cancelled while its hold's COMMIT reply was in flight, and the database away when the hold is given
    # back: the failed release was forgotten, and the hold left to its TTL (15 min; its process is alive).
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    opened, away = _reserve.scoped_connection, _AwayAfterTheFirst(_reserve.scoped_connection)
    monkeypatch.setattr(_reserve, 'scoped_connection', away)
    with slow_commit_reply(monkeypatch) as committed:
        admission = asyncio.create_task(hold_usd(alpha, '0.10'))
        await committed.wait()
        admission.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admission
    monkeypatch.setattr(_reserve, 'scoped_connection', opened)
    assert away.calls == 2
    await _released_by_the_next_sweep(alpha)
