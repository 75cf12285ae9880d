"""A window's first admission and a ledger row written at the same moment: the row counts once, never zero times."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from decimal import Decimal
from pathlib import Path

from agentrt.db.driver import DriverTransaction
from agentrt.services.budgets import Hold
from agentrt.services.ledger import LLMRequestTracker
from tests.factories import fast_config, ledger_record, scalar
from tests.services.budgets.helpers import give_budget, hold_usd, period_row


class _SlowCommit(LLMRequestTracker):
    """A tracker whose write transactions, once their statement ran, wait for `commit` before committing."""

    written = asyncio.Event()
    commit = asyncio.Event()

    def _side_session(self) -> AbstractAsyncContextManager[DriverTransaction]:
        opened = super()._side_session()

        @asynccontextmanager
        async def slow() -> AsyncIterator[DriverTransaction]:
            async with opened as transaction:
                yield transaction
                self.written.set()
                await self.commit.wait()

        return slow()


async def test_a_row_committed_while_its_window_is_created_still_counts(
    two_accounts: tuple[int, int], tmp_path: Path
) -> None:
    # A request of a turn that started before its account had a budget holds nothing; its row is being written (the
    # writer's statement ran, its commit not done) when the budget's first admission creates the window row, summing
    # the ledger rows committed so far. The row was in neither: not summed (not committed yet), not settled (the
    # writer's statement saw no window row), and the window's spent stayed short of the ledger for good.
    alpha, _ = two_accounts
    tracker = _SlowCommit(fast_config(tmp_path))
    tracker.written, tracker.commit = asyncio.Event(), asyncio.Event()
    row = asyncio.create_task(tracker.track_request(ledger_record(account_id=alpha, cost='0.25')))
    await tracker.written.wait()
    await give_budget('alpha', '1')
    admission = asyncio.create_task(hold_usd(alpha, '0.10'))
    waiting = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())'
    )
    while not admission.done() and await scalar(waiting) == 0:  # noqa: ASYNC110 - the window waits for the write
        await asyncio.sleep(0.01)
    tracker.commit.set()
    assert await row == 'written'
    assert isinstance(await admission, Hold)
    window = await period_row(alpha)
    assert window is not None and window['spent_usd'] == Decimal('0.25'), 'the row counts once'
    assert window['reserved_usd'] == Decimal('0.10')


_ADVISORY_WAIT = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    ' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())'
)


async def test_a_period_changed_while_a_row_is_written_waits_for_it_and_counts_it(
    two_accounts: tuple[int, int], tmp_path: Path
) -> None:
    # `budget set` changing the period deleted the window rows while ledger writes settled into them: a write whose
    # statement still saw the row failed its settlement's foreign key, and its rows were written unsettled (an ERROR
    # with a traceback; QA, 4 in 90 turns under a loop of period changes). The change now takes the window lock
    # exclusive, after the writes in flight, as a window's first admission does.
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    assert isinstance(await hold_usd(alpha, '0.10'), Hold)  # the window's row exists
    tracker = _SlowCommit(fast_config(tmp_path))
    tracker.written, tracker.commit = asyncio.Event(), asyncio.Event()
    row = asyncio.create_task(tracker.track_request(ledger_record(account_id=alpha, cost='0.25')))
    await tracker.written.wait()
    change = asyncio.create_task(give_budget('alpha', '1', period='30d'))
    while not change.done() and await scalar(_ADVISORY_WAIT) == 0:  # noqa: ASYNC110 - the change waits for the write
        await asyncio.sleep(0.01)
    assert not change.done(), 'the period changed under a ledger write in flight'
    tracker.commit.set()
    assert await row == 'written'
    await change
    await hold_usd(alpha, '0.01')  # the new window's row, built from the ledger
    window = await period_row(alpha)
    assert window is not None and window['spent_usd'] == Decimal('0.25'), 'the row counts once'
