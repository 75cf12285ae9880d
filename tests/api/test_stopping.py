"""`refusing_waiting_turns_on_stop` (what `agentrt serve`'s app runs inside): a stop signal first refuses the turns
waiting for admission, then goes to the handler that was there (uvicorn's graceful shutdown); leaving puts it back."""

from __future__ import annotations

import asyncio
import signal
import time
from types import FrameType

import pytest

from agentrt.agents import turn_admission as admission_module
from agentrt.agents.turn_admission import TurnAdmission
from agentrt.api.stopping import refusing_waiting_turns_on_stop
from agentrt.db.errors import ShuttingDownError


async def test_a_stop_signal_refuses_the_waiting_turns_then_reaches_the_servers_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    admission = TurnAdmission(max_lag_s=0.01, queue_s=30)
    admission.limit = 1  # one place: the second turn waits (no watcher to grow the cap: the loop is on time here)
    monkeypatch.setattr(admission, '_watch', lambda: None)
    monkeypatch.setattr(admission_module, '_admissions', {asyncio.get_running_loop(): admission})
    server_saw: list[int] = []

    def server_handler(signum: int, frame: FrameType | None) -> None:  # uvicorn's `handle_exit`, as it were
        server_saw.append(signum)

    release = asyncio.Event()

    async def running() -> None:
        async with admission.turn():
            await release.wait()

    async def waiting() -> None:
        async with admission.turn():
            pytest.fail('admitted during the stop')

    previous = signal.signal(signal.SIGTERM, server_handler)
    try:
        with refusing_waiting_turns_on_stop():
            first = asyncio.create_task(running())
            await asyncio.sleep(0.05)
            second = asyncio.create_task(waiting())
            await asyncio.sleep(0.05)
            assert admission.waited == 1 and not second.done()
            stopped = time.monotonic()
            signal.raise_signal(signal.SIGTERM)
            with pytest.raises(ShuttingDownError, match='shutting down'):
                await second
            assert time.monotonic() - stopped < 1  # at once, not after the 30 s queue time
            assert server_saw == [signal.SIGTERM] and not first.done()  # the server stops; the running turn goes on
            release.set()
            await first
        assert signal.getsignal(signal.SIGTERM) is server_handler  # put back on leaving
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert admission.running == 0 and admission.refused == 1


def test_a_signal_left_to_its_default_action_is_left_alone() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with refusing_waiting_turns_on_stop():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)
