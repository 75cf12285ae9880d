"""Secrets out of the runtime's log lines: each `agentrt` logger redacts its records' messages and tracebacks.

A provider's error (its message, its body in the exception's text) or a driver's (a statement's parameters) can
reach a log line as an argument or in the traceback of a chained exception (`ModelProviderError` keeps pydantic-ai's
error as its `__cause__`). `RedactingFilter`, on every logger of `LOGGERS`, passes the formatted message and the
formatted traceback through `redacted_log_text` (the ledger's redaction, percent-encoded secrets too, bounded) before
any handler sees the record: the traceback becomes the record's `exc_text` (which `logging.Formatter` prints) and
`exc_info` is cleared, so no handler formats the raw exception again. `exc_line` keeps the exception's own line
(`Type: message`, redacted) for one-line displays.

Loggers of other libraries are left alone; the CLI's handler applies `redact_record` to every record it prints, and
`agentrt serve` puts `RedactingFilter` on uvicorn's error handler and `ArgumentRedactingFilter` on its access handler
(whose formatter reads the record's arguments: the request's path and query).
"""

from __future__ import annotations

import logging
import re
import traceback

from agentrt.services.ledger.redaction import REDACTED, find_secrets, redact_cut, redact_text

# Every logger the runtime logs to (tests/agents/test_error_redaction.py checks the sources name no other).
LOGGERS = (
    'agentrt',
    'agentrt.api',
    'agentrt.background',
    'agentrt.budgets',
    'agentrt.conversations',
    'agentrt.db',
    'agentrt.jobs',
    'agentrt.ledger',
    'agentrt.usage',
    'agentrt.warnings',  # a library's warning text (`warnings_log`) may quote what it was given
)
# The most of a message or traceback redacted (and kept): bounded work whatever an error's text holds.
MAX_LOGGED_CHARS = 64_000


def redact_record(record: logging.LogRecord) -> None:
    """Redact `record` in place: its message (arguments merged in), its traceback and its stack, each written so that
    any handler can encode it (`logged_text`). Idempotent."""
    try:
        message = record.getMessage()
    except Exception:  # arguments that do not fit the format: logging reports that itself, leave it be
        return
    redacted = logged_text(message)
    if redacted is not message:
        record.msg, record.args = redacted, None
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        record.exc_text = logged_text(''.join(traceback.format_exception(error)).rstrip('\n'))
        record.__dict__['exc_line'] = logged_text(f'{type(error).__name__}: {" ".join(str(error).split())}')
        record.__dict__['exc_class'] = type(error)  # for a handler that tells kinds of failure apart (the CLI's)
        record.exc_info = None
    elif record.exc_text:
        record.exc_text = logged_text(record.exc_text)
    if record.stack_info:
        record.stack_info = logged_text(record.stack_info)


def logged_text(text: str) -> str:
    """`redacted_log_text(text)`, a lone surrogate in it written out as its escape (`\\udcff`).

    A lone surrogate (a client's `\\udcff` in an error's text, a provider's JSON `"\\ud800"`) cannot be written as
    UTF-8: a handler writing a UTF-8 file raised on it, and logging printed "--- Logging error ---" instead of the line.
    """
    redacted = redacted_log_text(text)
    try:
        redacted.encode('utf-8')
    except UnicodeEncodeError:
        return redacted.encode('utf-8', 'backslashreplace').decode('utf-8')
    return redacted


def redacted_log_text(text: str) -> str:
    """`text` as a log line may carry it: redacted (percent-encoded secrets too: a line may quote a URL, as uvicorn's
    access log and its trace of each request's scope do), then cut to `MAX_LOGGED_CHARS` (no secret left half shown).
    """
    return redact_cut(text, MAX_LOGGED_CHARS, marker=' [cut]', redactor=redact_url_text)


_PERCENT_ESCAPE = re.compile(r'%([0-9A-Fa-f]{2})')


def redact_url_text(text: str) -> tuple[str, int]:
    """`text` (a URL, or its path or query, as written) with its secrets replaced, percent-encoded ones included.

    A percent-escape before a secret (`%20`, `%3A`: a client's encoded space or colon) joins it to the word before
    it, which hid it from every rule: the access log and a request's span showed `?q=key%20sk-proj-...` whole. So the
    text is read a second time with each escape decoded to one character (each decoded character then maps back to its
    place), and a secret found there is replaced where it is written; the rest keeps its escapes.

    Returns:
        The redacted text and how many secrets were replaced.
    """
    redacted, found = redact_text(text)
    if _PERCENT_ESCAPE.search(redacted) is None:
        return redacted, found
    decoded: list[str] = []
    starts: list[int] = []  # where each decoded character is written in `redacted`
    at = 0
    for escape in _PERCENT_ESCAPE.finditer(redacted):
        decoded.append(redacted[at : escape.start()])
        starts.extend(range(at, escape.start()))
        # One byte, one character: UTF-8 is not decoded (the secrets the rules know are ASCII).
        decoded.append(chr(int(escape.group(1), 16)))
        starts.append(escape.start())
        at = escape.end()
    decoded.append(redacted[at:])
    starts.extend(range(at, len(redacted) + 1))  # and the end
    spans = find_secrets(''.join(decoded))
    if not spans:
        return redacted, found
    pieces, last = [], 0
    for span in spans:
        pieces += [redacted[last : starts[span.start]], REDACTED]
        last = starts[span.end]
    pieces.append(redacted[last:])
    return ''.join(pieces), found + len(spans)


def loggable(text: str) -> str:
    """`text` safe to put in one log line: each character that is not printable (a control character such as ESC or
    a newline, a format character such as U+202E, a separator other than the space) written as its escape (`\\x1b`).

    A request's path is decoded from its percent-escapes, so a client chooses every character of it: unescaped,
    `/%1b[2J` cleared the terminal of whoever read the log and `/%0a...` forged a line of its own. Secrets are
    redacted first: escaped, a secret on a line of its own (`\\nsk-...`) would no longer read as one to the log filter.
    """
    if text.isprintable():
        return text
    return ''.join(char if char.isprintable() else ascii(char)[1:-1] for char in redact_text(text)[0])


class RedactingFilter(logging.Filter):
    """A logger filter that redacts every record (it never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact `record`; keep it."""
        redact_record(record)
        return True


class ArgumentRedactingFilter(logging.Filter):
    """A filter that redacts each string argument of a record in place, and writes its control and format characters
    out (`loggable`), keeping the arguments' shape: for a
    formatter that reads `record.args` itself (uvicorn's access log: client, method, path with query, version,
    status), where `RedactingFilter`, merging the arguments into the message, would break it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact `record`'s string arguments; keep it."""
        if isinstance(record.args, tuple):
            # Escaped too: the client's address is `X-Forwarded-For` as sent when uvicorn trusts the proxy (127.0.0.1,
            # its default), so a local client forged request text in the line, and put C1 controls in it (qa140).
            record.args = tuple(loggable(logged_text(arg)) if isinstance(arg, str) else arg for arg in record.args)
        return True


_FILTER = RedactingFilter()


def install_log_redaction() -> None:
    """Put the redacting filter on every logger of `LOGGERS` (once; calling again changes nothing)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
