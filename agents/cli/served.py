"""uvicorn's server for a one-process `agentrt serve`: every stop is a graceful shutdown that ends with exit code 0.

uvicorn shuts down gracefully on SIGTERM and Ctrl-C (new connections refused, requests in flight answered for up to
`timeout_graceful_shutdown`, then the app's shutdown: background work drained, the ledger flushed, the pool closed),
then raises the signal again with the handler it found, so the process died of SIGTERM (exit status 143 in a shell,
in Docker, to a script) after a clean stop, and SIGHUP (the terminal closed) was not handled at all: the process died
at once, its requests cut off and the ledger rows it held lost. Here SIGHUP stops the server as SIGTERM does, and the
signals uvicorn raises again meet a handler that ignores them, so a stop that was asked for is a normal end (as
`agentrt worker`'s is, and as uvicorn's own supervisor of several workers ends).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from agentrt.agents.cli_entry import STOP_SIGNALS


class GracefulServer(uvicorn.Server):
    """`uvicorn.Server` that stops gracefully on SIGHUP too and does not die of the signal it stopped for."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's signal handling (SIGINT, SIGTERM) plus SIGHUP, inside handlers that absorb uvicorn's re-raise."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            with super().capture_signals():
                yield
            return
        with _absorbed(), super().capture_signals():
            previous = signal.signal(signal.SIGHUP, self.handle_exit)
            try:
                yield
            finally:
                signal.signal(signal.SIGHUP, previous)

    @property
    def stopped_by(self) -> list[signal.Signals]:
        """The signals the server shut down for, first first."""
        return [signal.Signals(number) for number in self._captured_signals]


@contextmanager
def _absorbed() -> Iterator[None]:
    """While inside, the stop signals do nothing: uvicorn raises each one it shut down for again, once it has put back
    the handlers it found (these), after the shutdown has finished."""
    previous = {number: signal.signal(number, _ignore) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _ignore(signum: int, frame: object) -> None:
    """A stop signal uvicorn raised again after its graceful shutdown: already acted on."""
