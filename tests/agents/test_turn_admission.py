"""Admission of turns: started at once while the loop keeps up; past the cap (which shrinks while the loop is late)
in arrival order as places free, or refused with `RuntimeBusyError` after the queue time; a cancelled waiter gives
its place back; a turn inside a turn never waits; the CLI and the API say it clearly."""

from __future__ import annotations

import asyncio
import time

import pytest

from agentrt.agents import turn_admission as admission_module
from agentrt.agents.cli.support import EXIT_BUSY, report
from agentrt.agents.simple_chat import simple_chat
from agentrt.agents.turn_admission import MIN_LIMIT, TurnAdmission, stop_admitting, turn_admission
from agentrt.db.engine import current_settings
from agentrt.db.errors import RuntimeBusyError, ShuttingDownError
from tests.factories import HeldModel


def _hog(seconds: float) -> None:
    """Hold the event loop up, as a turn's CPU work does. Blocking it in `time.sleep` makes it exactly as late as
    spinning would (admission sees only the lateness), without burning a core the other tests share (about 2.5 s of
    CPU in this file)."""
    time.sleep(seconds)


async def _busy_turn(admission: TurnAdmission, stop: asyncio.Event) -> None:
    """A turn whose task keeps the loop behind until `stop`."""
    async with admission.turn():
        while not stop.is_set():
            _hog(0.015)
            await asyncio.sleep(0)


async def _cap_below(admission: TurnAdmission, running: int) -> None:
    """Wait (at most 5 s) until the watcher has cut the cap below `running`."""
    async with asyncio.timeout(5):
        while admission.limit >= running:  # noqa: ASYNC110 - the watcher sets no event to wait for
            await asyncio.sleep(0.01)


async def test_turns_start_at_once_while_the_loop_keeps_up() -> None:
    admission = TurnAdmission(max_lag_s=0.05, queue_s=5)
    inside: list[int] = []

    async def turn() -> None:
        async with admission.turn():
            inside.append(admission.running)
            await asyncio.sleep(0.05)

    await asyncio.gather(*(turn() for _ in range(5)))
    assert max(inside) == 5 and admission.waited == 0
    assert admission.running == 0 and admission.admitted == 5


def test_a_loop_closed_right_after_its_turns_leaves_no_watcher_pending() -> None:
    # The watcher (more than MIN_LIMIT turns at once) stopped only at its next tick after the last turn: a program
    # running each call in a loop of its own and closing it got "Task was destroyed but it is pending!" (QA).
    admission = TurnAdmission(max_lag_s=0.05, queue_s=5)

    async def turn() -> None:
        async with admission.turn():
            await asyncio.sleep(0.02)

    async def turns() -> asyncio.Task[None] | None:
        await asyncio.gather(*(turn() for _ in range(MIN_LIMIT + 2)))
        return admission._watcher

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(turns()) is None
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    finally:
        loop.close()
    assert pending == [] and admission.running == 0


async def test_a_lagging_loop_shrinks_the_cap_and_makes_turns_wait_in_order() -> None:
    admission = TurnAdmission(max_lag_s=0.01, queue_s=5)
    order: list[int] = []
    stop = asyncio.Event()

    async def waiting(n: int) -> None:
        async with admission.turn():
            order.append(n)

    hogs = [asyncio.create_task(_busy_turn(admission, stop)) for _ in range(4)]
    await _cap_below(admission, 4)
    assert admission.limit < 4 and admission.lag_s > 0.01  # the loop is ~60 ms late: the cap fell below the running
    waiters = [asyncio.create_task(waiting(n)) for n in range(3)]
    await asyncio.sleep(0.3)
    assert order == [] and admission.waited == 3  # nobody new starts
    stop.set()
    await asyncio.gather(*hogs, *waiters)
    assert order == [0, 1, 2] and admission.running == 0


async def test_a_turn_that_waits_too_long_is_refused_and_a_cancelled_one_gives_its_place_back() -> None:
    admission = TurnAdmission(max_lag_s=0.01, queue_s=0.2)
    stop = asyncio.Event()
    hogs = [asyncio.create_task(_busy_turn(admission, stop)) for _ in range(4)]
    await _cap_below(admission, 4)
    with pytest.raises(RuntimeBusyError, match='AGENTRT_TURN_QUEUE_SECONDS'):
        async with admission.turn():
            pass
    assert admission.refused == 1
    cancelled = asyncio.create_task(admission.turn().__aenter__())
    await asyncio.sleep(0.05)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    stop.set()
    await asyncio.gather(*hogs)
    assert admission.running == 0
    async with admission.turn():
        assert admission.running == 1


