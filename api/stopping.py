"""A served process's stop: turns still waiting for admission are refused as soon as the stop signal arrives.

uvicorn answers SIGTERM and Ctrl-C with a graceful shutdown: no new connections, the requests in flight answered
within `--shutdown-seconds`, then the app's shutdown. A chat turn waiting for admission (`agents/turn_admission.py`)
is a request in flight, so it waited out the whole grace period before its 503, and some such turns were admitted
meanwhile only to be cut off at its end. The app cannot learn of the stop from uvicorn before its lifespan's shutdown,
which comes after that period: so, while the app runs, its process's stop signals also call `stop_admitting()`
(waiting turns answer 503 `shutting_down` at once, with `Retry-After`), then uvicorn's own handler. In a one-process
`agentrt serve` and in each process of `--workers N` alike (uvicorn's supervisor stops a worker with SIGTERM).

A second Ctrl-C during the stop (uvicorn: "Waiting for connections to close. (CTRL+C to force quit)") cuts the
requests in flight off at once, as the end of `--shutdown-seconds` does, and the app's shutdown still runs. uvicorn's
force quit skipped the app's shutdown: the turns still running were cancelled by `asyncio.run` after the ledger's
writer had gone, so model requests the provider had billed had no ledger row, not even `cancelled` (qa117).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from agentrt.agents.cli_entry import (  # a standard-library-only module: no CLI package imported
    CUT_BY_SECOND_SIGNAL,
    STOP_SIGNALS,
)
from agentrt.agents.turn_admission import stop_admitting

logger = logging.getLogger('uvicorn.error')


@contextmanager
def refusing_waiting_turns_on_stop() -> Iterator[None]:
    """While inside, each stop signal with a handler (the server's) first refuses the turns waiting for admission.

    Only in the main thread (the only one signals reach); a signal left to its default action is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed: dict[signal.Signals, tuple[Any, Any]] = {}
    for signum in STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if callable(handler):
            wrapper = _stopping(handler)
            signal.signal(signum, wrapper)
            installed[signum] = (handler, wrapper)
    try:
        yield
    finally:
        for signum, (handler, wrapper) in installed.items():
            if signal.getsignal(signum) is wrapper:  # not replaced since (the server puts its own back itself)
                signal.signal(signum, handler)


def _stopping(handler: Any) -> Any:
    server = getattr(handler, '__self__', None)  # uvicorn's `Server.handle_exit`, bound to its server

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop_admitting()
        if signum == signal.SIGINT and getattr(server, 'should_exit', False) and hasattr(server, 'server_state'):
            # A second Ctrl-C: uvicorn would force quit. The loop cuts the requests off instead (a signal handler
            # runs between two bytecodes of the loop's thread: the loop's own callback does the cancelling).
            asyncio.get_running_loop().call_soon_threadsafe(_cut_off, server)
            return
        handler(signum, frame)

    return on_stop


def _cut_off(server: Any) -> None:
    """Cancel the server's requests still running, as uvicorn does when `--shutdown-seconds` ran out: their turns end
    as a disconnect ends them, and uvicorn's wait for their connections ends with them."""
    running = [task for task in server.server_state.tasks if not task.done()]
    if running:
        logger.warning(
            'shutdown: a second Ctrl-C cuts off %d request(s) still running; the clean-up still runs', len(running)
        )
    for task in running:
        task.cancel(msg=CUT_BY_SECOND_SIGNAL)
