"""Secrets out of the URL of an HTTP request's span: a key a client put in a query (`?api_key=art_...`), a provider's
key sent as a conversation id in a path.

FastAPI's request spans carry the request's path and query as they came (`url.path`, `url.query`, and the span's
message, which logfire makes of them), and logfire's scrubbing leaves URL attributes alone by design, so such a key
reached every trace backend while the access log showed it redacted. `UrlRedaction` redacts them, with the ledger's
rules (`redact_url_text`: percent-encoded secrets too), as each span starts: before any processor exports it, its
start (logfire's pending spans) included, and before its message is made of them at its end.
"""

from __future__ import annotations

from opentelemetry.context import Context
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
