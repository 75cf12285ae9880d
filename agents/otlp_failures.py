"""The cause of an OTLP export given up on, in the line that says so.

OpenTelemetry's HTTP client (`_OTLPHTTPClient`, OpenTelemetry 1.45) says an export it gives up on with "Failed to
export spans batch due to timeout, max retries or shutdown." and nothing more: the last attempt's error (a refused
connection, a timeout, an HTTP status) is in the result it returns, which no one logs. A stop gives each export one
attempt (`agentrt.agents.otlp_stop`), so with the collector down a command's only line about it named no cause, even
with `--verbose` ("connection refused" appeared nowhere, QA). `name_export_failures()` holds that line back until the
export returns and says it then with the endpoint and the cause.

Like `otlp_stop`, it reaches into the client (its `export` and `_logger`): a version that changed them keeps its own
line (`tests/agents/test_otlp_failures.py` fails then).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

GAVE_UP = 'Failed to export %s batch due to timeout, max retries or shutdown.'
"""The client's words for an export it gave up on (`_OTLPHTTPClient.export`), held back to be said with the cause."""
_MOST_CAUSES = 20
"""How many exceptions of an error's chain are looked through for its cause (a few: requests wraps urllib3's)."""
_SHOWN_CHARS = 300
"""The longest cause shown as the exception's own words (a cause without an OS error, such as an SSL failure)."""


def name_export_failures(clients: Iterable[Any] | None = None) -> None:
    """Make each OTLP client say why it gave up on an export: its endpoint and the last attempt's error.

    Args:
        clients: the OTLP HTTP clients; those of the global providers' exporters (`otlp_clients()`) when omitted.
    """
    if clients is None:
        from agentrt.agents.otlp_stop import otlp_clients

        clients = otlp_clients()
    for client in clients:
        if not isinstance(getattr(client, '_logger', None), _HeldGiveUp) and callable(getattr(client, 'export', None)):
            _name_failures(client)


class _HeldGiveUp:
    """A client's logger whose give-up line is held back (per thread: exports may run in several) for the export that
    logged it to say with the cause; everything else is passed on."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.held = threading.local()

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        if msg == GAVE_UP and getattr(self.held, 'export', False):
            self.held.gave_up = True
            return
        self.logger.error(msg, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.logger, name)


def _name_failures(client: Any) -> None:
    """Wrap `client`'s export: the give-up line its logger holds back is said as the export returns its result."""
    export = client.export
    logger = _HeldGiveUp(client._logger)

    def export_naming_the_cause(data: bytes) -> Any:
        logger.held.export, logger.held.gave_up = True, False
        try:
            result = export(data)
        finally:
            logger.held.export = False
        if logger.held.gave_up:
            logger.logger.error(
                'Failed to export %s batch to %s due to timeout, max retries or shutdown; the last attempt: %s',
                client._kind,
                shown_endpoint(str(client._endpoint)),
                failure_cause(
                    getattr(result, 'status_code', None),
                    getattr(result, 'reason', None),
                    getattr(result, 'error', None),
                ),
            )
        return result

    client._logger = logger
    client.export = export_naming_the_cause


def failure_cause(status_code: int | None, reason: str | None, error: BaseException | None) -> str:
    """An export attempt's failure in a few words: the HTTP status the collector answered, else the OS's words for the
    connection's failure (`Connection refused`, `Name or service not known`), else a timeout, else the error's own.
    """
    if status_code is not None:
        return f'HTTP {status_code} {reason or ""}'.strip()
    if error is None:
        return 'no answer (unknown error)'
    chain = _chain(error)
    for cause in chain:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    if any(isinstance(cause, TimeoutError) or 'Timeout' in type(cause).__name__ for cause in chain):
        return 'no answer in time (timed out)'
    text = ' '.join(str(error).split()) or type(error).__name__
    return text if len(text) <= _SHOWN_CHARS else f'{text[:_SHOWN_CHARS]}...'


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and what it wraps, the outermost first: causes, contexts, urllib3's `reason`, exceptions in `args`."""
    found: list[BaseException] = []
    todo: list[Any] = [error]
    while todo and len(found) < _MOST_CAUSES:
        item = todo.pop(0)
        if not isinstance(item, BaseException) or any(item is seen for seen in found):
            continue
        found.append(item)
        todo.extend([item.__cause__, item.__context__, getattr(item, 'reason', None), *item.args])
    return found


def shown_endpoint(endpoint: str) -> str:
    """`endpoint` as it may be shown: a password in it masked (`***`, as in `DATABASE_URL`), other secrets redacted."""
    from urllib.parse import urlsplit, urlunsplit

    from agentrt.services.ledger.redaction import redact_text

    try:
        parts = urlsplit(endpoint)
        if parts.password is not None:
            host = parts.netloc.rpartition('@')[2]
            parts = parts._replace(netloc=f'{parts.username or ""}:***@{host}')
        endpoint = urlunsplit(parts)
    except ValueError:  # not a URL the SDK could use either: shown redacted as text
        pass
    return redact_text(endpoint)[0]
