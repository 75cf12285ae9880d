"""A scripted OpenAI-compatible Chat Completions server on loopback, for driving the real `openai` client in tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SERVED_MODEL = 'gpt-4o-mini-2024-07-18'


@dataclass
class Reply:
    """What the server answers to one request."""

    text: str | None = None
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    prompt_tokens: int = 100
    completion_tokens: int = 20
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    status: int = 200
    error: str | None = None
    error_body: dict[str, Any] | None = None
    """The whole JSON body of an error reply; `{"error": {"message": error, ...}}` when None."""
    chunks: int = 2
    """How many pieces a streamed text is cut into."""
    chunk_delay: float = 0.0

    def usage(self, completion_tokens: int | None = None) -> dict[str, Any]:
        """The `usage` object as OpenAI reports it (cached and reasoning tokens in the details)."""
        completion = self.completion_tokens if completion_tokens is None else completion_tokens
        return {
            'prompt_tokens': self.prompt_tokens,
            'completion_tokens': completion,
            'total_tokens': self.prompt_tokens + completion,
            'prompt_tokens_details': {'cached_tokens': self.cached_tokens},
            'completion_tokens_details': {'reasoning_tokens': self.reasoning_tokens},
        }


Script = Callable[[dict[str, Any]], Reply]


class FakeOpenAI:
    """Serves `/v1/chat/completions` (JSON or SSE with a final usage chunk) from a script; records requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.replies: list[Reply] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), self._handler_class())
        self._server.daemon_threads = True

    @property
    def base_url(self) -> str:
        """The URL to give `OpenAIProvider(base_url=...)`."""
        return f'http://127.0.0.1:{self._server.server_port}/v1'

    @contextmanager
    def running(self) -> Iterator[FakeOpenAI]:
        """Serve in a background thread for the duration of the block."""
        thread = threading.Thread(target=self._server.serve_forever, kwargs={'poll_interval': 0.02}, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join(5)

    def _answer(self, body: dict[str, Any], headers: dict[str, str]) -> Reply:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            reply = self.script(body)
            self.replies.append(reply)
        return reply

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers['content-length'])))
                reply = fake._answer(body, dict(self.headers))
                try:
                    if reply.status != 200:
                        error = {'error': {'message': reply.error, 'type': 'invalid_request'}}
                        self._send_json(reply.status, reply.error_body or error)
                    elif body.get('stream'):
                        self._stream(body, reply)
                    else:
                        self._send_json(200, _completion(reply))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: a consumer that broke out of the stream

            def _send_json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header('content-type', 'application/json')
                self.send_header('content-length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, body: dict[str, Any], reply: Reply) -> None:
                self.send_response(200)
                self.send_header('content-type', 'text/event-stream')
                self.end_headers()
                continuous = bool((body.get('stream_options') or {}).get('continuous_usage_stats'))
                chunks = list(_stream_chunks(reply))
                for index, choice in enumerate(chunks):
                    chunk = _chunk([choice])
                    if continuous:  # vLLM-style cumulative usage on every chunk
                        chunk['usage'] = reply.usage(round(reply.completion_tokens * (index + 1) / len(chunks)))
                    self._event(chunk)
                    if reply.chunk_delay:
                        time.sleep(reply.chunk_delay)
                self._event({**_chunk([]), 'usage': reply.usage()})  # the include_usage chunk
                self.wfile.write(b'data: [DONE]\n\n')
                self.wfile.flush()

            def _event(self, payload: dict[str, Any]) -> None:
                self.wfile.write(f'data: {json.dumps(payload)}\n\n'.encode())
                self.wfile.flush()

        return Handler


def _chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        'id': 'chatcmpl-fake',
        'object': 'chat.completion.chunk',
        'created': 0,
        'model': SERVED_MODEL,
        'choices': choices,
    }


def _stream_chunks(reply: Reply) -> Iterator[dict[str, Any]]:
    yield {'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None}
    if reply.tool_calls:
        for index, (name, args) in enumerate(reply.tool_calls):
            arguments = json.dumps(args)
            half = len(arguments) // 2
            head = {
                'index': index,
                'id': f'call_{index}',
                'type': 'function',
                'function': {'name': name, 'arguments': arguments[:half]},
            }
            yield {'index': 0, 'delta': {'tool_calls': [head]}, 'finish_reason': None}
            tail = {'index': index, 'function': {'arguments': arguments[half:]}}
            yield {'index': 0, 'delta': {'tool_calls': [tail]}, 'finish_reason': None}
        yield {'index': 0, 'delta': {}, 'finish_reason': 'tool_calls'}
        return
    text = reply.text or ''
    size = max(1, -(-len(text) // max(reply.chunks, 1)))
    for start in range(0, len(text), size):
        yield {'index': 0, 'delta': {'content': text[start : start + size]}, 'finish_reason': None}
    yield {'index': 0, 'delta': {}, 'finish_reason': 'stop'}


def _completion(reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {'role': 'assistant', 'content': reply.text}
    if reply.tool_calls:
        message['tool_calls'] = [
            {'id': f'call_{i}', 'type': 'function', 'function': {'name': name, 'arguments': json.dumps(args)}}
            for i, (name, args) in enumerate(reply.tool_calls)
        ]
    finish = 'tool_calls' if reply.tool_calls else 'stop'
    return {
        'id': 'chatcmpl-fake',
        'object': 'chat.completion',
        'created': 0,
        'model': SERVED_MODEL,
        'choices': [{'index': 0, 'message': message, 'finish_reason': finish}],
        'usage': reply.usage(),
    }
