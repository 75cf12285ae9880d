"""Shared plumbing for the `agentrt` CLI: running coroutines, the consoles, and the errors its boundary reports (its
log lines are set up in `logs.py`).

The boundary itself is `AgentrtGroup.main` (`group.py`); what it prints is `report()` here.

Every error a user or the environment causes ends the command with one `error: ...` line on stderr (what went
wrong and what to do) and an exit code of its class (`EXIT_CODES`, documented in README.md). A traceback is printed
only with `agentrt --debug ...` or `AGENTRT_DEBUG=1`; an unexpected exception (a bug) says so, with exit code 70.
Whatever the CLI prints of an error (the `error:` line, a traceback, a log line) goes through the ledger's
`redact_text` first: a provider's or the database's error text can hold a secret it was sent.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from agentrt.agents.cli.output import plain_decimal
from agentrt.agents.cli.pipes import terminal_went_away
from agentrt.agents.cli_entry import Stopped as Stopped  # the CLI's own name for it (chat_loop, worker)
from agentrt.agents.cli_entry import signals_to_asyncio
from agentrt.db.errors import (
    AgentRuntimeError,
    BudgetExceededError,
    ConfigError,
    DatabaseUnavailableError,
    EmbeddedPostgresError,
    InvalidInputError,
    MigrationError,
    ModelBehaviorError,
    ModelProviderError,
    RuntimeBusyError,
    TurnLimitExceededError,
)
from agentrt.db.flags import env_flag

if TYPE_CHECKING:  # the runtime is imported when a command runs, so every `--help` stays fast
    from sqlalchemy.ext.asyncio import AsyncSession

T = TypeVar('T')


class _UnwrappedWhenPiped(Console):
    """rich's console, which neither wraps a message's lines nor cuts a table when it writes to a file or a pipe.

    rich lays out for 80 columns when no terminal tells it a width, so a script capturing `agentrt db seed > out.txt`
    or `agentrt keys create ... | cat` got sentences (and a key or id in them) broken across lines, and `agentrt
    costs > costs.txt` got an account's name cut to `acme-h…`. There, a message (text) is written on one line and a
    table at its natural width, every cell in full. A width someone gave (`COLUMNS`, or `console.width`) still holds.
    """

    @property
    def table_room(self) -> int:
        """How many columns a table may take: the terminal's (or the given) width; no limit for a file or a pipe."""
        return sys.maxsize if self._unbounded() else self.width

    def _unbounded(self) -> bool:
        # `_width` is rich's record of a width it was given (its argument, the setter, or COLUMNS when it was made).
        columns = os.environ.get('COLUMNS', '')
        return not self.is_terminal and self._width is None and not (columns.isascii() and columns.isdigit())

    def print(self, *objects: Any, soft_wrap: bool | None = None, **options: Any) -> None:
        """`Console.print`, soft-wrapped (never broken into lines) when every object is text and not for a terminal;
        a table printed for a file or a pipe is as wide as its widest row needs."""
        if soft_wrap is None and not self.is_terminal and all(isinstance(item, str) for item in objects):
            soft_wrap = True
        if self._unbounded():
            needed = self._natural_width(objects)
        else:
            needed = self._least_width(objects)
        if needed is None or needed <= self.width:
            super().print(*objects, soft_wrap=soft_wrap, **options)
            return
        given = self._width
        self._width = needed  # rich never renders wider than the console: widen it for this print only
        try:
            super().print(*objects, soft_wrap=soft_wrap, **options)
        finally:
            self._width = given

    def _natural_width(self, objects: tuple[Any, ...]) -> int | None:
        from rich.measure import Measurement

        room = self.options.update_width(_NO_LIMIT)
        widths = [Measurement.get(self, room, table).maximum for table in _tables(objects)]
        return max(widths, default=None)

    def _least_width(self, objects: tuple[Any, ...]) -> int | None:
        """The width the tables among `objects` need in a terminal, each column given at least a few cells.

        rich squeezes a table too wide for its terminal column by column, down to 0 cells when their padding alone
        does not fit (`COLUMNS=30 agentrt costs`: the cost column printed empty). Each column of a table wider than
        the terminal is kept to `_FEWEST_CELLS` (or its whole width when less), its cells folded into them, and the
        table is given the width that needs when the terminal is narrower still (the terminal wraps its lines):
        every cell is there.
        """
        from rich.measure import Measurement

        room = self.options.update_width(_NO_LIMIT)
        least: int | None = None
        for table in _tables(objects):
            natural = Measurement.get(self, room, table).maximum
            if natural <= self.width:
                continue
            contents = [
                max(Measurement.get(self, room, cell).maximum for cell in (column.header, *column.cells))
                for column in table.columns
            ]
            for column, content in zip(table.columns, contents, strict=True):
                if column.min_width is None:
                    column.min_width = min(content, _FEWEST_CELLS)
            frame = natural - sum(contents)  # padding, dividers and edges
            width = frame + sum(column.min_width or 0 for column in table.columns)
            least = width if least is None else max(least, width)
        return least


