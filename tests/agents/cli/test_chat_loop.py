"""The interactive loop (`converse`) with lines from a list and real SIGINTs: Ctrl-C stops the answer, not the chat."""

from __future__ import annotations

import asyncio
import io
import os
import signal
from pathlib import Path

import pytest

from agentrt.agents.cli.chat_input import PlainLines, history_path, open_line_source
from agentrt.agents.cli.chat_loop import STOPPED_NOTE, converse
from agentrt.agents.cli.support import Stopped
from agentrt.db.errors import InvalidInputError


class Lines:
    """Lines from a list; then EOF (Ctrl-D). `interrupt()` ends a read in progress as the terminal sources do."""

    def __init__(self, *lines: str, then_wait: bool = False) -> None:
        self.lines = list(lines)
        self.then_wait = then_wait
        self.waiting: asyncio.Future[str] | None = None
        self.reading = asyncio.Event()

    async def read(self) -> str:
        if self.lines:
            return self.lines.pop(0)
        if not self.then_wait:
            raise EOFError
        self.waiting = asyncio.get_running_loop().create_future()
        self.reading.set()
        return await self.waiting

    def interrupt(self) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_exception(EOFError())


async def test_ctrl_c_stops_the_answer_and_the_next_line_is_answered(capsys: pytest.CaptureFixture[str]) -> None:
    answered: list[str] = []
    cancelled: list[str] = []

    async def answer(line: str) -> None:
        if line == 'slow':
            try:
                signal.raise_signal(signal.SIGINT)
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(line)
                raise
        answered.append(line)

    before = signal.getsignal(signal.SIGINT)
    conversed = await converse(Lines('slow', 'next'), answer, turn_errors=())
    assert cancelled == ['slow'] and answered == ['next']
    assert (conversed.turns, conversed.failed, conversed.stopped) == (2, 0, 1)
    assert isinstance(conversed.last_error, Stopped)  # what a script feeding the lines is told: exit 130
    assert STOPPED_NOTE in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # the prompt's Ctrl-C is the terminal's again


async def test_ctrl_c_while_waiting_for_a_line_leaves() -> None:
    lines = Lines(then_wait=True)
    task = asyncio.create_task(converse(lines, lambda line: asyncio.sleep(0), turn_errors=()))
    await lines.reading.wait()
    signal.raise_signal(signal.SIGINT)
    await asyncio.wait_for(task, 5)  # returned: the conversation ended as with Ctrl-D


async def test_ctrl_c_twice_while_the_answer_stops_ends_the_command() -> None:
    async def stubborn(line: str) -> None:
        signal.raise_signal(signal.SIGINT)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            signal.raise_signal(signal.SIGINT)  # pressed again while the answer is still stopping
            await asyncio.sleep(0.1)  # it takes a moment; the command waits for it
            raise

    with pytest.raises(Stopped) as stopped:
        await asyncio.create_task(converse(Lines('slow', 'never'), stubborn, turn_errors=()))
    assert stopped.value.signum == signal.SIGINT  # the CLI reports it and exits 130


async def test_a_failed_turn_is_an_error_line_and_the_chat_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    answered: list[str] = []

    async def answer(line: str) -> None:
        if line == 'bad':
            raise InvalidInputError('the message is too long', field='message')
        answered.append(line)

    await converse(Lines('bad', '   ', 'good', 'exit', 'after exit'), answer, turn_errors=(InvalidInputError,))
    assert answered == ['good']
    assert 'error: the message is too long' in capsys.readouterr().err


def test_history_file_beside_the_data_directory_or_as_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    data = Path('/data/agentrt/pgdata')
    monkeypatch.delenv('AGENTRT_CHAT_HISTORY', raising=False)
    assert history_path(data) == Path('/data/agentrt/chat-history')
    monkeypatch.setenv('AGENTRT_CHAT_HISTORY', '')
    assert history_path(data) is None
    monkeypatch.setenv('AGENTRT_CHAT_HISTORY', '~/h')
    assert history_path(data) == Path('~/h').expanduser()


async def test_no_standard_input_is_the_end_of_input(monkeypatch: pytest.MonkeyPatch) -> None:
    # `agentrt chat <&-`: Python's sys.stdin is None; `isatty()` on it was an internal error (exit 70).
    monkeypatch.setattr('sys.stdin', None)
    source = open_line_source(None)
    assert isinstance(source, PlainLines)
    with pytest.raises(EOFError):
        await source.read()


async def test_lines_typed_at_a_terminal_whose_output_is_piped_are_prompted_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `agentrt chat | tee log`: someone types, the answers go to a pipe. The prompt helps them and stays out of the log.
    monkeypatch.setattr('sys.stdin', io.StringIO('hello\n'))
    typed = PlainLines(prompted=True)
    assert await typed.read() == 'hello'
    with pytest.raises(EOFError):
        await typed.read()
    captured = capsys.readouterr()
    assert captured.err.count('you>') == 2 and 'you>' not in captured.out


async def test_piped_lines_end_at_lf_crlf_or_cr_even_when_a_crlf_is_split_between_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `printf 'a\rb\r' | agentrt chat` was one message (the reader split at LF only: QA); a CRLF that arrives in two
    # reads must still be one line end, not an empty line between.
    read_end, write_end = os.pipe()
    stdin = os.fdopen(read_end, 'r')
    monkeypatch.setattr('sys.stdin', stdin)
    lines = PlainLines()
    try:
        os.write(write_end, b'dermatologists in Boston\r')
        first = asyncio.ensure_future(lines.read())
        await asyncio.sleep(0.1)  # the reader has the CR; its LF comes in a read of its own
        os.write(write_end, b'\ncardiologists\rin Denver\nlast, no end')
        os.close(write_end)
        assert await first == 'dermatologists in Boston'
        assert [await lines.read() for _ in range(3)] == ['cardiologists', 'in Denver', 'last, no end']
        with pytest.raises(EOFError):
            await lines.read()
    finally:
        stdin.close()
