"""A scripted OpenAI-compatible server on loopback (Chat Completions and Responses APIs), with fault injection.

It drives the real `openai` client in tests: JSON answers, SSE streams (chunked, as real servers send them), HTTP
errors, and the faults seen behind real proxies: a connection dropped mid-stream and a corrupt chunk.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

SERVED_MODEL = 'gpt-4o-mini-2024-07-18'

Fault = Literal['drop', 'corrupt', 'stall']


@dataclass
class Reply:
    """What the server answers to one request."""

    text: str | None = None
    tool_calls: list[tuple[str, dict[str, Any] | str]] = field(default_factory=list)
    """Each call's name and arguments: a dict (sent as JSON) or the arguments' text as it is (e.g. not JSON)."""
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
    fault: Fault | None = None
    """`drop`: close the connection mid-answer (a stream: no usage, no end of stream); `corrupt`: send a chunk (or
    a body) that is not JSON."""
    fault_after: int = 2
    """How many stream events are sent before the fault."""
    usage_before_fault: bool = False
    """Send the usage chunk (Chat Completions) before the fault, as a proxy that cuts after it would."""
    headers: dict[str, str] = field(default_factory=dict)
    """More response headers (e.g. `retry-after` on a 429)."""
    raw_body: bytes | None = None
    """A body sent as it is with `status` and `content_type`, streamed request or not (an HTML error page, a JSON
    object that is not the API's)."""
    content_type: str = 'application/json'
    reports_usage: bool = True
    """False: no usage in the answer (no `usage` chunk in a stream), as some OpenAI-compatible servers and proxies."""
    ends_early: bool = False
    """A Responses stream that ends cleanly without its last event (`response.completed`), as a proxy's idle
    timeout cuts one."""
    cut_off: Literal['length', 'content_filter'] | None = None
    """The text answer ends cut off: at the output token limit, or by the provider's content filter (Chat Completions'
    `finish_reason`; the Responses API's `incomplete` response and its reason)."""
    call_id: str = 'call_'
    usage_fields: dict[str, Any] = field(default_factory=dict)
    """Fields set in the Chat Completions `usage` object over the counts above (`{'prompt_tokens': None}`, a gateway's
    reported cost)."""
    usage_sent: Any = None
    """When not None, what the Chat Completions answer sends as its `usage`, as it is (`"abc"`: not an object)."""
    """What each tool call's id starts with (its index follows): a model's own text, which may be hostile."""

    def usage(self, completion_tokens: int | None = None) -> dict[str, Any]:
        """The Chat Completions `usage` object (cached and reasoning tokens in the details)."""
        if self.usage_sent is not None:
            return self.usage_sent  # type: ignore[no-any-return]
        completion = self.completion_tokens if completion_tokens is None else completion_tokens
        return {
            'prompt_tokens': self.prompt_tokens,
            'completion_tokens': completion,
            'total_tokens': self.prompt_tokens + completion,
            'prompt_tokens_details': {'cached_tokens': self.cached_tokens},
            'completion_tokens_details': {'reasoning_tokens': self.reasoning_tokens},
            **self.usage_fields,
        }

    def responses_usage(self) -> dict[str, Any]:
        """The Responses API `usage` object."""
        return {
            'input_tokens': self.prompt_tokens,
            'input_tokens_details': {'cached_tokens': self.cached_tokens},
            'output_tokens': self.completion_tokens,
            'output_tokens_details': {'reasoning_tokens': self.reasoning_tokens},
            'total_tokens': self.prompt_tokens + self.completion_tokens,
        }


Script = Callable[[dict[str, Any]], Reply]


class Faulty:
    """A script (`FakeOpenAI(Faulty(reply))`): the faulty `reply` to every request until `healed`, then a plain
    answer, so a test can check that the turn after a provider's failure works."""

    def __init__(self, fault: Reply) -> None:
        self.fault = fault
        self.healed = False

    def __call__(self, body: dict[str, Any]) -> Reply:
        return Reply(text='Nobody matches.') if self.healed else copy.deepcopy(self.fault)


class FakeOpenAI:
    """Serves `/v1/chat/completions` and `/v1/responses` from a script; records every request."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.replies: list[Reply] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()  # ends a `stall`
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
            self._stop.set()
            self._server.shutdown()
            self._server.server_close()
            thread.join(5)

    def _answer(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Reply:
        with self._lock:
            self.paths.append(path)
            self.requests.append(body)
            self.headers.append(headers)
            reply = self.script(body)
            self.replies.append(reply)
        return reply

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'  # chunked streams: a cut connection is an error, not an end

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers['content-length'])))
                responses_api = self.path.rstrip('/').endswith('/responses')
                reply = fake._answer(self.path, body, dict(self.headers))
                try:
                    if reply.raw_body is not None:
                        self._send(reply.status, reply.raw_body, reply)
                    elif reply.status != 200:
                        error = {'error': {'message': reply.error, 'type': 'invalid_request'}}
                        self._send_json(reply.status, reply.error_body or error, headers=reply.headers)
                    elif body.get('stream'):
                        events = _response_events(reply) if responses_api else _chat_events(body, reply)
                        self._stream(events, reply)
                    else:
                        payload = _response(reply) if responses_api else _completion(reply)
                        self._send_json(200, payload, fault=reply.fault)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client stopped reading: a consumer that left the stream

            def _send(self, status: int, data: bytes, reply: Reply) -> None:
                self.send_response(status)
                self.send_header('connection', 'close')
                self.send_header('content-type', reply.content_type)
                self.send_header('content-length', str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _send_json(
                self,
                status: int,
                payload: dict[str, Any],
                fault: Fault | None = None,
                headers: dict[str, str] | None = None,
            ) -> None:
                data = json.dumps(payload).encode()
                if fault == 'corrupt':
                    data = data[: len(data) // 2]  # a body cut in half: not JSON
                self.send_response(status)
                self.send_header('connection', 'close')  # no keep-alive: clients never hold a socket of ours
                self.send_header('content-type', 'application/json')
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header('content-length', str(len(data) * (2 if fault == 'drop' else 1)))
                self.end_headers()
                if fault == 'stall':  # the head sent, the body never: until the client gives up or the server stops
                    self.wfile.flush()
                    fake._stop.wait()
                    return
                self.wfile.write(data)
                if fault == 'drop':  # fewer bytes than announced, then the connection goes
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True

            def _stream(self, events: list[bytes], reply: Reply) -> None:
                self.send_response(200)
                self.send_header('connection', 'close')
                self.send_header('content-type', 'text/event-stream')
                self.send_header('transfer-encoding', 'chunked')
                self.end_headers()
                for index, event in enumerate(events):
                    if reply.fault is not None and index == reply.fault_after:
                        self._fault(reply.fault)
                        return
                    self._chunk(event)
                    if reply.chunk_delay:
                        time.sleep(reply.chunk_delay)
                self._chunk(b'')  # the last chunk: the stream ended properly

            def _fault(self, fault: Fault) -> None:
                if fault == 'stall':  # nothing more, the connection left open: until the client gives up
                    fake._stop.wait()
                    return
                if fault == 'corrupt':
                    self._chunk(b'data: {"id": "chatcmpl-fake", "choices": [{"delta": \n\n')
                    self._chunk(b'')
                    return
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # mid-body, without the last chunk
                self.close_connection = True

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f'{len(data):x}\r\n'.encode() + data + b'\r\n')
                self.wfile.flush()

        return Handler


def _sse(payload: dict[str, Any]) -> bytes:
    return f'data: {json.dumps(payload)}\n\n'.encode()


# Chat Completions


def _chat_events(body: dict[str, Any], reply: Reply) -> list[bytes]:
    continuous = bool((body.get('stream_options') or {}).get('continuous_usage_stats'))
    choices = list(_chat_choices(reply))
    events = []
    for index, choice in enumerate(choices):
        chunk = _chunk([choice])
        if continuous:  # vLLM-style cumulative usage on every chunk
            chunk['usage'] = reply.usage(round(reply.completion_tokens * (index + 1) / len(choices)))
        events.append(_sse(chunk))
    usage_chunk = _sse({**_chunk([]), 'usage': reply.usage()})  # the include_usage chunk
    if not reply.reports_usage:
        pass
    elif reply.fault is not None and reply.usage_before_fault:
        events.insert(reply.fault_after, usage_chunk)
        reply.fault_after += 1
    else:
        events.append(usage_chunk)
    events.append(b'data: [DONE]\n\n')
    return events


def _chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        'id': 'chatcmpl-fake',
        'object': 'chat.completion.chunk',
        'created': 0,
        'model': SERVED_MODEL,
        'choices': choices,
    }


def _chat_choices(reply: Reply) -> Iterator[dict[str, Any]]:
    yield {'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None}
    if reply.tool_calls:
        for index, (name, args) in enumerate(reply.tool_calls):
            arguments = _arguments(args)
            half = len(arguments) // 2
            head = {
                'index': index,
                'id': f'{reply.call_id}{index}',
                'type': 'function',
                'function': {'name': name, 'arguments': arguments[:half]},
            }
            yield {'index': 0, 'delta': {'tool_calls': [head]}, 'finish_reason': None}
            tail = {'index': index, 'function': {'arguments': arguments[half:]}}
            yield {'index': 0, 'delta': {'tool_calls': [tail]}, 'finish_reason': None}
        yield {'index': 0, 'delta': {}, 'finish_reason': 'tool_calls'}
        return
    for piece in _pieces(reply):
        yield {'index': 0, 'delta': {'content': piece}, 'finish_reason': None}
    yield {'index': 0, 'delta': {}, 'finish_reason': reply.cut_off or 'stop'}


def _arguments(args: dict[str, Any] | str) -> str:
    return args if isinstance(args, str) else json.dumps(args)


def _pieces(reply: Reply) -> list[str]:
    text = reply.text or ''
    size = max(1, -(-len(text) // max(reply.chunks, 1)))
    return [text[start : start + size] for start in range(0, len(text), size)]


def _completion(reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {'role': 'assistant', 'content': reply.text}
    if reply.tool_calls:
        message['tool_calls'] = [
            {'id': f'{reply.call_id}{i}', 'type': 'function', 'function': {'name': name, 'arguments': _arguments(args)}}
            for i, (name, args) in enumerate(reply.tool_calls)
        ]
    finish = 'tool_calls' if reply.tool_calls else reply.cut_off or 'stop'
    return {
        'id': 'chatcmpl-fake',
        'object': 'chat.completion',
        'created': 0,
        'model': SERVED_MODEL,
        'choices': [{'index': 0, 'message': message, 'finish_reason': finish}],
        'usage': reply.usage() if reply.reports_usage else None,
    }


# Responses API


def _output_items(reply: Reply) -> list[dict[str, Any]]:
    if reply.tool_calls:
        return [
            {
                'type': 'function_call',
                'id': f'fc_{i}',
                'call_id': f'{reply.call_id}{i}',
                'name': name,
                'arguments': _arguments(args),
                'status': 'completed',
            }
            for i, (name, args) in enumerate(reply.tool_calls)
        ]
    part = {'type': 'output_text', 'text': reply.text or '', 'annotations': []}
    return [{'type': 'message', 'id': 'msg_0', 'status': 'completed', 'role': 'assistant', 'content': [part]}]


_INCOMPLETE_REASONS = {'length': 'max_output_tokens', 'content_filter': 'content_filter'}


def _response(reply: Reply, *, status: str = 'completed', output: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    if status == 'completed' and reply.cut_off is not None:
        return {
            **_response(reply, status='incomplete', output=output),
            'incomplete_details': {'reason': _INCOMPLETE_REASONS[reply.cut_off]},
        }
    return {
        'id': 'resp_fake',
        'object': 'response',
        'created_at': 0,
        'status': status,
        'model': SERVED_MODEL,
        'output': _output_items(reply) if output is None else output,
        'parallel_tool_calls': True,
        'tool_choice': 'auto',
        'tools': [],
        'usage': reply.responses_usage() if status != 'in_progress' and reply.reports_usage else None,
    }


def _response_events(reply: Reply) -> list[bytes]:
    payloads: list[dict[str, Any]] = [
        {'type': 'response.created', 'response': _response(reply, status='in_progress', output=[])}
    ]
    for index, item in enumerate(_output_items(reply)):
        if item['type'] == 'function_call':
            payloads.append(
                {'type': 'response.output_item.added', 'output_index': index, 'item': {**item, 'arguments': ''}}
            )
            payloads.append(
                {
                    'type': 'response.function_call_arguments.delta',
                    'item_id': item['id'],
                    'output_index': index,
                    'delta': item['arguments'],
                }
            )
        else:
            empty = {**item, 'status': 'in_progress', 'content': []}
            payloads.append({'type': 'response.output_item.added', 'output_index': index, 'item': empty})
            part = {'type': 'output_text', 'text': '', 'annotations': []}
            where = {'item_id': item['id'], 'output_index': index, 'content_index': 0}
            payloads.append({'type': 'response.content_part.added', **where, 'part': part})
            for piece in _pieces(reply):
                payloads.append({'type': 'response.output_text.delta', **where, 'delta': piece, 'logprobs': []})
            payloads.append({'type': 'response.output_text.done', **where, 'text': reply.text or '', 'logprobs': []})
        payloads.append({'type': 'response.output_item.done', 'output_index': index, 'item': item})
    final = 'response.incomplete' if reply.cut_off is not None else 'response.completed'
    if not reply.ends_early:
        payloads.append({'type': final, 'response': _response(reply)})
    return [_sse({**payload, 'sequence_number': number}) for number, payload in enumerate(payloads)]


_UNUSABLE_ANSWER_SUBCLASSES = frozenset({'ModelEmptyResponseError', 'ModelInvalidResponseError'})


def as_unusable_answer(error_type: str | None) -> str | None:
    """A ledger row's `error_type` with pydantic-ai's classes for an answer it could not use named as in 2.68.

    2.68 raises `UnexpectedModelBehavior` for a proxy's HTML page, JSON without the API's fields or a stream without
    a single event; 2.78 raises its subclasses `ModelInvalidResponseError` and `ModelEmptyResponseError` for them
    (still `UnexpectedModelBehavior`s, and `ModelAPIError`s), which the ledger records by their own names.
    """
    return 'UnexpectedModelBehavior' if error_type in _UNUSABLE_ANSWER_SUBCLASSES else error_type
