"""A served process's stop: turns still waiting for admission are refused as soon as the stop signal arrives.

uvicorn answers SIGTERM and Ctrl-C with a graceful shutdown: no new connections, the requests in flight answered
within `--shutdown-seconds`, then the app's shutdown. A chat turn waiting for admission (`agents/turn_admission.py`)
is a request in flight, so it waited out the whole grace period before its 503, and some such turns were admitted
meanwhile only to be cut off at its end. The app cannot learn of the stop from uvicorn before its lifespan's shutdown,
which comes after that period: so, while the app runs, its process's stop signals also call `stop_admitting()`
(waiting turns answer 503 `shutting_down` at once, with `Retry-After`), then uvicorn's own handler. In a one-process
`agentrt serve` and in each process of `--workers N` alike (uvicorn's supervisor stops a worker with SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from agentrt.agents.cli_entry import STOP_SIGNALS  # a standard-library-only module: no CLI package imported
from agentrt.agents.turn_admission import stop_admitting


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
    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop_admitting()
        handler(signum, frame)

    return on_stop
