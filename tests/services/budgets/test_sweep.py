"""The sweeper: holds of a process killed mid-request and expired holds go back; live ones stay."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic_ai import Agent
from sqlalchemy import text

from agentrt.db.processes import this_host
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.budgets import Hold, Holder, _sweep, reserve, sweep_reservations, this_process
from agentrt.services.ledger import LLMRequestTracker, ledger_capability, new_request_id, utc_now
from tests.factories import chat_deps, fast_config, ledger_record, scalar
from tests.services.budgets.helpers import give_budget, period_row, reservations
from tests.services.budgets.priced_model import PricedModel

ROOT = Path(__file__).resolve().parents[3]
TURNS = 50
FITS = 6


async def _hold(account_id: int, holder: Holder | None = None, ttl: float = 3600, full: str = '0.10') -> Hold:
    hold = await reserve(
        request_id=new_request_id(),
        account_id=account_id,
        full_usd=Decimal(full),
        minimum_usd=Decimal(full),
        input_usd=Decimal('0.01'),
        at=utc_now(),
        ttl_seconds=ttl,
        holder=holder,
    )
    assert isinstance(hold, Hold)
    return hold


async def _one_request_holds(account_id: int) -> Decimal:
    """What one request of `hold_and_die` holds: the same run in this process, held at the model meanwhile."""
    model = PricedModel(gate=asyncio.Event())
    agent = Agent(model, capabilities=[ledger_capability()])
    run = asyncio.create_task(agent.run('How many cardiologists?', deps=chat_deps('doomed-xx', account_id)))
    while model.arrived == 0:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    (held,) = await reservations(account_id)
    assert model.gate is not None
    model.gate.set()
    await run
    return Decimal(held['amount_usd'])


async def test_a_process_killed_while_holding_is_swept_and_its_budget_is_whole_again(
    two_accounts: tuple[int, int], database_url: str, tmp_path: Path
) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1000')
    per_request = await _one_request_holds(alpha)
    spent = (await period_row(alpha) or {})['spent_usd']
    await give_budget('alpha', str(spent + per_request * FITS + per_request / 1000))  # room for 6 requests, not 7
    mine = await _hold(alpha, full='0')  # a hold of this live process: the sweeper must leave it

    process = await asyncio.create_subprocess_exec(
        sys.executable, '-m', 'tests.services.budgets.hold_and_die', database_url, str(alpha), str(TURNS),
        str(tmp_path), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert json.loads(line) == {'admitted': FITS, 'refused': TURNS - FITS}
        held = await reservations(alpha)
        assert len(held) == FITS + 1 and {r['holder_pid'] for r in held} == {process.pid, os.getpid()}
    finally:
        process.send_signal(signal.SIGKILL)  # mid-request, holding six reservations
        await process.wait()
    row = await period_row(alpha)
    assert row is not None and row['reserved_usd'] == per_request * FITS and row['spent_usd'] == spent

    report = await sweep_reservations()
    assert report.released_dead == FITS and report.dead_holders == 1 and report.released_expired == 0
    assert [r['id'] for r in await reservations(alpha)] == [mine.id], "a live process's hold stays"
    row = await period_row(alpha)
    assert row is not None and row['reserved_usd'] == 0 and row['spent_usd'] == spent
    assert await scalar("SELECT count(*) FROM llm_requests WHERE status = 'refused'") == TURNS - FITS
    assert (await sweep_reservations()).released_dead == 0, 'a second sweep finds nothing'
    again = [await _hold(alpha, full=str(per_request)) for _ in range(FITS)]  # the budget is whole again
    assert len(again) == FITS


async def test_expired_holds_are_swept_and_a_late_row_still_counts_once(
    two_accounts: tuple[int, int], tmp_path: Path
) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    expired = await _hold(alpha, Holder('another-host', 1, 1.0), ttl=0.001)
    live = await _hold(alpha, Holder('another-host', 2, 1.0))  # another host's: kept until it expires
    mine = await _hold(alpha)  # this process, alive
    reused = await _hold(alpha, Holder(this_host(), os.getpid(), this_process().started - 100))  # a reused pid
    await asyncio.sleep(0.01)
    report = await sweep_reservations()
    assert (report.released_expired, report.released_dead, report.dead_holders) == (1, 1, 1)
    assert {r['id'] for r in await reservations(alpha)} == {live.id, mine.id}
    row = await period_row(alpha)
    assert row is not None and row['reserved_usd'] == Decimal('0.20')
    # The swept request's row arrives late (its process spooled it): its cost counts, once.
    tracker = LLMRequestTracker(fast_config(tmp_path))
    for _ in range(2):
        await tracker.track_request(ledger_record(id=expired.id, account_id=alpha, cost='0.03'))
        await tracker.track_request(ledger_record(id=reused.id, account_id=alpha, cost='0.04'))
    row = await period_row(alpha)
    assert row is not None and row['spent_usd'] == Decimal('0.07') and row['reserved_usd'] == Decimal('0.20')


async def test_reserving_starts_a_background_sweep_now_and_then(two_accounts: tuple[int, int]) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    await _hold(alpha, Holder(this_host(), os.getpid(), 1.0))  # a dead holder
    _sweep._last_sweep = None
    _sweep.sweep_soon(60)
    _sweep.sweep_soon(60)  # within the interval: not again
    assert get_supervisor().stats().spawned >= 1
    await get_supervisor().join()
    assert await reservations(alpha) == []


async def test_a_request_refused_only_for_a_dead_processs_holds_sweeps_them_and_is_admitted(
    two_accounts: tuple[int, int],
) -> None:
    # A server killed mid-turn left its holds; the next request on a live server was refused ("held by requests in
    # flight") before its own background sweep gave them back, and an idle server never swept (QA: 429 then 200).
    alpha, _ = two_accounts
    await give_budget('alpha', '0.10')
    await _hold(alpha, Holder(this_host(), os.getpid(), 1.0), full='0.10')  # a dead holder fills the window
    _sweep._last_sweep = time.monotonic()  # this process swept just now: the background sweep waits its interval
    result = await Agent(PricedModel(), capabilities=[ledger_capability()]).run(
        'How many cardiologists?', deps=chat_deps('after-a-crash', alpha)
    )
    assert result.output
    assert await reservations(alpha) == []


async def test_a_sweep_before_a_refusal_is_the_processs_sweep_for_its_interval(two_accounts: tuple[int, int]) -> None:
    # The admission's sweep before a refusal, then its background sweep right after: the same work twice.
    alpha, _ = two_accounts
    await give_budget('alpha', '0.10')
    await _hold(alpha, Holder(this_host(), os.getpid(), 1.0), full='0.10')
    _sweep._last_sweep = None  # no sweep yet in this process: the background one would start
    spawned = get_supervisor().stats().spawned
    await Agent(PricedModel(), capabilities=[ledger_capability()]).run(
        'How many cardiologists?', deps=chat_deps('after-a-crash-2', alpha)
    )
    assert get_supervisor().stats().spawned == spawned
    assert await reservations(alpha) == []


async def test_requests_refused_together_for_a_dead_processs_holds_are_all_admitted(
    two_accounts: tuple[int, int],
) -> None:
    # Requests refused at the same moment each swept; the first gave the dead holds back and the others, finding the
    # sweep under way or nothing left, kept refusals naming holds already gone (QA: 16 of 20 concurrent chats after a
    # `kill -9` of a server mid-turn).
    alpha, _ = two_accounts
    agent = await _a_dead_holder_fills_the_window(alpha)
    results = await asyncio.gather(
        *(agent.run('How many cardiologists?', deps=chat_deps(f'together-{n}', alpha)) for n in range(10)),
        return_exceptions=True,
    )
    assert [type(result).__name__ for result in results if isinstance(result, BaseException)] == []
    await _no_hold_and_no_refusal_left(alpha)  # each first refusal taken back by its admission


async def test_a_request_refused_while_another_sweep_runs_waits_for_it_and_asks_again(
    two_accounts: tuple[int, int],
) -> None:
    # The request's own sweep found another under way (its lock taken) and gave nothing back; asked again at once,
    # before that sweep committed, it was refused for holds on their way out (QA, requests from several processes).
    alpha, _ = two_accounts
    agent = await _a_dead_holder_fills_the_window(alpha)
    async with get_db_session(account=Unscoped.ADMIN) as sweeping:  # another process's sweep, not committed yet
        await sweeping.execute(text('SELECT pg_advisory_xact_lock(:lock)'), {'lock': _sweep._SWEEP_LOCK})
        run = asyncio.create_task(agent.run('How many cardiologists?', deps=chat_deps('waits', alpha)))
        await asyncio.sleep(0.5)
        assert not run.done()  # refused once, and waiting for that sweep: not refused again before it commits
        await sweeping.execute(text('DELETE FROM budget_reservations WHERE account_id = :a'), {'a': alpha})
        await sweeping.execute(text('UPDATE budget_periods SET reserved_usd = 0 WHERE account_id = :a'), {'a': alpha})
    assert (await run).output
    await _no_hold_and_no_refusal_left(alpha)


async def _a_dead_holder_fills_the_window(account_id: int) -> Agent[Any, str]:
    """A $0.10 budget whose window a dead process's hold fills, this process's background sweep not due: the agent."""
    await give_budget('alpha', '0.10')
    await _hold(account_id, Holder(this_host(), os.getpid(), 1.0), full='0.10')
    _sweep._last_sweep = time.monotonic()
    return Agent(PricedModel(), capabilities=[ledger_capability()])


async def _no_hold_and_no_refusal_left(account_id: int) -> None:
    assert await reservations(account_id) == []
    window = await period_row(account_id)
    assert window is not None and window['refused_requests'] == 0
