"""One model request of a run in flight, as the ledger sees it: its state until it is recorded, a streamed request's
cut (`Cut`), and the thin model wrapper that notes a stream and marks its span when the provider fails it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from pydantic_ai._agent_graph import ModelRequestNode
from pydantic_ai.messages import ModelResponse
from pydantic_ai.models import Model, ModelRequestContext, StreamedResponse
from pydantic_ai.models.wrapper import WrapperModel

from agentrt.services.ledger._plausible import SentBounds


@dataclass(slots=True)
class InFlight:
    """One model request of a run, from just before it is sent until it is recorded."""

    id: Any
    started: float
    started_at: Any
    streamed: bool
    trace_id: str | None
    run_step: int | None = None
    """The run's step as the request was sent: a cut stream is recorded when the run ends (`wrap_run`), whose context
    is the run's start's (step 0)."""
    stream: StreamedResponse | None = None
    stream_started: float | None = None
    response: ModelResponse | None = None
    open_error: Exception | None = None
    """What the model raised while opening its stream (before the first chunk): the request failed there, whatever
    the run's own error turns out to be (`_record_cut`)."""
    sent: SentBounds | None = None
    """What the request was sent with (its `max_tokens`...), against which its usage is read (`inconsistent_counts`)."""


@dataclass(slots=True)
class Cut:
    """A streamed request whose task was cancelled: by the stream's own failure or by a real cancellation.

    pydantic-ai reads a stream in the task that consumes it and cancels the request's task (where
    `wrap_model_request` runs) when that consumer stops, whether a provider error inside the stream (or opening
    it) stopped it or the caller did. Which of the two it was is known only when the run ends (`wrap_run` sees
    the run's error), so the row waits for that (or, when the run has ended first, is recorded at once against the
    run's error: `LedgerCapability._cut`). A `ModelAPIError` (pydantic-ai's class for every provider
    failure: HTTP status, dropped connection, undecodable chunk, timeout) makes it an `error`, and so does whatever
    the model raised while opening the stream (`InFlight.open_error`: a custom model's exception, a stream that
    ended before its first chunk); anything else (the consumer's own exception, a cancellation) means the caller
    stopped the stream: `cancelled`.
    """

    request_context: ModelRequestContext
    flight: InFlight
    cancellation: asyncio.CancelledError
    ended: float
    finished_at: Any


PYDANTIC_AI_MARKS_FAILED_STREAMS = hasattr(ModelRequestNode, '_record_model_stream_failure')
"""Whether pydantic-ai marks a failed streamed request's span itself (2.78 does, 2.68 does not): where it does, the
marks below would record the same exception a second time, so they are left to it."""


class StreamProbe(WrapperModel):
    """Passes a streamed request through, noting the `StreamedResponse` and when the request was sent."""

    def __init__(self, wrapped: Model, flight: InFlight) -> None:
        super().__init__(wrapped)
        self._flight = flight

    @asynccontextmanager
    async def request_stream(
        self,
        messages: Any,
        model_settings: Any,
        model_request_parameters: Any,
        run_context: Any = None,
    ) -> AsyncGenerator[StreamedResponse]:
        started = time.perf_counter()
        try:
            async with self.wrapped.request_stream(
                messages, model_settings, model_request_parameters, run_context
            ) as stream:
                self._flight.stream, self._flight.stream_started = stream, started
                mark_read_failures(stream, trace.get_current_span())
                yield stream
        except Exception as exc:
            # Raised before the stream was handed out (the flight has none yet): the model's (a provider's, or
            # pydantic-ai's reading of the first chunk), never the consumer's, which can only fail once it has it.
            if self._flight.stream is None:
                self._flight.open_error = exc
                mark_request_span(exc, trace.get_current_span())
            raise


def mark_read_failures(stream: StreamedResponse, span: trace.Span) -> None:
    """Mark the request's span failed when reading `stream` fails (the provider cut it, it stalled, a chunk was not
    JSON), as when opening it fails.

    pydantic-ai reads a stream in its consumer's task and cancels the request's task when the consumer stops: the
    request's span ended as cancelled, status unset, a stream the provider broke off looking like one that ended well
    (the plain request's span says ERROR). The provider's error is seen here, in the consumer's task, while the span
    is still open; one raised because the consumer cancelled the stream is not the provider's failure.
    """
    if PYDANTIC_AI_MARKS_FAILED_STREAMS:  # no reader wrapped around every event for a mark pydantic-ai makes itself
        return
    read = getattr(stream, '_get_event_iterator', None)  # pydantic-ai's per-provider reader, behind its own wrappers
    if read is None:  # a pydantic-ai that renamed it: the span goes unmarked, the stream is read as it is
        return

    async def events() -> AsyncGenerator[Any]:
        try:
            async for event in read():
                yield event
        except Exception as exc:
            if not stream.cancelled:
                mark_request_span(exc, span)
            raise

    stream._get_event_iterator = events  # type: ignore[method-assign]


def mark_request_span(error: BaseException, span: trace.Span) -> None:
    """Mark the model request's span (`chat <model>`) failed, as pydantic-ai marks a plain request's.

    pydantic-ai leaves a streamed request that failed (the provider refused it, the connection failed, opening or
    reading it) with an unset status and no exception: in a trace it looked like a request that succeeded with an empty
    or short answer. As pydantic-ai does without content (`include_content=False`): the exception's type, no message (a
    provider's error can quote the prompt or a key).
    """
    if PYDANTIC_AI_MARKS_FAILED_STREAMS:  # a stream that failed as it opened: pydantic-ai marks its span itself
        return
    attributes = getattr(span, 'attributes', None) or {}
    if not span.is_recording() or attributes.get('gen_ai.operation.name') != 'chat':
        return  # not a model request's span (pydantic-ai not instrumented): nothing to mark
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == 'builtins' else f'{kind.__module__}.{kind.__qualname__}'
    span.add_event('exception', attributes={'exception.type': name, 'exception.escaped': 'False'})
    span.set_status(trace.Status(trace.StatusCode.ERROR))
