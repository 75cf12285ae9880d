"""The tasks a turn's runs execute their `wrap_run` chain in, so the turn can end one pydantic-ai left waiting.

pydantic-ai (2.68) runs a run's `wrap_run` chain in a task of its own (`ScopedTask`), whose innermost handler waits
for the run's body to end. A cancellation of the caller that lands just after the body started (while the caller
drains its "ready" waiter, before the run's lifecycle enters the `try` whose `finally` tells that task the body
ended) leaves the task waiting for ever: never collected, holding the run's context, deps and messages. Plain
`Agent.run` calls cancelled by `asyncio.timeout` at random leave one task in about 200 behind (9 of 1,999); a turn in
about 25 (12 of 300 cancelled turns, `scripts/leak_check_library.py --kinds cancelled=1`). In a server, a JSON turn
whose client hangs up and a turn the shutdown cuts off are such cancellations.

The ledger's `wrap_run` (every turn's run has one: `turn_hooks`) notes the task it runs in (`note_run_task`); a
turn's `turn_runs()` block cancels, as it ends, those of its runs still waiting. Cancelled there, the chain unwinds as
a cancelled run does (the ledger records the request it cut off). A run that ended normally has ended its task first.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


class _TurnRuns:
    """The run tasks of one turn, and whether the turn has ended."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.ended = False


_turn_runs: contextvars.ContextVar[_TurnRuns | None] = contextvars.ContextVar('agentrt_turn_runs', default=None)


def note_run_task() -> None:
    """In a capability's `wrap_run`: the task it runs in belongs to the enclosing turn's runs (if in a turn).

    A run that starts once its turn has ended (a streamed response closed its turn while the task that drives the run
    had not got that far) is cancelled at once: nothing would end its task later.
    """
    runs = _turn_runs.get()
    task = asyncio.current_task()
    if runs is None or task is None:
        return
    if runs.ended:
        task.cancel()
        return
    runs.tasks.add(task)
    task.add_done_callback(runs.tasks.discard)  # ended: nothing to hold on to


@asynccontextmanager
async def turn_runs() -> AsyncIterator[None]:
    """A turn's block: the run tasks noted inside it (`note_run_task`) still running when it ends are cancelled, and
    waited for (they only unwind: the turn they belonged to is over)."""
    runs = _TurnRuns()
    token = _turn_runs.set(runs)
    try:
        yield
    finally:
        runs.ended = True
        try:
            _turn_runs.reset(token)
        except ValueError:  # the block ended in another context (a streamed response closed by its server)
            pass
        left = [task for task in runs.tasks if not task.done()]
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)
