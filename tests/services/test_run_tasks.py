"""`turn_runs` / `note_run_task`: the run tasks a turn leaves behind are ended with it."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from agentrt.services.run_tasks import note_run_task, turn_runs


async def _noted_then_waiting() -> None:
    note_run_task()
    await asyncio.sleep(3600)  # as pydantic-ai's `_do_run` waits for a body that will never tell it


async def test_a_run_task_still_waiting_when_its_turn_ends_is_cancelled() -> None:
    async with turn_runs():
        task = asyncio.create_task(_noted_then_waiting())
        await asyncio.sleep(0)
    assert task.cancelled()


async def test_a_run_task_that_ended_is_left_alone_and_not_kept() -> None:
    async with turn_runs():
        done = asyncio.create_task(asyncio.sleep(0, 'answer'))
        await done
    assert done.result() == 'answer'


async def test_a_run_that_starts_after_its_turn_ended_is_cancelled_at_once() -> None:
    # A streamed response closes its turn from its own task; the task that drives the run, made from the turn's
    # context, may start the run after that: nothing would end its wrap task later.
    async with turn_runs():
        turn_context = contextvars.copy_context()
    late = asyncio.get_running_loop().create_task(_noted_then_waiting(), context=turn_context)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(late, 5)


async def test_outside_a_turn_nothing_is_noted() -> None:
    task = asyncio.create_task(_noted_then_waiting())
    await asyncio.sleep(0)
    assert not task.done()
    task.cancel()
