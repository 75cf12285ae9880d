"""Standard output for a command whose reader may leave before its output ends (`agentrt chat ... | head -c 20`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ['reader_left', 'reader_may_leave']


class _ReaderMayLeave:
    """`sys.stdout` for a command whose reader may go away before its output ends (`agentrt chat ... | head -c 20`):
    a write or flush that finds the pipe closed (`BrokenPipeError`) ends the output, not the command. What is left
    to print goes to `/dev/null` (the descriptor itself, so the interpreter's last flush finds nothing to fail on),
    and the command runs to its end: a chat turn is finished and saved, as billed. Everything else is `sys.stdout`'s.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.reader_left = False

    def write(self, text: str) -> int:
        if not self.reader_left:
            try:
                return int(self._stream.write(text))
            except BrokenPipeError:
                self._discard_the_rest()
        return len(text)

    def flush(self) -> None:
        if not self.reader_left:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._discard_the_rest()

    def _discard_the_rest(self) -> None:
        self.reader_left = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no descriptor (a test's stream): nothing is flushed there later
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def reader_left() -> bool:
    """Whether standard output's reader went away (`reader_may_leave`): what is printed now is discarded."""
    return bool(getattr(sys.stdout, 'reader_left', False))


@contextmanager
def reader_may_leave() -> Iterator[None]:
    """While inside, a standard output whose reader went away (a closed pipe) discards what is printed, quietly,
    instead of failing the command (`_ReaderMayLeave`); a terminal is left as it is."""
    stream = sys.stdout
    try:
        interactive = stream is None or stream.isatty()
    except (ValueError, AttributeError):
        interactive = True
    if interactive:
        yield
        return
    sys.stdout = guarded = _ReaderMayLeave(stream)
    try:
        yield
    finally:
        guarded.flush()  # what `print` and `typer.echo` buffered: it would fail at the interpreter's exit otherwise
        if sys.stdout is guarded:
            sys.stdout = stream
