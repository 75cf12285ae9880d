"""The CLI's log lines (`setup_logging`): one line each, and calm where nothing is wrong, unless `--debug`."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from agentrt.agents.cli import support
from agentrt.agents.cli.logs import setup_logging
from agentrt.agents.cli.support import err_console
from agentrt.db.engine import build_engine
from agentrt.db.failures import unavailable_error
from agentrt.db.settings import Settings
from agentrt.services.background import get_supervisor
from tests.agents.cli.helpers import invoke, logging_restored
from tests.ports import free_port


@contextmanager
def _terminal(debug: bool = False) -> Iterator[io.StringIO]:
    """The CLI's logging, its stderr console 80 columns wide and captured."""
    # The console's own stream (None: whatever `sys.stderr` is when it writes), not `.file`, which resolves it now.
    saved = err_console._file, err_console.width, support._debug
    err_console.file, err_console.width = io.StringIO(), 80
    support.set_debug(debug)
    try:
        with logging_restored():
            setup_logging(False)
            yield err_console.file  # type: ignore[misc]
    finally:
        err_console._file, err_console.width = saved[0], saved[1]
        support.set_debug(saved[2])


async def _rollup_while_the_database_is_down(database: Settings) -> None:
    """What a post-turn task meets during an outage: a real connection failure, translated as a session does."""
    engine = build_engine(make_url(f'postgresql+asyncpg://nobody:pw@127.0.0.1:{free_port()}/nowhere'), database)
    try:
        async with engine.connect() as connection:
            await connection.execute(text('SELECT 1'))
    except Exception as exc:
        raise unavailable_error(exc) or exc from exc
    finally:
        await engine.dispose()


async def _background_failure(task: object, name: str) -> None:
    get_supervisor().spawn(task, name=name)  # type: ignore[arg-type]
    await get_supervisor().join()


async def _broken() -> None:
    raise RuntimeError('a bug\nover two lines')


def _pool_close_cancelled() -> None:
    """What SQLAlchemy's pool logs when closing a connection is cancelled (a signal cancelled the command)."""
    try:
        raise asyncio.CancelledError()
    except asyncio.CancelledError:
        logging.getLogger('sqlalchemy.pool.impl.AsyncAdaptedQueuePool').error(
            'Exception closing connection %r', '<AdaptedConnection <asyncpg.connection.Connection>>', exc_info=True
        )


async def test_a_background_task_stopped_by_a_database_outage_is_one_calm_line(database: Settings) -> None:
    # It printed "ERROR background task ... failed after 0.001s: DatabaseUnavailableError: cannot connect to ..."
    # wrapped over three lines of an 80-column chat; and "ERROR Exception closing connection ... CancelledError" at
    # a SIGTERM.
    with _terminal() as stderr:
        await _background_failure(lambda: _rollup_while_the_database_is_down(database), 'roll_up_account_usage')
        _pool_close_cancelled()
    lines = stderr.getvalue().rstrip().splitlines()
    assert [line.rstrip() for line in lines] == [
        'WARNING  background task roll_up_account_usage not done: database unavailable'
    ]


async def test_real_errors_stay_errors_and_debug_shows_everything(database: Settings) -> None:
    with _terminal() as stderr:
        await _background_failure(_broken, 'broken')
    shown = stderr.getvalue()
    assert shown.startswith('ERROR    background task broken failed after') and 'RuntimeError: a bug over' in shown
    with _terminal(debug=True) as stderr:
        await _background_failure(lambda: _rollup_while_the_database_is_down(database), 'roll_up_account_usage')
        _pool_close_cancelled()
    shown = stderr.getvalue()
    assert 'WARNING  background task roll_up_account_usage not done: database unavailable' in shown
    assert 'Traceback' in shown and 'DatabaseUnavailableError' in shown
    assert 'Exception closing connection' in shown and 'CancelledError' in shown


async def _long_failure() -> None:
    raise RuntimeError('the queue has no tables ' + 'x' * 2_000 + ' run agentrt db upgrade with the same names')


async def test_a_long_exception_on_a_log_line_keeps_its_end_and_says_what_is_left_out(database: Settings) -> None:
    # It was cut at 300 characters with no marker: the end of a queue's error, which says what to run, was lost.
    with _terminal() as stderr:
        await _background_failure(_long_failure, 'long')
    shown = ' '.join(stderr.getvalue().split())  # the console wraps at 80 columns
    assert 'RuntimeError: the queue has no tables xxx' in shown
    assert 'characters not shown ...]' in shown and shown.endswith('run agentrt db upgrade with the same names')
    assert len(shown) < 1_000