def _tables(objects: tuple[Any, ...]) -> list[Any]:
    from rich.table import Table

    return [item for item in objects if isinstance(item, Table)]


_FEWEST_CELLS = 3  # a column of a squeezed table keeps at least this many cells (or its whole width when less)
_NO_LIMIT = 1_000_000  # columns: a measure wide enough for any table's widest row


class _StderrConsole(_UnwrappedWhenPiped):
    """rich's console on stderr, whose reader may go away too (`agentrt chat ... 2>&1 | head -3`).

    rich answers a closed pipe with `SystemExit(1)`, raised wherever the line was printed: a log line of the embedded
    server's start (in its thread, after the server started and before its user was registered), of a turn, of a
    shutdown. Here the console goes quiet instead and the command runs to its end, as with standard output
    (`_ReaderMayLeave`): its exit code still says how it ended.
    """

    def on_broken_pipe(self) -> None:
        """Print nothing more on stderr; never end the command."""
        self.quiet = True


def _ignore_unusable_columns() -> None:
    """Drop a `COLUMNS` that is no positive whole number of ASCII digits before rich reads it: rich takes `0` for a
    width of nothing (every table and message printed as nothing, exit 0) and crashes on `²` (its `int()` refuses
    what `isdigit` let through), as the consoles are made, so even `--version` was a traceback (QA)."""
    columns = os.environ.get('COLUMNS')
    if columns is not None and not (columns.isascii() and columns.isdigit() and int(columns) > 0):
        del os.environ['COLUMNS']


_ignore_unusable_columns()
# No emoji codes: rich turned a `:name:` of a value it printed into an emoji (`--account 'id:id:2'` was quoted as
# `'id🆔2'`, a title's `:smile:` too, QA); nothing here writes one on purpose.
console = _UnwrappedWhenPiped(emoji=False)
err_console = _StderrConsole(stderr=True, emoji=False)

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3
EXIT_EMBEDDED = 4
EXIT_MIGRATION = 5
EXIT_PROVIDER = 6
EXIT_LIMIT = 7
EXIT_CONFLICT = 8
EXIT_MODEL_BEHAVIOR = 9
EXIT_BUDGET = 10
EXIT_BUSY = 11
EXIT_INTERNAL = 70
EXIT_SIGNAL_BASE = 128  # + the signal's number: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP

# The most specific class first: the first match decides the exit code. The errors of the services layer join in
# `exit_codes()`, imported only when an error is reported (importing them costs `agentrt --help` its speed).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, EXIT_USAGE),
    (InvalidInputError, EXIT_USAGE),
    (DatabaseUnavailableError, EXIT_DATABASE),
    (EmbeddedPostgresError, EXIT_EMBEDDED),
    (MigrationError, EXIT_MIGRATION),
    (ModelProviderError, EXIT_PROVIDER),
    (TurnLimitExceededError, EXIT_LIMIT),
    (ModelBehaviorError, EXIT_MODEL_BEHAVIOR),
    (BudgetExceededError, EXIT_BUDGET),
    (RuntimeBusyError, EXIT_BUSY),
    (AgentRuntimeError, EXIT_FAILURE),
)


