"""Standard output for a command whose reader may leave before its output ends (`agentrt chat ... | head -c 20`)."""

from __future__ import annotations

import errno
import os
import select
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ['reader_left', 'reader_may_leave', 'terminal_went_away']

_on_a_terminal = False
"""Whether standard output was a terminal as the command started (`reader_may_leave`)."""


class _ReaderMayLeave:
    """`sys.stdout` for a command whose reader may go away before its output ends (`agentrt chat ... | head -c 20`):
    a write or flush that finds the pipe closed (`BrokenPipeError`) ends the output, not the command. What is left
    to print goes to `/dev/null` (the descriptor itself, so the interpreter's last flush finds nothing to fail on),
    and the command runs to its end: a chat turn is finished and saved, as billed. Everything else is `sys.stdout`'s.

    A write that fails otherwise (a full disk: `> /dev/full`) ends the output the same way, and is kept in
    `not_written`: the command runs to its end, then says so and exits 1 (`agentrt.agents.cli.group`). It was an
    "internal error" (exit 70), and a chat turn was cut off at its first line of output.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.reader_left = False
        self.not_written: str | None = None
        try:
            self._fd: int | None = stream.fileno()
        except (OSError, ValueError, AttributeError):  # a test's stream: written through
            self._fd = None

    def write(self, text: str) -> int:
        if not self.reader_left:
            try:
                if self._fd is None:
                    return int(self._stream.write(text))
                self._write_all(self._fd, text)
            except OSError as exc:
                self._failed(exc)
        return len(text)

    def _write_all(self, fd: int, text: str) -> None:
        """`text` written to the descriptor until all of it is, or a write fails. A write the disk had room for only in
        part (4 KiB of a 44 KB `--json`) was taken by the buffered stream as done, the rest dropped without an error:
        a truncated file, exit 0 (qa124)."""
        self._stream.flush()  # anything written to the stream itself first, in order
        data = memoryview(text.encode(self._stream.encoding or 'utf-8', self._stream.errors or 'strict'))
        while data:
            try:
                data = data[os.write(fd, data) :]
            except BlockingIOError:  # a non-blocking descriptor (its program set O_NONBLOCK): wait until it takes more
                select.select([], [fd], [])

    def flush(self) -> None:
        if not self.reader_left:
            try:
                self._stream.flush()
            except OSError as exc:
                self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        if not isinstance(exc, BrokenPipeError):
            self.not_written = exc.strerror or str(exc)
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
def reader_may_leave() -> Iterator[_ReaderMayLeave | None]:
    """While inside, a standard output whose reader went away (a closed pipe) discards what is printed, quietly,
    instead of failing the command, and one that cannot be written (a full disk) discards it too, noting why
    (`_ReaderMayLeave`, given to the block); a terminal is left as it is (None)."""
    stream = sys.stdout
    try:
        interactive = stream is None or stream.isatty()
    except (ValueError, AttributeError):
        interactive = True
    if interactive:
        global _on_a_terminal
        _on_a_terminal = stream is not None
        yield None
        return
    sys.stdout = guarded = _ReaderMayLeave(stream)
    try:
        yield guarded
    finally:
        guarded.flush()  # what `print` and `typer.echo` buffered: it would fail at the interpreter's exit otherwise
        if sys.stdout is guarded:
            sys.stdout = stream


def terminal_went_away(exc: BaseException) -> bool:
    """Whether `exc` is a write to the terminal that went away (its window closed, an ssh connection dropped: the
    kernel answers EIO, and a hung-up terminal no longer says it is one): the command's output was a terminal."""
    return _on_a_terminal and isinstance(exc, OSError) and exc.errno == errno.EIO