async def test_a_stop_refuses_the_waiting_turns_at_once_and_lets_the_running_ones_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server told to stop (SIGTERM): its waiting turns waited out the whole grace period before their 503, and
    # some were admitted meanwhile only to be cut off at its end. The loop's admission, for this test only (the loop
    # is shared with other tests, whose turns a stopped admission would refuse).
    admission = TurnAdmission(max_lag_s=0.01, queue_s=30)
    monkeypatch.setattr(admission_module, '_admissions', {asyncio.get_running_loop(): admission})
    stop = asyncio.Event()
    hogs = [asyncio.create_task(_busy_turn(admission, stop)) for _ in range(4)]
    await _cap_below(admission, 4)
    entered: list[int] = []

    async def waiting(n: int) -> None:
        async with admission.turn():
            entered.append(n)

    waiters = [asyncio.create_task(waiting(n)) for n in range(3)]
    await asyncio.sleep(0.1)
    assert admission.waited == 3 and not entered
    started = time.monotonic()
    stop_admitting()  # as the stop signal's handler calls it: for every loop, through call_soon_threadsafe
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert time.monotonic() - started < 1  # at once, not after the 30 s queue time
    assert all(isinstance(outcome, ShuttingDownError) for outcome in outcomes), outcomes
    assert 'shutting down' in str(outcomes[0]) and 'not started' in str(outcomes[0])
    with pytest.raises(ShuttingDownError):  # and every turn that asks from now on
        async with admission.turn():
            entered.append(99)
    assert not entered and admission.running == 4  # the running turns go on
    stop.set()
    await asyncio.gather(*hogs)
    assert admission.running == 0 and admission.refused == 4


async def test_a_turn_inside_a_turn_never_waits() -> None:
    admission = TurnAdmission(max_lag_s=0.01, queue_s=0.2)
    admission.limit = MIN_LIMIT
    release = asyncio.Event()
    nested_ran = asyncio.Event()

    async def parent(nest: bool) -> None:
        async with admission.turn():
            if nest:  # a tool that chats: its turn runs in a task of the parent's context
                await asyncio.create_task(child())
            await release.wait()

    async def child() -> None:
        async with admission.turn():
            assert admission.running > admission.limit
            nested_ran.set()

    parents = [asyncio.create_task(parent(nest=n == 1)) for n in range(MIN_LIMIT)]
    await asyncio.wait_for(nested_ran.wait(), 10)  # the cap is full, yet the nested turn ran: it never waited
    assert admission.waited == 0
    release.set()
    await asyncio.gather(*parents)
    assert admission.running == 0


async def test_simple_chat_waits_for_admission(demo_data: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(current_settings(), 'turn_queue_seconds', 0.2)
    monkeypatch.setattr(current_settings(), 'turn_admission_lag_ms', 1.0)
    turn_admission(max_lag_s=0.001, queue_s=0.2).limit = MIN_LIMIT
    stop = asyncio.Event()

    async def hog_loop() -> None:
        while not stop.is_set():
            _hog(0.02)
            await asyncio.sleep(0)

    # Two turns hold the places (at their model, until released) while the loop is behind: a third is refused,
    # nothing sent.
    model = HeldModel()
    hog = asyncio.create_task(hog_loop())
    first = [
        asyncio.create_task(simple_chat(f'Question {n}', session_id=f'a{n}', account='acme-health', model=model))
        for n in range(2)
    ]
    await model.wait_for_arrivals(2)
    with pytest.raises(RuntimeBusyError):
        await simple_chat('Third', session_id='a3', account='acme-health', model=model)
    assert model.arrived == 2
    stop.set()
    model.release.set()
    await asyncio.gather(*first, hog)
    await simple_chat('Now there is room', session_id='a3', account='acme-health')


def test_the_cli_says_the_process_is_busy(capsys: pytest.CaptureFixture[str]) -> None:
    code = report(RuntimeBusyError('the turn waited 30s (AGENTRT_TURN_QUEUE_SECONDS) and was not started'))
    err = capsys.readouterr().err
    assert code == EXIT_BUSY == 11
    assert err.startswith('error:') and 'AGENTRT_TURN_QUEUE_SECONDS' in err and 'Traceback' not in err
