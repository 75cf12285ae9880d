"""The interactive `agentrt chat`: read a line, answer it, again, until the user leaves.

Ctrl-C while an answer is coming stops that answer only: its task is cancelled (the turn is not saved, the model
request it cut off is in the ledger as `cancelled`, the conversation is free again) and the prompt comes back. A
second Ctrl-C before the answer has stopped ends the command ("stopped by SIGINT", exit 130). Ctrl-C while waiting for a
line (in a terminal it is a key of the line editor, see `chat_input`; a SIGINT from elsewhere) leaves, as Ctrl-D
does. SIGTERM and SIGHUP stop the whole command as for every command (`support.run`).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from agentrt.agents.cli.chat_input import LineSource
from agentrt.agents.cli.support import Stopped, err_console, error_line

EXIT_COMMANDS = frozenset({'exit', 'quit', ':q'})
STOPPED_NOTE = (
    'stopped: this answer was not saved (the ledger keeps its model requests; one the stop cut off is marked cancelled)'
)
READER_LEFT_NOTE = (
    'the output can no longer be written (its reader left, or its disk is full): the lines left were not sent'
)


class _Interrupts:
    """What Ctrl-C (SIGINT) does at each moment of the conversation."""

    def __init__(self, lines: LineSource, main: asyncio.Task[object]) -> None:
        self.lines = lines
        self.main = main
        self.answer: asyncio.Task[None] | None = None
        self.stopping = False
        self.forced = False

    def interrupt(self) -> None:
        answer = self.answer
        if answer is None or answer.done():
            self.lines.interrupt()
        elif not self.stopping:
            self.stopping = True
            answer.cancel()
        else:
            self.forced = True
            self.main.cancel()


@dataclass
class Conversed:
    """What a conversation came to: the lines answered or tried, the turns that failed, the answers Ctrl-C stopped,
    and what went wrong last (a failed turn's error, or `Stopped` for a stopped answer)."""

    turns: int = 0
    failed: int = 0
    stopped: int = 0
    last_error: BaseException | None = None


async def converse(
    lines: LineSource,
    answer: Callable[[str], Awaitable[None]],
    turn_errors: tuple[type[BaseException], ...],
    unread: Callable[[], bool] = lambda: False,
) -> Conversed:
    """Answer each line of `lines` with `answer(line)` until the user leaves (`EOFError`, or an exit command), or
    nobody reads the answers any more.

    Args:
        lines: where lines come from.
        answer: one turn: sends the line and shows the answer.
        turn_errors: what can fail one turn without ending the conversation (printed as an `error:` line).
        unread: whether the answers' reader went away (`... | agentrt chat | head`): no further line is sent to the
            model for an output nobody reads (the turn it left in runs to its end).

    Returns:
        How many turns ran, failed and were stopped by Ctrl-C (a stopped answer is no error: the chat goes on; a
        script feeding lines learns of it from the exit code, `agentrt chat`).

    Raises:
        Stopped: Ctrl-C twice while an answer was stopping (the answer was stopped first): exit 130.
    """
    main = asyncio.current_task()
    assert main is not None
    interrupts = _Interrupts(lines, main)
    conversed = Conversed()
    with _sigint_calls(interrupts.interrupt):
        while not unread():
            try:
                line = await lines.read()
            except EOFError:
                return conversed
            except turn_errors as exc:  # a line the line editor refused (past the message limit), as a turn would
                error_line(str(exc))
                conversed.turns += 1
                conversed.failed += 1
                conversed.last_error = exc
                continue
            if line.strip().lower() in EXIT_COMMANDS:
                return conversed
            if not line.strip():
                continue
            conversed.turns += 1
            interrupts.answer = task = asyncio.create_task(_answer(answer, line))
            interrupts.stopping = False
            try:
                await task
            except asyncio.CancelledError:
                if main.cancelling():  # the command itself is stopping: let the answer finish stopping, then go
                    task.cancel()
                    await asyncio.wait([task])
                    if interrupts.forced:
                        raise Stopped(signal.SIGINT) from None
                    raise
                err_console.print(STOPPED_NOTE, style='dim', highlight=False)
                conversed.stopped += 1
                conversed.last_error = Stopped(signal.SIGINT)
            except turn_errors as exc:  # one failed turn (a line too long, a rate limit...) does not end the chat
                error_line(str(exc))
                conversed.failed += 1
                conversed.last_error = exc
            finally:
                interrupts.answer = None
        err_console.print(READER_LEFT_NOTE, style='dim', highlight=False)
    return conversed


async def _answer(answer: Callable[[str], Awaitable[None]], line: str) -> None:
    await answer(line)


@contextmanager
def _sigint_calls(callback: Callable[[], None]) -> Iterator[None]:
    """While the block runs, SIGINT calls `callback` in the event loop instead of stopping the command.

    Set with `signal.signal` (and the previous handler put back), not `loop.add_signal_handler`, whose removal would
    leave Python's default handler in place of asyncio's. Only the main thread can set one (the in-process test
    runner runs commands in another): there SIGINT keeps its default.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(callback)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
