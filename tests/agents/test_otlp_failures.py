"""An OTLP export given up on says where it went and why (`agentrt.agents.otlp_failures`): the SDK's own line said
"due to timeout, max retries or shutdown" and no cause, the only line a command printed with its collector down."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult

from agentrt.agents.otlp_failures import failure_cause, name_export_failures
from tests.agents.otlp_receiver import SilentCollector

SDK_LOGGER = 'opentelemetry.exporter.otlp.proto.http.trace_exporter'


@contextmanager
def _collector(fault: str) -> Iterator[str]:
    """The base URL of a collector that fails each export as `fault` says."""
    if fault == 'refused':
        with socket.socket() as refusing:
            refusing.bind(('127.0.0.1', 0))  # bound, not listening: connections are refused
            yield f'http://user:s3cret@127.0.0.1:{refusing.getsockname()[1]}'
    elif fault == 'silent':
        silent = SilentCollector()
        try:
            yield f'http://127.0.0.1:{silent.port}'
        finally:
            silent.close()
    else:

        class Unavailable(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get('Content-Length') or 0))
                self.send_response(503)
                self.send_header('Content-Length', '0')
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = HTTPServer(('127.0.0.1', 0), Unavailable)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f'http://127.0.0.1:{server.server_address[1]}'
        finally:
            server.shutdown()
            server.server_close()


def _span() -> ReadableSpan:
    tracer = TracerProvider().get_tracer('test')
    with tracer.start_as_current_span('turn') as span:
        pass
    assert isinstance(span, ReadableSpan)
    return span


@pytest.mark.parametrize(
    ('fault', 'cause'),
    [
        ('refused', 'Connection refused'),
        ('silent', 'no answer in time (timed out)'),
        ('503', 'HTTP 503 Service Unavailable'),
    ],
)
def test_an_export_given_up_on_at_a_stop_names_its_endpoint_and_its_cause(
    caplog: pytest.LogCaptureFixture, fault: str, cause: str
) -> None:
    with _collector(fault) as url:
        exporter = OTLPSpanExporter(endpoint=f'{url}/v1/traces', timeout=1.0)
        name_export_failures([exporter._client])
        name_export_failures([exporter._client])  # once only, however often asked
        exporter._client._shutdown_event.set()  # as a stop does (`otlp_stop`): one attempt, no retry
        with caplog.at_level(logging.WARNING, logger=SDK_LOGGER):
            assert exporter.export([_span()]) is SpanExportResult.FAILURE
    shown = url.replace(':s3cret@', ':***@')  # a password in the endpoint masked, as `agentrt db status` shows it
    assert [(record.levelname, record.getMessage()) for record in caplog.records if record.name == SDK_LOGGER] == [
        (
            'ERROR',
            f'Failed to export spans batch to {shown}/v1/traces due to timeout, max retries or shutdown; the last '
            f'attempt: {cause}',
        )
    ]


def test_an_export_failure_without_an_os_error_is_said_in_its_own_words() -> None:
    # An SSL failure (a `https://` endpoint on a plain HTTP port) has no OS words: its own, cut if long.
    assert failure_cause(None, None, ValueError('[SSL: WRONG_VERSION_NUMBER] wrong version number')) == (
        '[SSL: WRONG_VERSION_NUMBER] wrong version number'
    )
    assert failure_cause(None, None, ValueError('x' * 1000)) == 'x' * 300 + '...'
    assert failure_cause(404, 'Not Found', None) == 'HTTP 404 Not Found'
