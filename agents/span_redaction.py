"""Secrets out of the URL of an HTTP request's span: a key a client put in a query (`?api_key=art_...`), a provider's
key sent as a conversation id in a path.

FastAPI's request spans carry the request's path and query as they came (`url.path`, `url.query`, and the span's
message, which logfire makes of them), and logfire's scrubbing leaves URL attributes alone by design, so such a key
reached every trace backend while the access log showed it redacted. `UrlRedaction` redacts them, with the ledger's
rules (`redact_url_text`: percent-encoded secrets too), as each span starts: before any processor exports it, its
start (logfire's pending spans) included, and before its message is made of them at its end.

`LogRedaction` does the same for the log records exported over OTLP: FastAPI's telemetry records each exception a
request's handler did not map (an answer 500) as a log record with the exception's message and whole traceback (a
provider's error chained under it, a driver's statement parameters), which the server's own log line shows redacted.
"""

from __future__ import annotations

from opentelemetry.context import Context
from opentelemetry.sdk._logs import LogRecordProcessor, ReadWriteLogRecord
from opentelemetry.sdk.trace import Span, SpanProcessor

URL_ATTRIBUTES = ('url.path', 'url.query', 'url.full', 'http.target', 'http.url')
"""Where OpenTelemetry's HTTP conventions, old and stable, put a request's URL or part of it."""


class UrlRedaction(SpanProcessor):
    """Redacts the URL attributes of each span as it starts.

    `configure_observability()` installs it first among logfire's processors (`additional_span_processors`); a
    program that configures logfire itself passes `additional_span_processors=[UrlRedaction()]` to `logfire.configure`.
    """

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Replace the secrets of the span's URL attributes with `[REDACTED]`."""
        from agentrt.services.log_redaction import redact_url_text

        attributes = span.attributes
        if not attributes:
            return
        for key in URL_ATTRIBUTES:
            value = attributes.get(key)
            if isinstance(value, str) and value:
                redacted, found = redact_url_text(value)
                if found:
                    span.set_attribute(key, redacted)


class LogRedaction(LogRecordProcessor):
    """Redacts the body and the string attributes (an exception's message and traceback) of each log record.

    `configure_observability()` installs it first among logfire's log record processors (`AdvancedOptions`), so no
    exporter sees a record before it; a program that configures logfire itself passes
    `advanced=logfire.AdvancedOptions(log_record_processors=[LogRedaction()])`.
    """

    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        """Replace the secrets of the record's text with `[REDACTED]`, as the runtime's log lines have them (and a lone
        surrogate with U+FFFD: `exported_text`)."""
        from agentrt.services.span_errors import exported_text

        record = log_record.log_record
        if isinstance(record.body, str):
            record.body = exported_text(record.body)
        attributes = record.attributes
        if not attributes:
            return
        for key, value in list(attributes.items()):
            if isinstance(value, str):
                redacted = exported_text(value)
                if redacted != value:
                    attributes[key] = redacted  # type: ignore[index]  # the SDK's record: mutable attributes

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered here."""
        return True