ESCAPES = '\x1b[2J\x1b]0;TITLE\x07\u202e\x9b'
"""A provider's error text as it may be: a cleared screen, a new title, a right-to-left override, an 8-bit CSI."""


@pytest.mark.parametrize('debug', [False, True])
def test_a_log_lines_control_characters_are_written_out(debug: bool) -> None:
    # Rich drops BEL, CR and a few more from a log line, and let ESC and C1 through: a provider's text in a warning
    # (or its exception, whole with --debug) reached the terminal as escapes (qa140).
    with _terminal(debug=debug) as stderr:
        try:
            raise RuntimeError(f'bad {ESCAPES} thing')
        except RuntimeError:
            logging.getLogger('agentrt.test').warning('provider said %s', ESCAPES, exc_info=True)
    shown = stderr.getvalue()
    assert not {'\x1b', '\x07', '\u202e', '\x9b'} & set(shown), repr(shown)
    assert shown.count(r'\x1b[2J\x1b]0;TITLE\x07\u202e\x9b') == 2, shown
    assert ('Traceback' in shown) is debug


def test_debugs_traceback_writes_the_exceptions_control_characters_out(capsys: pytest.CaptureFixture[str]) -> None:
    # `agentrt --debug` printed a provider's error text raw in the traceback: `ESC]0;...` retitled the terminal of
    # whoever turned --debug on to see why a provider failed (qa140). The traceback's own lines stay lines.
    saved = support._debug
    support.set_debug(True)
    try:
        try:
            raise RuntimeError(f'Error code: 400 - bad {ESCAPES} thing')
        except RuntimeError as exc:
            support.report(exc)
    finally:
        support.set_debug(saved)
    printed = capsys.readouterr().err
    assert printed.startswith('Traceback (most recent call last):\n  File '), printed
    assert r'RuntimeError: Error code: 400 - bad \x1b[2J\x1b]0;TITLE\x07\u202e\x9b thing' in printed, printed
    assert not {'\x1b', '\x07', '\u202e', '\x9b'} & set(printed), repr(printed)


@pytest.fixture(autouse=True)
def _no_leftover_handlers() -> Iterator[None]:
    yield
    logging.getLogger('sqlalchemy.pool.impl.AsyncAdaptedQueuePool').handlers.clear()


