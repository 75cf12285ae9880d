"""A loopback OpenTelemetry collector for tests: accepts OTLP/HTTP exports (protobuf or JSON), keeps the spans and the
log records."""

from __future__ import annotations

import gzip
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


class OtlpReceiver:
    """`with OtlpReceiver() as receiver:` listens on 127.0.0.1 (`receiver.url`) until the block ends.

    `/v1/traces` and `/v1/logs` bodies are decoded and kept (`spans`, `log_records`); metrics (`/v1/metrics`) are
    accepted and counted by path only.
    """

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.log_requests: list[ExportLogsServiceRequest] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
                if self.headers.get('Content-Encoding') == 'gzip':
                    body = gzip.decompress(body)
                receiver._received(self.path, self.headers.get('Content-Type', ''), body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header('Content-Type', 'application/x-protobuf')
                self.send_header('Content-Length', str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self._server.server_address[1]}'
        self._thread = threading.Thread(target=self._server.serve_forever, name='otlp-receiver', daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _received(self, path: str, content_type: str, body: bytes) -> None:
        with self._lock:
            self.paths.append(path)
            kinds = {
                '/v1/traces': (ExportTraceServiceRequest, self.requests),
                '/v1/logs': (ExportLogsServiceRequest, self.log_requests),
            }
            if path not in kinds:
                return
            kind, kept = kinds[path]
            request = kind()
            if content_type.startswith('application/json'):
                json_format.Parse(body, request)
            else:
                request.ParseFromString(body)
            kept.append(request)  # type: ignore[attr-defined]

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """Every span received, with the attributes of the resource that sent it."""
        with self._lock:
            requests = list(self.requests)
        found = []
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    found.extend((resource, span) for span in scope_spans.spans)
        return found

    def span_names(self) -> set[str]:
        """The names of the spans received."""
        return {span.name for _, span in self.spans()}

    def service_names(self) -> set[str]:
        """The `service.name` of every resource that sent spans."""
        return {resource.get('service.name', '') for resource, _ in self.spans()}

    def trace_ids(self) -> set[str]:
        """The trace ids received, as 32 hex digits."""
        return {span.trace_id.hex() for _, span in self.spans()}

    def log_records(self) -> list[Any]:
        """Every log record received."""
        with self._lock:
            requests = list(self.log_requests)
        return [
            record
            for request in requests
            for resource_logs in request.resource_logs
            for scope_logs in resource_logs.scope_logs
            for record in scope_logs.log_records
        ]


class SilentCollector:
    """Accepts connections, never answers; notes how long each client waited before it gave up (closed)."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self._socket = socket.create_server(('127.0.0.1', 0))
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._hold, args=(connection, time.monotonic()), daemon=True).start()

    def _hold(self, connection: socket.socket, accepted: float) -> None:
        with connection:
            connection.settimeout(30)
            try:
                while connection.recv(65536):
                    pass
            except OSError:
                return
            self.waits.append(time.monotonic() - accepted)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()
