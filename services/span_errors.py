"""Exceptions recorded on spans as OpenTelemetry records them (an `exception` event, an error status), redacted.

OpenTelemetry's own recording (`record_exception`, `start_as_current_span`'s default) writes the exception's message
and whole traceback as they are, a provider's or driver's raw text chained under the error included, for every trace
backend to keep. `record_redacted` writes the same through the log lines' redaction (`redacted_log_text`); spans the
runtime makes pass `record_exception=False, set_status_on_exception=False` and record through it (`recording_errors`).

The text is also made encodable (`exported_text`): a lone surrogate (a provider's JSON error with a `"\ud800"`
escape) in a span's status failed the OTLP exporter's encoding of the whole batch it was in, every span of up to 512
lost with it; in an attribute, that attribute was dropped with a traceback in the log.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from agentrt.services.log_redaction import redacted_log_text
from agentrt.services.pg_text import storable_text


def exported_text(text: str) -> str:
    """`text` as an exported span or log record may carry it: redacted, and without a lone surrogate or NUL (U+FFFD
    in their place), which OTLP's protobuf strings cannot encode (UTF-8) or a backend may cut the text at."""
    return storable_text(redacted_log_text(text))


def record_redacted(span: trace.Span, error: BaseException) -> None:
    """What `Span.record_exception` and the error status record of `error`, through the log lines' redaction."""
    message = exported_text(str(error))
    kind = type(error)
    span.add_event(
        'exception',
        {
            'exception.type': kind.__qualname__
            if kind.__module__ == 'builtins'
            else f'{kind.__module__}.{kind.__qualname__}',
            'exception.message': message,
            'exception.stacktrace': exported_text(''.join(traceback.format_exception(error))),
            'exception.escaped': 'False',
        },
    )
    span.set_status(trace.Status(trace.StatusCode.ERROR, f'{kind.__name__}: {message}'))


@contextmanager
def recording_errors(span: trace.Span) -> Iterator[None]:
    """Record an exception leaving the block on `span`, redacted (`record_redacted`); a cancellation is no error."""
    try:
        yield
    except Exception as exc:
        if span.is_recording():
            record_redacted(span, exc)
        raise


def redacted_error_span(
    tracer: trace.Tracer, name: str, attributes: Mapping[str, AttributeValue]
) -> AbstractContextManager[trace.Span]:
    """A span of `tracer`, current for the block, whose failure is recorded redacted (`recording_errors`) instead of by
    OpenTelemetry, which writes a driver's raw error (the row values it quotes included) and its whole traceback.

    The span is asked for at once, so a tracer that fails to make one raises here, before the block (a background
    task then runs without a span).
    """
    return _recorded(
        tracer.start_as_current_span(name, attributes=attributes, record_exception=False, set_status_on_exception=False)
    )


@contextmanager
def _recorded(started: AbstractContextManager[trace.Span]) -> Iterator[trace.Span]:
    with started as span, recording_errors(span):
        yield span
