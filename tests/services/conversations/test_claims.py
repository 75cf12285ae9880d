"""`conversation_claim`: one turn at a time per conversation, a lease renewed while the turn runs, released at the
end however it ends, taken over once a crashed turn's lease has expired (at once when its process, on this host, is
gone)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import text

from agentrt.db import engine, transaction_setup
from agentrt.db.models import Account
from agentrt.db.processes import Holder, process_start, this_host, this_process
from agentrt.db.session import Unscoped, get_db_session
from agentrt.db.settings import Settings
from agentrt.services import background
from agentrt.services.background import drain_supervisor, get_supervisor
from agentrt.services.conversations import ConcurrentTurnError, TurnClaim, claims_released, conversation_claim
from agentrt.services.conversations import _claims as claims_module
from tests.factories import scalar
from tests.stalling_proxy import StallingDatabase


@pytest.fixture
async def account() -> int:
    row = Account(slug='claims', name='Claims')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        session.add(row)
        await session.flush()
        return row.id


async def _expires_in(account: int, conversation_id: str) -> float:
    return await scalar(
        'SELECT extract(epoch FROM expires_at - now()) FROM conversation_turns '
        'WHERE account_id = :a AND conversation_id = :c',
        a=account,
        c=conversation_id,
    )


async def _expires_at(account: int, conversation_id: str) -> Any:
    return await scalar(
        'SELECT expires_at FROM conversation_turns WHERE account_id = :a AND conversation_id = :c',
        a=account,
        c=conversation_id,
    )


async def _cancelled_turn(account: int, conversation_id: str) -> float:
    """A turn holding the conversation's claim, cancelled once it holds it; seconds from the cancel to its end."""
    inside = asyncio.Event()

    async def turn() -> None:
        async with conversation_claim(account, conversation_id, lease_s=60):
            inside.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(turn())
    await inside.wait()
    started = asyncio.get_running_loop().time()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return asyncio.get_running_loop().time() - started


async def test_a_second_claim_is_refused_until_the_first_is_released(account: int) -> None:
    async with conversation_claim(account, 'c1', lease_s=60) as claim:
        assert 50 < await _expires_in(account, 'c1') <= 60
        with pytest.raises(ConcurrentTurnError) as info:
            async with conversation_claim(account, 'c1', lease_s=60):
                pass
        assert info.value.stage == 'start' and info.value.stopped_early
        async with conversation_claim(account, 'c2', lease_s=60):  # another conversation is free
            pass
        assert not claim.lost
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0
    async with conversation_claim(account, 'c1', lease_s=60):
        pass


async def test_the_claim_is_released_when_the_turn_fails_or_is_cancelled(account: int) -> None:
    with pytest.raises(RuntimeError):
        async with conversation_claim(account, 'c', lease_s=60):
            raise RuntimeError('the turn failed')
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0

    await _cancelled_turn(account, 'c')
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0


async def test_the_claim_is_released_when_an_anyio_cancel_scope_cuts_the_turn(account: int) -> None:
    # Starlette cuts a streamed response, and anyio code a timeout, with a cancel scope, which cancels again at every
    # await until it exits: the release's own statement was cancelled, so the conversation stayed claimed for the
    # whole lease (QA: the next turn refused as concurrent for 59 s, "one running now holds it").
    with anyio.move_on_after(0.2) as scope:
        async with conversation_claim(account, 'cut', lease_s=60):
            await asyncio.sleep(60)
    assert scope.cancelled_caught
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0

    with anyio.move_on_after(0.2):  # and once the heartbeat runs: its end is waited for under the same scope
        async with conversation_claim(account, 'cut', lease_s=0.3):
            await asyncio.sleep(60)
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0
    async with conversation_claim(account, 'cut', lease_s=60):  # free at once
        pass


