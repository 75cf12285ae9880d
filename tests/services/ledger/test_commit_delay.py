"""The writer's commit delay: a run's rows share one transaction, committed when the run ends, never later.

A delay of 20 s makes the timing unambiguous: a run that finishes in well under it (10 s: a budget no loaded machine
misses) was not held up by it, and a row not committed a fraction of a second after its request is being held for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai import Agent, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agentrt.db.driver import DriverTransaction, driver_transaction
from agentrt.db.roles import Unscoped
from agentrt.services.ledger import LLMRequestTracker, ledger_capability
from tests.factories import fast_config, ledger_record, ledger_rows, scalar

LONG_DELAY_MS = 20_000
WELL_UNDER = LONG_DELAY_MS / 1000 / 2


class _Counted:
    """A session factory that counts the transactions the writer opens."""

    def __init__(self) -> None:
        self.sessions = 0

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[DriverTransaction]:
        self.sessions += 1
        async with driver_transaction(account=Unscoped.LEDGER) as transaction:
            yield transaction


def _tracker(tmp_path: Path, counted: _Counted | None = None, **config: Any) -> LLMRequestTracker:
    return LLMRequestTracker(fast_config(tmp_path, **config), session_factory=counted)


async def _poll_rows(seen: list[int], *, tries: int) -> None:
    """Count the ledger's rows into `seen` every 50 ms until there are some, at most `tries` times."""
    for _ in range(tries):
        seen.append(await scalar('SELECT count(*) FROM llm_requests'))
        if seen[-1]:
            return
        await asyncio.sleep(0.05)