def exit_codes() -> tuple[tuple[type[BaseException], int], ...]:
    """`EXIT_CODES` with the service errors that subclass `AgentRuntimeError` ahead of it."""
    from agentrt.services.conversations import ConcurrentTurnError
    from agentrt.services.tenancy import UnknownTenantError

    return ((UnknownTenantError, EXIT_USAGE), (ConcurrentTurnError, EXIT_CONFLICT), *EXIT_CODES)


_debug = False

open_answer_line: Callable[[], None] | None = None
"""Ends the streamed answer's line on the terminal, if one is open, before a log line is shown there (`agentrt chat`
sets it: a log line printed in the middle of an answer was glued to its last word, `okERROR ledger spool: ...`)."""


def set_debug(enabled: bool) -> None:
    """Print tracebacks of errors (`--debug`, or `AGENTRT_DEBUG=1` in the environment)."""
    global _debug
    _debug = enabled


def debug_enabled() -> bool:
    """Whether tracebacks are shown."""
    if _debug:
        return True
    try:
        return env_flag('AGENTRT_DEBUG')
    except ConfigError:  # refused with its own error as the command starts (`check_debug_flag`); here: off
        return False


def check_debug_flag() -> None:
    """Refuse a value of `AGENTRT_DEBUG` that is neither on nor off, as a command starts (exit 2, one line)."""
    try:
        env_flag('AGENTRT_DEBUG')
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


MAX_ERROR_CHARS = 1500
"""The longest `error:` line shown whole; a longer one keeps its start and its end."""


def error_line(message: str, *, redact: bool = True) -> None:
    """Print `error: message` on stderr, on one line, without secrets.

    Args:
        message: what went wrong and what to do.
        redact: False only for the CLI's own messages about its arguments (usage errors, `fail()`): they quote
            nothing but what the user typed, and skipping the redaction keeps them as fast as `--help`.
    """
    from agentrt.agents.cli.transcript import visible

    # Control characters written out: a message may quote a value as it came (a library's "Unknown model: ..."), and
    # an escape sequence typed in an argument recoloured or cleared the terminal, a NUL went out as a raw byte.
    one_line = ' '.join((redacted(str(message)) if redact else str(message)).split())
    text = shortened(visible(one_line), MAX_ERROR_CHARS)
    # Said where it can be: a standard error that cannot be written (a full disk, a terminal closed) raised out of the
    # error boundary, so every failure exited 1 and a usage error's 2 was lost (qa124).
    with suppress(OSError):
        err_console.print(f'[bold red]error:[/] {escape(text)}', highlight=False, soft_wrap=True)


