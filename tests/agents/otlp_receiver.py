"""A loopback OpenTelemetry collector for tests: accepts OTLP/HTTP exports (protobuf or JSON) and keeps the spans."""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


class OtlpReceiver:
    """`with OtlpReceiver() as receiver:` listens on 127.0.0.1 (`receiver.url`) until the block ends.

    `/v1/traces` bodies are decoded and kept (`spans`); other signals (`/v1/metrics`, `/v1/logs`) are accepted and
    counted by path only.
    """

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
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
            if path != '/v1/traces':
                return
            request = ExportTraceServiceRequest()
            if content_type.startswith('application/json'):
                json_format.Parse(body, request)
            else:
                request.ParseFromString(body)
            self.requests.append(request)

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