async def test_a_release_the_database_is_slow_to_answer_does_not_hold_the_cancelled_turn_up(
    account: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Against a database that hangs (connections open and silent), a cancelled turn waited for its claim's release
    # (DB_CONNECT_TIMEOUT and the pool's ping: 12 s) before Ctrl-C gave the prompt back (QA). The release's statement
    # is made slow here; the turn ends after RELEASE_WAIT_S and the release goes on in the background.
    real_release = TurnClaim.release

    async def slow_release(self: TurnClaim) -> None:
        await asyncio.sleep(2.5)
        await real_release(self)

    monkeypatch.setattr(TurnClaim, 'release', slow_release)
    waited = await _cancelled_turn(account, 'slow')
    assert claims_module.RELEASE_WAIT_S - 0.1 < waited < claims_module.RELEASE_WAIT_S + 1, waited
    monkeypatch.setattr(TurnClaim, 'release', real_release)
    async with conversation_claim(account, 'slow', lease_s=60):  # this process's next turn takes it over at once
        pass
    assert await claims_released(5) == 0  # the release ends (its claim was taken over: it deletes nothing)
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0
    assert claims_module._abandoned == {}


async def test_a_cancelled_turns_release_does_not_wait_behind_background_work(account: int) -> None:
    # The release ran as a task of the background supervisor, whose few places post-turn work shares: with them all
    # busy it waited in the queue, the claim row stayed, and every other process's turn was refused (QA).
    supervisor = get_supervisor()
    busy = [supervisor.spawn(asyncio.sleep, 10, name='busy') for _ in range(supervisor.max_running + 2)]
    waited = await _cancelled_turn(account, 'behind')
    try:
        assert waited < 0.5
        assert await scalar('SELECT count(*) FROM conversation_turns') == 0  # gone for every process, not this one
    finally:
        for sleeper in busy:
            sleeper.cancel()
        await asyncio.wait(busy)


async def test_an_expired_claim_is_taken_over_and_its_holder_learns_it_lost(account: int) -> None:
    async with conversation_claim(account, 'c', lease_s=60) as crashed:
        await scalar("UPDATE conversation_turns SET expires_at = now() - interval '1 second' RETURNING 1")
        async with conversation_claim(account, 'c', lease_s=60) as successor:
            await crashed.check()
            await successor.check()
            assert crashed.lost and not successor.lost
        # The successor released its claim; the one that lost never deletes another turn's claim.
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0


async def _taken(account: int, conversation_id: str, claim: TurnClaim | None = None) -> TurnClaim:
    """A claim (`claim`, else a new one) taken and committed, as by a turn's start."""
    claim = claim or TurnClaim.mint(account, conversation_id, lease_s=60)
    async with get_db_session(account=account) as session:
        await claim.take(session=session)
    return claim


async def test_the_claim_of_a_start_its_cancelled_turn_left_running_is_taken_over_here_and_released_once_it_fails(
    account: int,
) -> None:
    # A turn cancelled while its start waited on a database that did not answer stops waiting for it; the start runs
    # on, and may fail having committed its claim all the same (its COMMIT applied, its answer never read). Nobody runs
    # with that claim: this process's next turn takes it over meanwhile, and it is released once the start ends. The
    # start may take its claim only after its turn left it (it was still looking its tenant up): known by its id.
    loop = asyncio.get_running_loop()
    running: asyncio.Future[object] = loop.create_future()
    left = TurnClaim.mint(account, 'left running', lease_s=60)
    TurnClaim.left_by_its_start(left.claim_id, running, lambda: left)
    await _taken(account, 'left running', left)
    async with conversation_claim(account, 'left running', lease_s=60):
        pass  # not refused as concurrent
    failed: asyncio.Future[object] = loop.create_future()
    claim = await _taken(account, 'left failed')
    TurnClaim.left_by_its_start(claim.claim_id, failed, lambda: claim)
    failed.set_exception(ConnectionResetError('the answer to its COMMIT never came'))
    for _ in range(100):
        if await scalar('SELECT count(*) FROM conversation_turns') == 0:
            break
        await asyncio.sleep(0.02)
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0
    assert claims_module._left_by_starts == {left.claim_id}  # the failed one's release has ended
    running.set_result(None)  # a start that succeeded is given back by its undo
    async with left.held():
        pass
    assert claims_module._left_by_starts == set()


async def test_a_running_turn_renews_its_lease(account: int) -> None:
    async with conversation_claim(account, 'c', lease_s=0.6) as claim:
        taken = await _expires_at(account, 'c')
        # Renewed after a third of the lease: polled for, since a loaded machine's timer comes late (a fixed 0.5 s
        # wait, then "more than 0.2 s left", failed whenever the renewal came more than 0.1 s late).
        async with asyncio.timeout(10):
            while await _expires_at(account, 'c') == taken:  # noqa: ASYNC110 - the heartbeat sets no event
                await asyncio.sleep(0.02)
        assert await _expires_at(account, 'c') > taken
        assert not claim.lost


async def test_a_check_renews_the_lease_and_reads_the_revision_in_one_statement(account: int) -> None:
    async with conversation_claim(account, 'c', lease_s=60) as claim:
        await scalar("UPDATE conversation_turns SET expires_at = now() + interval '5 seconds' RETURNING 1")
        assert not claim.knows_revision and await claim.check() is None  # no conversation stored yet
        assert claim.knows_revision and 50 < await _expires_in(account, 'c') <= 60
        await scalar("UPDATE conversation_turns SET claim_id = 'another turn' RETURNING 1")  # taken over
        before = claim.confirmed_at
        await claim.check()
        assert claim.lost and claim.confirmed_at == before
        await scalar('UPDATE conversation_turns SET claim_id = :id RETURNING 1', id=claim.claim_id)


async def test_a_refusal_never_says_the_claim_holds_longer_than_its_lease(account: int) -> None:
    # The refused turn's transaction began before the winner took its claim: measured from that transaction's start
    # (`now()`), the winner's lease looked longer than it is ('for up to 61 s' with a 60 s lease).
    async with contextlib.AsyncExitStack() as winner:
        async with get_db_session(account=account) as session:
            await session.execute(text('SELECT now()'))  # the transaction's clock starts here
            await asyncio.sleep(0.3)  # time passing between the two transactions is what the test is about
            await winner.enter_async_context(conversation_claim(account, 'late', lease_s=60))
            loser = TurnClaim.mint(account, 'late', lease_s=60)
            with pytest.raises(ConcurrentTurnError) as info:
                await loser.take(session=session)
        # The refused turn's transaction ends before the winner releases (as in a turn: the refusal ends it): its
        # attempt locked the claim's row, and a release waiting on that lock took the lock timeout (10 s) and failed.
    assert info.value.expires_in_s is not None and 59 <= info.value.expires_in_s <= 60
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0  # released at once


async def test_claims_released_waits_for_the_turns_still_ending_and_counts_those_that_did_not(account: int) -> None:
    # What a server's shutdown waits for before it closes the pool (shutdown_runtime): turns cancelled as it stopped.
    assert await claims_released(0) == 0
    entered, leave = asyncio.Event(), asyncio.Event()

    async def turn() -> None:
        async with conversation_claim(account, 'ending', lease_s=60):
            entered.set()
            await leave.wait()

    running = asyncio.create_task(turn())
    await entered.wait()
    assert await claims_released(0.01) == 1  # still held: the caller is told, and goes on
    waiting = asyncio.create_task(claims_released(30))
    leave.set()
    assert await waiting == 0
    await running
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0


async def _claimed_by(
    account: int, conversation_id: str, host: str | None, pid: int | None, started: float | None
) -> None:
    """A claim of 60 s on the conversation held by the given process (None: a claim an earlier version took)."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(
            text(
                'INSERT INTO conversation_turns (account_id, conversation_id, claim_id, expires_at, holder_host, '
                "holder_pid, holder_started) VALUES (:a, :c, 'theirs', now() + interval '60 seconds', :h, :p, :s)"
            ),
            {'a': account, 'c': conversation_id, 'h': host, 'p': pid, 's': started},
        )


async def _holder(account: int, conversation_id: str) -> tuple[Any, ...] | None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        row = await session.execute(
            text(
                'SELECT claim_id, holder_host, holder_pid, holder_started FROM conversation_turns '
                'WHERE account_id = :a AND conversation_id = :c'
            ),
            {'a': account, 'c': conversation_id},
        )
        found = row.first()
        return None if found is None else tuple(found)


@pytest.fixture
def processes() -> Iterator[tuple[tuple[int, float], tuple[int, float]]]:
    """A process of this host that runs (pid, start) and one that ran and is gone."""
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    gone = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    try:
        live_start, gone_start = process_start(live.pid), process_start(gone.pid)
        assert live_start is not None and gone_start is not None
        gone.kill()
        gone.wait()
        assert process_start(gone.pid) is None
        yield (live.pid, live_start), (gone.pid, gone_start)
    finally:
        live.kill()
        live.wait()


async def test_a_claim_names_its_process(account: int) -> None:
    async with conversation_claim(account, 'mine', lease_s=60) as claim:
        me = this_process()
        assert await _holder(account, 'mine') == (claim.claim_id, me.host, me.pid, me.started)


async def test_a_process_that_cannot_read_its_own_start_names_no_holder(
    account: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without /proc the start reads 0: another process would then take this live one for dead and its claim with it.
    monkeypatch.setattr(claims_module, 'this_process', lambda: Holder(this_host(), 4242, 0.0))
    async with conversation_claim(account, 'unnamed', lease_s=60) as claim:
        assert await _holder(account, 'unnamed') == (claim.claim_id, None, None, None)


async def test_the_claim_of_a_dead_process_of_this_host_is_taken_over_at_once(
    account: int, processes: tuple[tuple[int, float], tuple[int, float]]
) -> None:
    _, (pid, started) = processes
    await _claimed_by(account, 'orphaned', this_host(), pid, started)
    async with conversation_claim(account, 'orphaned', lease_s=60) as claim:
        me = this_process()
        assert await _holder(account, 'orphaned') == (claim.claim_id, me.host, me.pid, me.started)
        with pytest.raises(ConcurrentTurnError):  # now a live process's: refused as before
            async with conversation_claim(account, 'orphaned', lease_s=60):
                pass
    assert await _holder(account, 'orphaned') is None  # released at the end, as any claim


@pytest.mark.parametrize('holder', ['live process of this host', 'process of another host', 'no holder recorded'])
async def test_a_claim_whose_holder_cannot_be_known_dead_is_waited_out(
    account: int, processes: tuple[tuple[int, float], tuple[int, float]], holder: str
) -> None:
    (live_pid, live_start), (gone_pid, gone_start) = processes
    host, pid, started = {
        'live process of this host': (this_host(), live_pid, live_start),
        'process of another host': ('another-host', gone_pid, gone_start),  # gone here, but that says nothing there
        'no holder recorded': (None, None, None),  # taken by a version before migration 0017
    }[holder]
    await _claimed_by(account, 'held', host, pid, started)
    with pytest.raises(ConcurrentTurnError) as info:
        async with conversation_claim(account, 'held', lease_s=60):
            pass
    assert info.value.expires_in_s is not None and 55 <= info.value.expires_in_s <= 60
    assert await _holder(account, 'held') == ('theirs', host, pid, started)


async def test_turns_racing_for_a_dead_process_claim_take_it_over_once(
    account: int, processes: tuple[tuple[int, float], tuple[int, float]]
) -> None:
    _, (pid, started) = processes
    await _claimed_by(account, 'contested', this_host(), pid, started)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def turn() -> None:
        async with conversation_claim(account, 'contested', lease_s=60):
            entered.set()
            await release.wait()

    racers = [asyncio.create_task(turn()) for _ in range(5)]
    await asyncio.wait_for(entered.wait(), 30)
    for _ in range(3000):  # the other four refused while the winner holds it
        if sum(racer.done() for racer in racers) == 4:
            break
        await asyncio.sleep(0.01)
    release.set()
    outcomes = await asyncio.gather(*racers, return_exceptions=True)
    assert sum(outcome is None for outcome in outcomes) == 1
    assert all(isinstance(outcome, ConcurrentTurnError) for outcome in outcomes if outcome is not None)


async def test_a_release_the_database_does_not_answer_at_shutdown_is_left_to_its_lease_in_one_line_and_no_task(
    account: int, database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A server stopped while PostgreSQL was frozen: a cut-off turn's release failed after the runtime's supervisor
    # was drained, and was retried by a task of a new supervisor nobody drained, which failed with a traceback once
    # the runtime was shut down (DatabaseNotInitializedError), or was cut by the loop's end with a line saying that
    # shutdown_runtime() had not been called (QA). Now nothing starts once the shutdown began: one WARNING line.
    monkeypatch.setattr(transaction_setup, 'CLIENT_WAIT_MARGIN_SECONDS', 0.4)  # a statement given up after 1.4 s
    loop = asyncio.get_running_loop()
    saved, shut_down = engine._runtime, engine._shut_down
    engine._runtime = None
    try:
        async with StallingDatabase(database_url).running() as proxy:
            try:
                await engine.init_database(Settings(database_url=proxy.url, statement_timeout_ms=1000), migrate=False)
                inside = asyncio.Event()

                async def turn() -> None:
                    async with conversation_claim(account, 'frozen', lease_s=60):
                        inside.set()
                        await asyncio.sleep(60)

                running = asyncio.create_task(turn())
                await inside.wait()
                proxy.stall()
                running.cancel()  # cut off by the stop: its release waits on the frozen database
                await asyncio.gather(running, return_exceptions=True)
                with caplog.at_level(logging.INFO):
                    assert await claims_released(0.2) == 1  # shutdown_runtime's steps, in its order
                    await drain_supervisor(0.2)
                    await engine.close_database()
                    for _ in range(100):  # the release's statement is given up
                        if 'stays claimed' in caplog.text:
                            break
                        await asyncio.sleep(0.1)
                    await asyncio.sleep(0.5)  # a retry started now would have run, and failed, by then
                    assert background._supervisors.get(loop) is None  # no supervisor made after the drain
            finally:
                await engine.close_database()
                proxy.resume()
    finally:
        engine._runtime, engine._shut_down = saved, shut_down
    ours = [record for record in caplog.records if record.name.startswith('agentrt')]
    assert all(record.levelno < logging.ERROR and not record.exc_info for record in ours), caplog.text
    assert 'without shutdown_runtime()' not in caplog.text
    [left] = [record.getMessage() for record in ours if 'stays claimed' in record.getMessage()]
    assert left.startswith('conversation frozen stays claimed') and 'once this process has ended' in left, left
    assert 'frozen' not in str(claims_module._abandoned), claims_module._abandoned


async def test_a_turn_that_outlives_the_shutdown_on_a_frozen_database_says_so_in_operator_terms(
    account: int, database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A server stopped while PostgreSQL was frozen: a turn still running after shutdown_runtime() renewed its claim
    # and released it on a runtime already shut down, and both WARNINGs quoted DatabaseNotInitializedError's advice to
    # a developer ("start it with init_database()") in the operator's log, after "Finished server process" (QA). Now
    # the renewal stops quietly and the release's one line says the runtime had shut down.
    monkeypatch.setattr(transaction_setup, 'CLIENT_WAIT_MARGIN_SECONDS', 0.4)  # a statement given up after 1.4 s
    saved, shut_down = engine._runtime, engine._shut_down
    engine._runtime = None
    try:
        async with StallingDatabase(database_url).running() as proxy:
            try:
                await engine.init_database(Settings(database_url=proxy.url, statement_timeout_ms=1000), migrate=False)
                inside, ending = asyncio.Event(), asyncio.Event()

                async def turn() -> None:
                    async with conversation_claim(account, 'outlived', lease_s=1.5):  # renewed every 0.5 s
                        inside.set()
                        await ending.wait()  # blocked past the shutdown (on the frozen database, in a server)

                running = asyncio.create_task(turn())
                await inside.wait()
                proxy.stall()
                with caplog.at_level(logging.INFO):
                    assert await claims_released(0.2) == 1  # shutdown_runtime's steps, in its order
                    await drain_supervisor(0.2)
                    await engine.close_database()
                    await asyncio.sleep(2.5)  # the renewal in flight given up, the next ones meet the shutdown
                    ending.set()
                    await running
                    for _ in range(50):
                        if 'stays claimed' in caplog.text:
                            break
                        await asyncio.sleep(0.1)
            finally:
                await engine.close_database()
                proxy.resume()
    finally:
        engine._runtime, engine._shut_down = saved, shut_down
    assert 'init_database' not in caplog.text, caplog.text
    ours = [record.getMessage() for record in caplog.records if record.name.startswith('agentrt')]
    [left] = [line for line in ours if 'stays claimed' in line]
    assert left.startswith('conversation outlived stays claimed') and '(the runtime had shut down)' in left, left


async def test_a_claim_cancelled_as_its_take_commits_is_released(account: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The take was awaited by the caller itself: cancelled with its COMMIT's reply in flight, the claim stood with
    # nobody to release it, and the process's next turn of the conversation was refused for the lease (QA).
    caller: list[asyncio.Task[None]] = []
    retry = claims_module.retry_on_disconnect

    async def committed_then_cancelled(operation: Any, *, what: str) -> Any:
        result = await retry(operation, what=what)
        if what == 'conversation claim':  # committed: the caller is cancelled before the reply reaches it
            caller[0].cancel()
            await asyncio.sleep(0.05)
        return result

    monkeypatch.setattr(claims_module, 'retry_on_disconnect', committed_then_cancelled)

    async def turn() -> None:
        async with conversation_claim(account, 'taken', lease_s=60):
            raise AssertionError('the block never runs')

    caller.append(asyncio.create_task(turn()))
    with pytest.raises(asyncio.CancelledError):
        await caller[0]
    assert await scalar("SELECT count(*) FROM conversation_turns WHERE conversation_id = 'taken'") == 0
    async with conversation_claim(account, 'taken', lease_s=60) as claim:  # free at once
        assert claim.acquired
