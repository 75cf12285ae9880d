"""The `agentrt` console script: stop signals answered from the process's first instant, then the command line.

Importing the command line (typer and rich, then a command's own modules: pydantic-ai, SQLAlchemy, uvicorn) takes a
few tenths of a second before any handling of signals of a command's is in place (`support.run`'s, uvicorn's). A
Ctrl-C then ended in a `KeyboardInterrupt` traceback, or in exit code 130 without a word once typer had caught it;
a SIGTERM or SIGHUP killed the process where it stood: `agentrt serve`, between its database check and uvicorn's
start, left the embedded PostgreSQL running with its own id still registered as a user. From the start here each of
them raises `Stopped`, which the CLI's error boundary answers with one line and 128 + the signal, as it does a stop
later on. This module imports nothing but the standard library's `signal` and `sys`: the script imports it first.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that stop a command or a server (`agentrt serve`'s handlers, `api/stopping.py`'s refusal of waiting
turns): Ctrl-C, a process manager's stop, the terminal closed."""

CUT_BY_SECOND_SIGNAL = 'cut off by a second Ctrl-C during the shutdown'
"""The message of the cancellation of a request `agentrt serve` still ran at a second Ctrl-C (`api/stopping.py` cancels
it; the server's log filter reads it)."""


class Stopped(BaseException):
    """The command was stopped by a signal (Ctrl-C, SIGTERM, SIGHUP): before its own handling was in place, or after
    its clean shutdown (`support.run`).

    A `BaseException`, as `KeyboardInterrupt` is: raised by a signal handler in whatever code runs (an import, a
    library's `except Exception` around it), it must reach the error boundary, not be taken for an error of that code.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def message(self) -> str:
        """The `error:` line's text."""
        return f'stopped by {self}; nothing in progress was saved'

    def before_start(self, command: str) -> str:
        """The line of a server command (`SERVER_COMMANDS`) stopped before it started: its stop, not an error."""
        return f'{command} stopped by {self} before it started'

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP."""
        return 128 + self.signum


SERVER_COMMANDS = frozenset({'serve', 'worker'})
"""The commands whose stop is how they end (exit code 0: systemd counts 143 as a failure), from their first instant."""


def stopped_server(argv: Sequence[str]) -> str | None:
    """The command `argv` runs when it is one of `SERVER_COMMANDS` (the root's options are flags), else None."""
    command = next((arg for arg in argv if not arg.startswith('-')), None)
    return command if command in SERVER_COMMANDS else None


_raising = False


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def stop_signals_raise() -> None:
    """From now on, in this process's main thread, Ctrl-C, SIGTERM and SIGHUP raise `Stopped` where the code stands
    (a command's own handling, `support.run`'s or uvicorn's, takes over while it runs and puts this back after)."""
    global _raising
    if threading.current_thread() is not threading.main_thread():  # the in-process test runner's thread
        return
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stopped)
    _raising = True


@contextmanager
def signals_to_asyncio() -> Iterator[None]:
    """While inside, Ctrl-C has Python's default handler, so `asyncio.run` installs its own (which cancels the
    command, its clean-up then running): it leaves one it does not know alone. SIGTERM and SIGHUP go to the loop's
    handlers of `support.run`, whose removal leaves the defaults (the signal kills): `Stopped` is raised again after."""
    if not _raising or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        stop_signals_raise()


def main() -> None:
    """Console entry point (`agentrt`, `python -m agentrt`)."""
    stop_signals_raise()
    try:
        from agentrt.agents.cli import main as command_line
    except Stopped as stopped:  # the CLI's error line is not imported yet: its words, as they are
        if (server := stopped_server(sys.argv[1:])) is not None:
            sys.stderr.write(f'{stopped.before_start(server)}\n')
            raise SystemExit(0) from None
        sys.stderr.write(f'error: {stopped.message}\n')
        raise SystemExit(stopped.exit_code) from None
    command_line()
