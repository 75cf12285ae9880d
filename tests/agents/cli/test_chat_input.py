"""The line editor of the interactive `agentrt chat` (`TerminalLines`), fed keys as a terminal sends them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import PipeInput, create_pipe_input
from prompt_toolkit.output import DummyOutput

from agentrt.agents.cli.chat_input import UNDO_MAX_CHARS, TerminalLines
from agentrt.agents.cli.chat_loop import converse
from agentrt.db.errors import InvalidInputError


@pytest.fixture
def keys() -> Iterator[PipeInput]:
    """What the terminal sends; the line editor reads it as its input, and draws nowhere."""
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        yield pipe


async def test_a_line_typed_past_the_limit_is_refused_with_its_length(keys: PipeInput) -> None:
    lines = TerminalLines(None, max_chars=1_000)
    keys.send_text('y' * 5_000 + '\r')  # keys, not a bracketed paste: what a terminal without it sends
    with pytest.raises(InvalidInputError, match='is 5,000 characters long; the limit is 1,000'):
        await lines.read()
    keys.send_text('next\r')
    assert await lines.read() == 'next'  # the refused line is gone; the next one is read as usual


async def test_a_bracketed_paste_past_the_limit_is_refused_and_one_within_it_is_kept(keys: PipeInput) -> None:
    lines = TerminalLines(None, max_chars=1_000)
    keys.send_text('\x1b[200~' + 'z' * 3_000 + '\x1b[201~\r')
    with pytest.raises(InvalidInputError, match='is 3,000 characters long'):
        await lines.read()
    keys.send_text('\x1b[200~two\r\nlines\x1b[201~\r')
    assert await lines.read() == 'two\nlines'


@pytest.mark.parametrize(
    ('edit', 'sent'),
    [
        ('\x03', 'Cardiologists'),  # Ctrl-C clears the line
        ('\x15', 'Cardiologists'),  # Ctrl-U deletes to its start
        ('\x7f' * 30, 'x' * 10 + 'Cardiologists'),  # Backspace: what is left is what is seen, and sent
    ],
    ids=['ctrl-c', 'ctrl-u', 'backspace'],
)
async def test_a_line_cleared_or_shortened_after_it_stopped_growing_is_judged_as_it_is(
    keys: PipeInput, edit: str, sent: str
) -> None:
    # The characters past the limit were still counted after the line was cleared or shortened: a short line was then
    # refused, with a length it never had ("25 characters long; the limit is 30") (QA).
    lines = TerminalLines(None, max_chars=40)
    keys.send_text('\x1b[200~' + 'x' * 60 + '\x1b[201~' + edit + 'Cardiologists\r')
    assert await lines.read() == sent


async def test_a_line_refused_as_too_long_is_not_kept_in_history(keys: PipeInput, tmp_path: Path) -> None:
    # It was kept cut to the limit: Up then Enter sent the cut text, silently another question (QA).
    history = tmp_path / 'history'
    lines = TerminalLines(history, max_chars=20)
    keys.send_text('\x1b[200~Dermatologists in Boston who take Medicare\x1b[201~\r')
    with pytest.raises(InvalidInputError, match='is 42 characters long'):
        await lines.read()
    keys.send_text('short one\r')
    assert await lines.read() == 'short one'
    keys.send_text('\x1b[A\x1b[A\r')  # Up twice: the line before 'short one' is none
    assert await lines.read() == 'short one'
    assert 'Dermatologists' not in history.read_text()


async def test_a_line_recalled_over_the_limit_is_refused_and_not_kept_again(keys: PipeInput, tmp_path: Path) -> None:
    # An earlier session's line, kept when the limit was higher: Up then Enter was refused by the turn, but added to
    # the history again each time (QA).
    history = tmp_path / 'history'
    long_line = 'Dermatologists in Boston who take Medicare and see children'
    history.write_text(f'\n# 2026-12-01 10:00:00.000000\n+{long_line}\n')
    lines = TerminalLines(history, max_chars=40)
    keys.send_text('\x1b[A\r')
    with pytest.raises(InvalidInputError, match=f'is {len(long_line)} characters long; the limit is 40'):
        await lines.read()
    assert history.read_text().count(long_line) == 1


async def test_ctrl_r_finds_an_earlier_line_whatever_its_case(keys: PipeInput) -> None:
    # prompt_toolkit's search is case-sensitive by default: `derm` did not find "Dermatologists in Boston" (QA).
    lines = TerminalLines(None)
    keys.send_text('Dermatologists in Boston\r')
    assert await lines.read() == 'Dermatologists in Boston'
    keys.send_text('\x12derm\r\r')  # Ctrl-R, the search, Enter to take the line found, Enter to send it
    assert await lines.read() == 'Dermatologists in Boston'


async def test_a_long_typed_line_keeps_no_copy_of_itself_per_key(keys: PipeInput) -> None:
    # prompt_toolkit kept an undo step, a copy of the whole line, for every key: a megabyte typed took gigabytes.
    lines = TerminalLines(None, max_chars=20_000)
    keys.send_text('y' * 10_000 + '\r')
    assert await lines.read() == 'y' * 10_000
    undo = lines._session.default_buffer._undo_stack  # prompt_toolkit's, where the copies were kept
    assert sum(len(text) for text, _ in undo) <= UNDO_MAX_CHARS**2


async def test_a_refused_line_is_a_failed_turn_and_the_chat_goes_on(
    keys: PipeInput, capsys: pytest.CaptureFixture[str]
) -> None:
    answered: list[str] = []

    async def answer(line: str) -> None:
        answered.append(line)

    keys.send_text('y' * 50 + '\rshort\r')
    keys.send_text('\x04')  # Ctrl-D at an empty prompt: leave
    conversed = await converse(TerminalLines(None, max_chars=20), answer, turn_errors=(InvalidInputError,))
    assert answered == ['short']
    assert (conversed.turns, conversed.failed) == (2, 1)
    assert 'error: the chat message is 50 characters long; the limit is 20' in capsys.readouterr().err


@pytest.mark.parametrize('sequence', ['\x1b[31m', '\x1b[0m', '\x1b[1;2;3;4m', '\x1b[<1m'])
async def test_a_colour_code_typed_at_the_prompt_is_no_traceback(keys: PipeInput, sequence: str) -> None:
    # prompt_toolkit reads ESC [ 31 m as a mouse report; its mouse handler failed on it ('Unhandled exception in event
    # loop', a traceback, 'Press ENTER to continue...').
    lines = TerminalLines(None)
    keys.send_text(f'red {sequence}text\rnext\r')  # the failure's 'Press ENTER to continue' took 'text' and Enter
    assert await lines.read() == 'red text'


async def test_a_history_file_that_cannot_be_written_is_said_once_and_the_chat_goes_on(
    keys: PipeInput, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A full disk under the history file (beside the data directory): prompt_toolkit's write failed inside its key
    # handler, a traceback and "Press ENTER to continue..." in the middle of the chat, at every line. Here a directory
    # stands where the file was (its write fails with an OSError, as ENOSPC does).
    history = tmp_path / 'chat-history'
    lines = TerminalLines(history)
    history.unlink()
    history.mkdir()
    keys.send_text('first\r')
    assert await lines.read() == 'first'
    keys.send_text('second\r')
    assert await lines.read() == 'second'
    keys.send_text('\x1b[A\r')  # Up: the last line, from memory
    assert await lines.read() == 'second'
    told = capsys.readouterr().err
    assert told.count('chat history: cannot use') == 1 and str(history) in told and 'in memory only' in told


async def test_a_configured_history_file_in_a_missing_directory_is_said_and_the_directory_not_made(
    keys: PipeInput, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # AGENTRT_CHAT_HISTORY=/nonexistent/dir/hist silently made `/nonexistent/dir/` (the chat ran as root), where a
    # path mistyped is to be said: one warning naming the variable, the lines kept in memory (QA).
    history = tmp_path / 'nonexistent' / 'dir' / 'hist'
    monkeypatch.setenv('AGENTRT_CHAT_HISTORY', str(history))
    lines = TerminalLines(history)
    keys.send_text('first\r')
    assert await lines.read() == 'first'
    told = ' '.join(capsys.readouterr().err.split())
    assert f'chat history: cannot use {history} (its directory {history.parent} does not exist)' in told, told
    assert 'in memory only (AGENTRT_CHAT_HISTORY names another file, empty for none)' in told
    assert not (tmp_path / 'nonexistent').exists()


@pytest.mark.parametrize(
    ('below', 'said'),
    [
        ('history', 'its parent {file} is not a directory'),
        ('sub/history', 'its parent {file}/sub cannot exist: {file} is'),
    ],
)
async def test_a_configured_history_file_below_a_file_is_said_so(
    keys: PipeInput,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    below: str,
    said: str,
) -> None:
    # AGENTRT_CHAT_HISTORY=/tmp/x/file.txt/history, file.txt a regular file: "its directory ... does not exist" (QA).
    file = tmp_path / 'file.txt'
    file.write_text('notes')
    history = file / below
    monkeypatch.setenv('AGENTRT_CHAT_HISTORY', str(history))
    lines = TerminalLines(history)
    keys.send_text('first\r')
    assert await lines.read() == 'first'
    told = ' '.join(capsys.readouterr().err.split())
    assert f'chat history: cannot use {history} ({said.format(file=file)}' in told, told
    assert 'does not exist' not in told and file.read_text() == 'notes'


@pytest.mark.parametrize('kind', ['directory', 'symlink'])
async def test_a_history_file_refused_at_the_start_is_said_once_before_the_first_prompt(
    keys: PipeInput, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    # AGENTRT_CHAT_HISTORY naming a directory (or a symlink) was no history at all, silently: the lines typed were
    # lost at the end of the chat with nothing said, where a file that failed its write was said.
    history = tmp_path / 'chat-history'
    if kind == 'directory':
        history.mkdir()
    else:
        history.symlink_to(tmp_path / 'elsewhere')
    lines = TerminalLines(history)
    keys.send_text('first\r')
    assert await lines.read() == 'first'
    told = capsys.readouterr().err
    assert told.count('chat history: cannot use') == 1 and str(history) in told and 'in memory only' in told
    keys.send_text('second\r')
    assert await lines.read() == 'second'
    keys.send_text('\x1b[A\r')  # Up: the last line, from memory
    assert await lines.read() == 'second'
    assert 'chat history' not in capsys.readouterr().err  # once
    assert kind == 'symlink' or not any(history.iterdir())
