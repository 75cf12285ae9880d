"""The `agentrt` command line: one module per command, each imported only when its command runs.

To add a command: write its module (a command function, or a `typer.Typer()` of subcommands) and add one line to
`COMMANDS` below, with the help line `agentrt --help` shows. Keep the module's top-level imports light (typer, the
CLI's `support` and `filters`): import the runtime (database, agents, services) inside the functions that run, so
`agentrt COMMAND --help` stays fast too (`scripts/bench_cli_startup.py` measures it). Errors of every command,
an import error included, end in the error boundary of `AgentrtGroup` (`group.py`).
"""

from __future__ import annotations

import atexit
import io
import os
import signal
import sys
import threading
from types import FrameType

import typer

from agentrt import __version__
from agentrt.agents.cli.group import AgentrtGroup, LazyCommand
from agentrt.agents.cli.logs import setup_logging
from agentrt.agents.cli.support import EXIT_SIGNAL_BASE, check_debug_flag, set_debug
from agentrt.agents.cli_entry import stop_signals_raise
from agentrt.agents.otlp_settings import check_sample_rate

COMMANDS = (
    LazyCommand('db', 'agentrt.agents.cli.database:db_app', 'The database: status, upgrade, seed the demo data.'),
    LazyCommand('chat', 'agentrt.agents.cli.chat:chat', 'Chat with an agent; the answer streams as it is produced.'),
    LazyCommand('audit', 'agentrt.agents.cli.audit:audit_app', 'The audit trail: every model request, in full.'),
    LazyCommand('costs', 'agentrt.agents.cli.costs:costs', 'Requests, tokens and cost per account, agent, model, day.'),
    LazyCommand(
        'ledger', 'agentrt.agents.cli.ledger:ledger_app', 'The ledger: replay rows spooled while the database was down.'
    ),
    LazyCommand(
        'budget',
        'agentrt.agents.cli.budget:budget_app',
        'Spend limits per account: set, show, remove; sweep stale holds.',
    ),
    LazyCommand('keys', 'agentrt.agents.cli.keys:keys_app', 'API keys of the HTTP API: create, list, revoke.'),
    LazyCommand('serve', 'agentrt.agents.cli.serve:serve', 'Serve the HTTP API (needs the http extra).'),
    LazyCommand(
        'worker', 'agentrt.agents.cli.worker:worker', 'Run the queued background jobs (AGENTRT_BACKGROUND=queue).'
    ),
)


class _Agentrt(AgentrtGroup):
    lazy_commands = COMMANDS


app = typer.Typer(
    name='agentrt',
    help='Pydantic AI chat agents on PostgreSQL, with a database session per operation.',
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=_Agentrt,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f'agentrt {__version__}')
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, '--verbose', '-v', help='Show debug logs.'),
    debug: bool = typer.Option(False, '--debug', help='Show the traceback of an error (also AGENTRT_DEBUG=1).'),
    trace: bool = typer.Option(
        False, '--trace', help='Print the spans of what runs on stderr (as LOGFIRE_CONSOLE=true; see README).'
    ),
    version: bool = typer.Option(
        False, '--version', is_eager=True, callback=_print_version, help='Print the version and exit.'
    ),
) -> None:
    set_debug(debug)
    check_debug_flag()
    # Before any command imports logfire (pydantic-ai, FastAPI's app do), which reads it: `agentrt serve` said
    # "logfire refused a LOGFIRE_* variable" for OTEL_TRACES_SAMPLER_ARG=abc (qa191).
    check_sample_rate(os.environ)
    setup_logging(verbose)
    if trace:
        set_trace()


def set_trace() -> None:
    """`--trace`: spans on stderr, in this process and the ones it starts (`agentrt serve --workers`)."""
    os.environ['LOGFIRE_CONSOLE'] = 'true'


def main() -> None:
    """The command line, once imported (`agentrt.agents.cli_entry.main`, the console script's entry point, and
    `python -m agentrt.agents.cli`)."""
    stop_signals_raise()  # already in place from the console script; `python -m agentrt.agents.cli` from here on
    atexit.register(_interrupts_ignored_to_the_end)  # registered first: runs last
    # logfire registers itself as a pydantic plugin, so pydantic imported it (and OpenTelemetry's SDK) at the first
    # model class of any command, tracing on or off: about 0.2 s of each start, and the SDK's resource detection
    # warned from a thread during that import (a malformed OTEL_RESOURCE_ATTRIBUTES) into the CLI's log filter, whose
    # own import then waited for the import lock the main thread held: the command never ended. The plugin records
    # pydantic validations only for `logfire.instrument_pydantic()`, which the runtime never calls.
    os.environ.setdefault('PYDANTIC_DISABLE_PLUGINS', 'logfire-plugin')
    # Text from outside (a provider's answer, a tool's result) can hold what UTF-8 cannot encode (a lone surrogate):
    # printed as a replacement, never an error that ends the command (`chat` shows the store's U+FFFD itself).
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors='replace')
    try:
        app()
    finally:
        _exit_unstoppable()


def _exit_unstoppable() -> None:
    """The command has ended, its clean shutdown included: what is left is the interpreter's exit (`atexit`: the
    embedded server's release, where the last user stops it; the spans' last export). A SIGTERM or SIGHUP then, with the
    command's own handlers gone, killed the process where it stood (129 after a chat that had answered and saved), so
    they are ignored from here on. A Ctrl-C interrupted that release with a traceback ("Exception ignored in atexit
    callback"), the server left running without a user: the exit goes on, said in one line, and a second Ctrl-C
    ends a stuck one at once (`_exit_interrupted`)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGINT, _exit_interrupted)


def _interrupts_ignored_to_the_end() -> None:
    """The last of the exit's callbacks (its embedded server stopped): Ctrl-C is ignored for what is left. The
    interpreter's finalisation puts a Python handler back to the default, which kills the process (status -2, no word
    said, in the 0.3 s it took); one ignored it leaves alone."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


_interrupted_exit = False


def _exit_interrupted(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C during the interpreter's exit, after the command ended: the first lets the exit finish (the embedded
    server's stop takes a fraction of a second; a span export at most OTEL_EXPORTER_OTLP_TIMEOUT), the second ends
    the process at once, with exit code 130 and what may be left behind."""
    global _interrupted_exit
    if _interrupted_exit:
        # An embedded server left running is adopted by the next agentrt process on its data directory, which stops it.
        os.write(2, b'error: interrupted while exiting: its clean-up was cut short\n')
        os._exit(EXIT_SIGNAL_BASE + signal.SIGINT)
    _interrupted_exit = True
    os.write(2, b'interrupted: the command has ended; finishing its exit (Ctrl-C again to quit at once)\n')