def shortened(text: str, limit: int) -> str:
    """`text`, or its start and end with a marker of how much is left out between them when it is over `limit`: a
    value pasted whole (100 KB) is quoted in part, and the line's end, which says what to do, stays."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 2 // 3], text[-(limit // 3) :]
    return f'{head}[... {len(text) - limit:,} characters not shown ...]{tail}'


def redacted(text: str) -> str:
    """`text` with its secrets replaced (the ledger's redaction, imported when an error is shown, not for `--help`)."""
    from agentrt.services.ledger.redaction import redact_text

    return redact_text(text)[0]


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print `error: message` (the command's own, about its arguments: not redacted) on stderr and exit with `code`."""
    error_line(message, redact=False)
    raise typer.Exit(code)


async def operator_session(operation: Callable[[AsyncSession], Awaitable[T]], *, read_only: bool = False) -> T:
    """Start the database, run `operation` in one operator session (`Unscoped.ADMIN`: every account), close the
    database; `read_only` for commands that only look. Run it with `run(operator_session, ...)`."""
    from agentrt.db.engine import close_database, init_database
    from agentrt.db.session import Unscoped, get_db_session, get_read_only_session

    await init_database()
    try:
        opened = get_read_only_session if read_only else get_db_session
        async with opened(account=Unscoped.ADMIN) as session:
            return await operation(session)
    finally:
        await close_database()


_work_done: tuple[str, int] | None = None


def work_done(note: str, code: int = 0) -> None:
    """The command's work is done and saved (`agentrt chat`'s turn): a stop signal from now on cuts only its clean-up
    (background work, the pool's close, the event loop's end), so `report` prints `note` instead of "nothing in
    progress was saved" and the command ends with `code` (its work's), not 128 + the signal.

    Args:
        note: the line that says what was saved and what the stop cut.
        code: the exit code the work ended with (0, or a piped chat's last failure's).
    """
    global _work_done
    _work_done = (note, code)


def run(coro_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
    """Run a command's coroutine to completion; SIGTERM and SIGHUP stop it as Ctrl-C does.

    Tracing is set up first, as the environment asks (`configure_observability()`; `--trace` sets
    `LOGFIRE_CONSOLE`). A signal cancels the coroutine, so its `finally` blocks run (a chat turn's ledger row
    recorded, the ledger flushed or spooled, the pool closed) before the process exits, and the embedded server is
    stopped by the last process using it. Errors go to the CLI's error boundary (`AgentrtGroup`).
    """
    import asyncio  # here: `agentrt --help` and `--version` do without it

    global _work_done
    _work_done = None  # a command of its own (the in-process test runner runs several in one process)

    # The log filter's own module first, in the main thread: OpenTelemetry's SDK logs from a thread of its own while it
    # is being imported (pydantic-ai imports it), and the filter importing this then, while the main thread held the
    # import lock of a module it needs, hung the command for good.
    import agentrt.services.log_redaction  # noqa: F401
    from agentrt.agents.observability import configure_observability

    if not _long_running:
        # An OTLP collector down or not answering: each export is retried for OTEL_EXPORTER_OTLP_TIMEOUT (10 s by
        # default), and a command's end waits for the spans' and the metrics' last exports (13-17 s after `db status`).
        # A command that ends soon bounds each at a few seconds unless the variable says otherwise.
        os.environ.setdefault('OTEL_EXPORTER_OTLP_TIMEOUT', SHORT_EXPORT_TIMEOUT)
    configure_observability()
    try:
        with signals_to_asyncio():
            return asyncio.run(_stoppable(coro_fn(*args, **kwargs)))
    except KeyboardInterrupt:
        # asyncio.run's answer to Ctrl-C, once the cancelled command has cleaned up. typer would turn it into a
        # silent exit 130 before the error boundary saw it: said as SIGTERM's is.
        raise Stopped(signal.SIGINT) from None


SHORT_EXPORT_TIMEOUT = '2'
"""Seconds an OTLP export may take in a command that ends soon (not `serve`, `worker`): `OTEL_EXPORTER_OTLP_TIMEOUT`."""

_long_running = False


def long_running() -> None:
    """Mark this process as one that runs until stopped (`serve`, `worker`): OTLP exports keep the SDK's timeout."""
    global _long_running
    _long_running = True


async def _stoppable(coro: Coroutine[Any, Any, T]) -> T:
    import asyncio

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def stop(signum: int) -> None:
        if _stop_callbacks:  # the command stops itself (`stop_requests`)
            _stop_callbacks[-1](signum)
        elif not received and task is not None:  # a second signal must not cut the clean shutdown short
            received.append(signum)
            task.cancel()

    # Signal handlers can only be set in the main thread (the in-process test runner uses another one).
    watched = [signal.SIGTERM, signal.SIGHUP] if _in_main_thread() else []
    for sig in watched:
        loop.add_signal_handler(sig, stop, int(sig))
    try:
        return await coro
    except asyncio.CancelledError:
        if received:
            raise Stopped(received[0]) from None
        raise
    finally:
        for sig in watched:
            loop.remove_signal_handler(sig)


_stop_callbacks: list[Callable[[int], None]] = []


@contextmanager
def stop_requests(callback: Callable[[int], None]) -> Iterator[None]:
    """While inside, each SIGTERM, SIGHUP and SIGINT (Ctrl-C) calls `callback(signum)` instead of stopping the
    command (`run` cancels it, once): for a command that stops itself when asked, and sooner when asked again
    (`agentrt worker`). Use it inside `run`'s coroutine; only the main thread gets signals (the in-process test runner
    runs commands in another: nothing is routed there)."""
    import asyncio

    if not _in_main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    sigint = signal.getsignal(signal.SIGINT)  # asyncio.run's, which cancels the command (then raises at the second)
    _stop_callbacks.append(callback)
    loop.add_signal_handler(signal.SIGINT, callback, int(signal.SIGINT))
    try:
        yield
    finally:
        _stop_callbacks.remove(callback)
        loop.remove_signal_handler(signal.SIGINT)
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def report(exc: BaseException) -> int:
    """Print one `error:` line for `exc` (a traceback before it with `--debug`) and return the exit code."""
    if debug_enabled() and not isinstance(exc, KeyboardInterrupt | Stopped):
        from agentrt.agents.cli.transcript import visible

        # Its control characters written out (a provider's error text is the provider's: `ESC]0;...` retitled the
        # terminal of whoever turned `--debug` on to see why it failed); the traceback's own lines kept.
        print(visible(redacted(''.join(traceback.format_exception(exc)))), end='', file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt | Stopped) and _work_done is not None:
        note, work_code = _work_done
        with suppress(OSError):  # a stderr that cannot be written, as `error_line`
            err_console.print(note, highlight=False, markup=False, soft_wrap=True)
        return work_code
    if isinstance(exc, KeyboardInterrupt):
        error_line('interrupted; nothing in progress was saved', redact=False)
        return EXIT_SIGNAL_BASE + signal.SIGINT
    if isinstance(exc, Stopped):
        error_line(exc.message, redact=False)
        return exc.exit_code
    if terminal_went_away(exc):
        # Written to a terminal that was closed (the SIGHUP that comes with it may not have been handled yet): the
        # stop the SIGHUP makes (exit 129), not an "internal error" (exit 70). Said where it can still be read.
        hung_up = Stopped(signal.SIGHUP)
        error_line(hung_up.message, redact=False)
        return hung_up.exit_code
    if type(exc).__name__ == 'LogfireConfigError':
        # Raised by logfire's import (pydantic-ai's, and pydantic's plugin loading, import it), which fails again in
        # any import of the runtime, the redaction's included: its own words about a variable's value, as they are.
        # The sampling ratio, which logfire reads from OTEL_TRACES_SAMPLER_ARG too, is named by its variable (a script
        # of `scripts/` runs no `agentrt` callback that checks it first).
        from agentrt.agents.otlp_settings import check_sample_rate

        try:
            check_sample_rate(os.environ)
        except ConfigError as refused:
            error_line(str(refused), redact=False)
            return EXIT_USAGE
        error_line(f'invalid configuration: logfire refused a LOGFIRE_* variable: {exc}', redact=False)
        return EXIT_USAGE
    if (code := exit_code_of(exc)) is not None:
        error_line(str(exc) or type(exc).__name__)
        return code
    from agentrt.db.failures import invalid_value

    if (invalid := invalid_value(exc)) is not None:
        error_line(f'a value given is not valid for the database: {invalid}')
        return EXIT_USAGE
    detail = ' '.join(redacted(str(exc)[:2000]).split())[:300]
    hint = '' if debug_enabled() else '; run with --debug (or AGENTRT_DEBUG=1) for the traceback, and report it'
    error_line(f'internal error: {type(exc).__name__}: {detail}{hint}')
    return EXIT_INTERNAL


def exit_code_of(exc: BaseException) -> int | None:
    """The documented exit code of an error of the runtime (`EXIT_CODES`), or of a stop by a signal (128 + its
    number), None for anything else."""
    if isinstance(exc, Stopped):
        return EXIT_SIGNAL_BASE + exc.signum
    try:
        codes = exit_codes()
    except Exception:  # the services did not import: the failure being reported, again; the base classes decide
        codes = EXIT_CODES
    return next((code for cls, code in codes if isinstance(exc, cls)), None)


def print_json(payload: Any) -> None:
    """Print `payload` as indented JSON; decimals (exact, in plain notation) and UUIDs as strings, times in ISO 8601."""
    typer.echo(json.dumps(payload, default=_json_default, indent=2))


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return plain_decimal(value)  # a string keeps the exact decimal; plain, never `1E-9`
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f'not JSON serialisable: {type(value).__name__}')
