"""`undone_if_cancelled`: an operation that takes something runs to its end through its caller's cancellation, and is
given back then; a caller that bounds its wait (`wait_s`) goes at once past it, the undo still done once it ends."""

from __future__ import annotations

import asyncio

import pytest

from agentrt.db.cancellation import undone_if_cancelled


async def test_a_cancelled_caller_waits_at_most_wait_s_and_what_the_operation_took_is_given_back_when_it_ends() -> None:
    finish, given_back, left = asyncio.Event(), asyncio.Event(), []

    async def operation() -> str:
        await finish.wait()  # a server that does not answer
        return 'taken'

    async def undo(result: str) -> None:
        assert result == 'taken'
        given_back.set()

    caller = asyncio.create_task(undone_if_cancelled(operation(), undo, wait_s=0.2, left=left.append))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert loop.time() - started < 1, 'the cancellation waited for the operation'
    assert len(left) == 1 and not left[0].done() and not given_back.is_set()
    finish.set()  # the server answers: the operation ends, and what it took is given back
    await asyncio.wait_for(given_back.wait(), 5)


async def test_without_wait_s_a_cancelled_caller_waits_for_the_operation_and_its_undo() -> None:
    finish, undone = asyncio.Event(), []

    async def operation() -> str:
        await finish.wait()
        return 'taken'

    async def undo(result: str) -> None:
        undone.append(result)

    caller = asyncio.create_task(undone_if_cancelled(operation(), undo))
    await asyncio.sleep(0.05)
    caller.cancel()
    await asyncio.sleep(0.3)
    assert not caller.done(), 'the caller went before the operation ended'
    finish.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert undone == ['taken']