class _ClosedPipe(io.StringIO):
    """A stderr whose reader went away (`agentrt chat ... 2>&1 | head -3`)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, 'Broken pipe')


def test_a_closed_stderr_quiets_the_log_and_error_lines_instead_of_ending_the_command() -> None:
    # rich's answer to a closed pipe is SystemExit(1), raised where the line was printed: `agentrt -v db status 2>&1
    # | head` ended in the embedded server's start (in a thread), after the server started, before its user was
    # registered. Standard output already lets its reader leave (`_ReaderMayLeave`); stderr does the same.
    saved = err_console._file, err_console.quiet
    err_console.file = _ClosedPipe()
    finished: list[bool] = []

    def start() -> None:
        logging.getLogger('agentrt.db').info('embedded PostgreSQL: data in /somewhere')
        logging.getLogger('agentrt.db').info('a second line, once the first found the pipe closed')
        finished.append(True)

    try:
        with logging_restored():
            setup_logging(False)
            thread = threading.Thread(target=start)
            thread.start()
            thread.join()
            assert finished == [True], 'the log line ended the thread that wrote it'
            support.error_line('the command goes on to its end, and says nothing more')
    finally:
        err_console._file, err_console.quiet = saved


async def test_ctrl_c_during_a_command_says_what_it_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncio.run answers a SIGINT by cancelling the command (its clean-up runs) and then raising KeyboardInterrupt,
    # which typer turned into a silent exit 130 before the error boundary saw it: Ctrl-C while `agentrt db status`
    # started the embedded server ended it without a word, where SIGTERM says "stopped by SIGTERM; ...".
    async def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr('agentrt.agents.cli.database._status', interrupted)
    result = await invoke('db', 'status')
    assert result.exit_code == 130
    assert result.stderr == 'error: stopped by SIGINT; nothing in progress was saved\n'


@pytest.mark.parametrize('code', [0, 8])
async def test_a_stop_after_the_commands_work_was_saved_says_so_and_keeps_its_exit_code(
    code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Ctrl-C landing after `agentrt chat` saved its turn, as asyncio.run ended (its remaining tasks cancelled, after
    # the command's coroutine returned): "stopped by SIGINT; nothing in progress was saved", exit 130 (QA).
    calls: list[int] = []

    async def saved_then_interrupted() -> None:
        calls.append(1)
        if len(calls) == 1:
            support.work_done('interrupted after the work was saved', code)
        raise KeyboardInterrupt

    monkeypatch.setattr('agentrt.agents.cli.database._status', saved_then_interrupted)
    result = await invoke('db', 'status')
    assert result.exit_code == code
    assert result.stderr == 'interrupted after the work was saved\n'
    again = await invoke('db', 'status')  # the next command starts afresh: its stop saved nothing
    assert again.exit_code == 130 and 'nothing in progress was saved' in again.stderr


def test_a_libraries_warning_is_one_log_line_without_its_source() -> None:
    # Python printed it as it is: file, line number, the source line, the warning's own several lines (QA: pydantic's
    # serializer warnings over a tool's odd result, pydantic-ai's usage it could not read, in a chat's output).
    import warnings

    words = 'Pydantic serializer warnings:\n  PydanticSerializationUnexpectedValue(Expected `str`)'
    with _terminal() as stderr, warnings.catch_warnings():
        setup_logging(False)  # inside catch_warnings: the test's own warning capture is given back after it
        warnings.simplefilter('always')
        warnings.warn(words, stacklevel=1)
    shown = ' '.join(stderr.getvalue().split())  # one record, which the 80-column console may wrap
    assert shown.count('WARNING') == 1, shown
    assert 'UserWarning: Pydantic serializer warnings: PydanticSerializationUnexpectedValue' in shown, shown
    assert 'warnings.warn' not in shown and '.py:' not in shown


def test_a_log_line_during_a_streamed_answer_starts_on_a_line_of_its_own() -> None:
    # Both on one terminal, a ledger warning printed mid-answer was glued to its last word: `okERROR ledger ...` (QA).
    from agentrt.agents.cli.chat import _Display
    from agentrt.agents.cli.support import console

    with _terminal() as screen:
        saved = console._file, console._force_terminal, err_console._force_terminal, support.open_answer_line
        console.file, console._force_terminal, err_console._force_terminal = screen, True, True
        try:
            display = _Display()
            display.text('The first three are ok')
            logging.getLogger('agentrt.ledger').warning('ledger spool: 1 unwritable line(s) moved')
            display.text(' and more.')
            display.end_line()
        finally:
            console._file, console._force_terminal, err_console._force_terminal = saved[:3]
            support.open_answer_line = saved[3]
    lines = [line.rstrip() for line in screen.getvalue().splitlines()]
    assert 'The first three are ok' in lines and lines[-1] == ' and more.', lines
    assert any(line.startswith('WARNING') and 'ledger spool' in line for line in lines), lines


def test_a_log_line_after_an_answer_written_to_the_same_file_starts_a_line(tmp_path: Path) -> None:
    # `agentrt chat ... > out.txt 2>&1`: the answer's last line has no line break (the model wrote none) and the
    # ledger's warning came after it: `...the answer is 42.WARNING  ledger: ...` (QA). Written to separate files,
    # the answer is left as the model wrote it (its line ended once, by the turn's end).
    from agentrt.agents.cli.chat import _Display
    from agentrt.agents.cli.support import console

    def shown(out: Path, err: Path) -> tuple[str, str]:
        with _terminal(), out.open('a') as answers, answers if err == out else err.open('a') as logs:
            saved = console._file, err_console._file, support.open_answer_line
            console.file, err_console.file = answers, logs
            try:
                display = _Display()
                display.text('Hello, the answer is 42.')
                logging.getLogger('agentrt.ledger').warning('ledger: gpt-4o-mini reported token counts no request has')
                display.end_line()
            finally:
                console._file, err_console._file, support.open_answer_line = saved
        return out.read_text(), err.read_text()

    together, _ = shown(tmp_path / 'both.txt', tmp_path / 'both.txt')
    assert together.splitlines()[0] == 'Hello, the answer is 42.', together
    assert together.splitlines()[1].startswith('WARNING  ledger: gpt-4o-mini'), together
    answer, log = shown(tmp_path / 'answer.txt', tmp_path / 'log.txt')
    assert answer == 'Hello, the answer is 42.\n' and log.startswith('WARNING  ledger: gpt-4o-mini'), (answer, log)


def test_an_emoji_code_in_a_printed_value_stays_as_typed(capsys: pytest.CaptureFixture[str]) -> None:
    """rich turned `:id:` and `:smile:` of a quoted value into emoji (`--account 'id:id:2'` was quoted as `'id🆔2'`)."""
    support.error_line("account 'id:id:2' is not an account id; title 'x:smile:y'", redact=False)
    support.console.print('a title :smile: of a table cell', highlight=False)
    captured = capsys.readouterr()
    assert "'id:id:2'" in captured.err and "'x:smile:y'" in captured.err
    assert ':smile:' in captured.out
    assert not any(ord(character) > 0xFFFF for character in captured.err + captured.out)