def _three_requests(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Two requests that call the `step` tool, then the answer: three model requests at no latency."""
    done = sum(isinstance(part, ToolReturnPart) for message in messages for part in message.parts)
    if done < 2:
        return ModelResponse(parts=[ToolCallPart('step', {'n': done}, tool_call_id=f'c{done}')])
    return ModelResponse(parts=[TextPart('done')])


def _agent(tracker: LLMRequestTracker, between: Any = None) -> Agent[None, str]:
    """The three-request agent; `between(n)` runs in its tool, between its requests."""
    agent: Agent[None, str] = Agent(
        FunctionModel(_three_requests, model_name='gpt-4o-mini'), capabilities=[ledger_capability(tracker)]
    )

    @agent.tool_plain
    async def step(n: int) -> int:
        if between is not None:
            await between(n)
        return n

    return agent


async def test_a_runs_rows_share_one_transaction_committed_as_the_run_ends(tmp_path: Path):
    counted = _Counted()
    tracker = _tracker(tmp_path, counted, commit_delay_ms=LONG_DELAY_MS)
    started = time.monotonic()
    result = await _agent(tracker).run('go')
    elapsed = time.monotonic() - started
    # The run waited for its rows (durable when it returns), and not for the delay: its end committed them.
    assert elapsed < WELL_UNDER, elapsed
    rows = await ledger_rows(run_id=result.run_id)
    assert [row['run_step'] for row in rows] == [1, 2, 3]
    assert counted.sessions == tracker.stats.batches == 1 and tracker.stats.largest_batch == 3


@pytest.mark.parametrize(('delay_ms', 'committed_during_the_run'), [(0, True), (LONG_DELAY_MS, False)])
async def test_a_row_is_held_for_the_delay_and_with_none_committed_at_once(
    tmp_path: Path, delay_ms: int, committed_during_the_run: bool
):
    seen: list[int] = []

    async def look(n: int) -> None:
        # Between the run's requests: is the first request's row in the database yet?
        if n == 0:
            await _poll_rows(seen, tries=40 if committed_during_the_run else 4)

    counted = _Counted()
    tracker = _tracker(tmp_path, counted, commit_delay_ms=delay_ms)
    await _agent(tracker, look).run('go')
    assert bool(seen[-1]) is committed_during_the_run, seen
    assert len(await ledger_rows()) == 3
    # With no delay each row is committed as soon as it is ready (today's behaviour without the delay).
    assert counted.sessions == tracker.stats.batches
    assert (tracker.stats.batches > 1) is committed_during_the_run


async def test_rows_of_concurrent_runs_share_commits(tmp_path: Path):
    tracker = _tracker(tmp_path)  # the default delay
    runs = 20
    results = await asyncio.gather(*(_agent(tracker).run(f'go {n}') for n in range(runs)))
    await tracker.flush()
    assert len(await ledger_rows()) == 3 * runs
    assert {row['run_id'] for row in await ledger_rows()} == {result.run_id for result in results}
    assert tracker.stats.batches < runs and tracker.stats.largest_batch > 3, tracker.stats


@pytest.mark.parametrize('ending', ['cancelled', 'failed'])
async def test_a_run_cancelled_or_failed_has_its_rows_committed_without_the_delay(tmp_path: Path, ending: str):
    entered = asyncio.Event()

    async def stop(n: int) -> None:
        entered.set()
        if ending == 'failed':
            raise RuntimeError('the tool broke')
        await asyncio.Event().wait()  # until cancelled

    tracker = _tracker(tmp_path, commit_delay_ms=LONG_DELAY_MS)
    run = asyncio.create_task(_agent(tracker, stop).run('go'))
    await entered.wait()
    started = time.monotonic()
    if ending == 'cancelled':
        run.cancel()
    with pytest.raises((asyncio.CancelledError, RuntimeError)):
        await run
    for _ in range(int(WELL_UNDER / 0.02)):  # polled: the row is committed by the writer, not by anything awaited here
        if await scalar('SELECT count(*) FROM llm_requests'):
            break
        await asyncio.sleep(0.02)
    assert time.monotonic() - started < WELL_UNDER
    [row] = await ledger_rows()
    assert (row['run_step'], row['status']) == (1, 'complete')  # the request made before the run stopped, once
    await tracker.flush()
    assert await scalar('SELECT count(*) FROM llm_requests') == 1


async def test_a_full_batch_is_committed_at_once(tmp_path: Path):
    tracker = _tracker(tmp_path, commit_delay_ms=LONG_DELAY_MS, max_batch_rows=3)
    acks = [tracker.submit(ledger_record()) for _ in range(3)]
    async with asyncio.timeout(WELL_UNDER):
        assert await asyncio.gather(*acks) == ['written'] * 3
    assert tracker.stats.batches == 1


async def test_flush_and_track_request_commit_without_the_delay(tmp_path: Path):
    tracker = _tracker(tmp_path, commit_delay_ms=LONG_DELAY_MS)
    async with asyncio.timeout(WELL_UNDER):
        assert await tracker.track_request(ledger_record()) == 'written'
        tracker.submit(ledger_record())
        await tracker.flush()
    assert await scalar('SELECT count(*) FROM llm_requests') == 2


STALL_DELAY_MS = 300
STALL_SECONDS = 0.6  # twice the delay: the writer's wake-up comes late by half the stall at least


async def test_a_stall_of_the_loop_restarts_the_delay_so_the_runs_rows_still_share_one_transaction(tmp_path: Path):
    """A full garbage collection (60-80 ms with a large heap) in a turn of the demo at 0 ms outlasted the 50 ms delay
    once in about a hundred turns, and its rows took two transactions; here the tool holds the loop instead."""

    async def stall(n: int) -> None:
        if n == 0:  # after the first request: its row waits out the delay while nothing else can run
            time.sleep(STALL_SECONDS)  # noqa: ASYNC251 - the point: the event loop held as a collection holds it

    counted = _Counted()
    tracker = _tracker(tmp_path, counted, commit_delay_ms=STALL_DELAY_MS)
    result = await _agent(tracker, stall).run('go')
    rows = await ledger_rows(run_id=result.run_id)
    assert [row['run_step'] for row in rows] == [1, 2, 3]
    assert counted.sessions == tracker.stats.batches == 1 and tracker.stats.largest_batch == 3, tracker.stats
    assert tracker.stats.stalls == 1


async def test_a_rows_delay_restarts_once_so_stalls_one_after_another_cannot_hold_it(tmp_path: Path):
    committed_during_the_run: list[int] = []

    async def stall(n: int) -> None:
        time.sleep(STALL_SECONDS)  # noqa: ASYNC251 - after each of the first two requests
        if n == 1:
            # The first row's delay was restarted after the first stall, not again after this one: it is committed
            # now, while the run goes on (with the second row, ready by then).
            await _poll_rows(committed_during_the_run, tries=int(WELL_UNDER / 0.05))

    counted = _Counted()
    tracker = _tracker(tmp_path, counted, commit_delay_ms=STALL_DELAY_MS)
    result = await _agent(tracker, stall).run('go')
    assert committed_during_the_run[-1] == 2, committed_during_the_run
    assert [row['run_step'] for row in await ledger_rows(run_id=result.run_id)] == [1, 2, 3]
    assert counted.sessions == tracker.stats.batches == 2 and tracker.stats.stalls == 2, tracker.stats


async def test_a_wake_up_late_by_less_than_a_fifth_of_the_delay_is_no_stall(tmp_path: Path):
    """The loop held past the first row's delay, by about 200 ms of a 2 s delay (the tolerance: 400 ms; 200 ms of
    margin either way, for the time from the row to the stall and for a late loop): the row is committed as the loop
    comes back, alone, as a row whose delay passed is."""

    async def busy(n: int) -> None:
        if n == 0:
            time.sleep(2.2)  # noqa: ASYNC251 - the event loop held just past the delay

    counted = _Counted()
    tracker = _tracker(tmp_path, counted, commit_delay_ms=2000)
    await _agent(tracker, busy).run('go')
    assert tracker.stats.stalls == 0 and counted.sessions == tracker.stats.batches == 2, tracker.stats
