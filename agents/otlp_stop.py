"""The OTLP exports of a process that stops: one attempt each, all within a few seconds, whatever the collector does.

While a process runs, an export its collector refuses or does not answer is retried until `OTEL_EXPORTER_OTLP_TIMEOUT`
(10 s by default, 2 s in a command) runs out. A stop made its last exports one after another (the spans flushed by
`shutdown_runtime()`, then the log records and the metrics at the process's exit), each retried for that long:
`agentrt serve` took 14 s to stop after SIGTERM with the collector down and 21 s with one that never answers, a chat
command 3 s more than without tracing. `stopping_exports()` gives each export still to make one attempt of at most
`STOP_EXPORT_SECONDS`, and ends the wait of an export retrying at that moment.

Neither OpenTelemetry's providers nor logfire hand out their exporters, and the SDK's batch processors ignore the
timeouts of their `force_flush` and `shutdown`, so the exporters are found by walking the providers' objects and their
HTTP client's timeout and shutdown event are set (`_OTLPHTTPClient`, OpenTelemetry 1.45): a version that changed those
leaves the exports as they were (`tests/api/test_serve.py`, `test_a_stop_with_the_collector_down_or_not_answering_...`,
fails then).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_EXPORT_SECONDS = 2.0
"""The time a stop gives each export still to make (the spans' flush, then the exit's log records and metrics): a
collector that answers at all answers within it (what a command gives each of its exports, `SHORT_EXPORT_TIMEOUT`)."""
_MOST_OBJECTS = 20_000
"""The walk's bound: the providers' objects are a few hundred; the queues of spans and records are not walked."""


def otlp_clients() -> list[Any]:
    """The HTTP clients of the OTLP exporters behind the global tracer, meter and logger providers (logfire's)."""
    from opentelemetry import _logs, metrics, trace
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporters = (OTLPSpanExporter, OTLPMetricExporter, OTLPLogExporter)
    roots = [trace.get_tracer_provider(), metrics.get_meter_provider(), _logs.get_logger_provider()]
    seen: set[int] = set()
    todo: list[Any] = list(roots)
    clients: list[Any] = []
    while todo and len(seen) < _MOST_OBJECTS:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, exporters):
            client = getattr(item, '_client', None)
            if isinstance(getattr(client, '_timeout', None), float | int) and isinstance(
                getattr(client, '_shutdown_event', None), threading.Event
            ):
                clients.append(client)
            continue
        if isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            todo.extend(item)
        elif type(item).__module__.startswith(('opentelemetry.', 'logfire.')):
            todo.extend(getattr(item, '__dict__', {}).values())
    return clients


@contextmanager
def stopping_exports(seconds: float = STOP_EXPORT_SECONDS, *, restore: bool = True) -> Iterator[None]:
    """Within the block, each OTLP export gets one attempt, of at most `seconds`.

    An export retrying at that moment stops waiting for its next attempt (one waiting for an answer keeps its own
    timeout). After the block, the exporters are as they were, unless `restore=False` (the process's exit).

    Args:
        seconds: the time each export gets (less when `OTEL_EXPORTER_OTLP_TIMEOUT` says less).
        restore: give the exporters back their timeout and retries after the block.
    """
    bounded = _bound(seconds)
    try:
        yield
    finally:
        if restore:
            for client, timeout in bounded:
                client._timeout = timeout
                client._shutdown_event.clear()


def bound_exports_at_exit() -> None:
    """An `atexit` hook, registered after the providers' own: their shutdowns' last exports are bounded as a stop's."""
    _bound(STOP_EXPORT_SECONDS)


def _bound(seconds: float) -> list[tuple[Any, float]]:
    """Give each OTLP client not bounded yet one attempt of at most `seconds`; the bounded ones and their timeouts."""
    bounded = []
    for client in otlp_clients():
        if client._shutdown_event.is_set():  # shut down already (or bounded by an enclosing stop)
            continue
        bounded.append((client, client._timeout))
        client._timeout = min(client._timeout, seconds)  # read by each export as it starts
        client._shutdown_event.set()  # one attempt: the client gives up instead of waiting to retry
    return bounded
