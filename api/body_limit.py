"""A cap on request bodies (`AGENTRT_HTTP_MAX_BODY_BYTES`): 413 before a byte more is read, whatever the framing; and
bodies in a content coding (`Content-Encoding: gzip`, ...) refused, since none is decoded; and a body that stops
arriving for `AGENTRT_HTTP_BODY_TIMEOUT_SECONDS`, or trickles in slower than `MIN_BODY_BYTES_PER_SECOND` once that
long has passed, answered 408. A response sent before its request's body was read (a refusal: 401, 403, 408, 413,
...) closes the connection, so the rest is never read."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentrt.api.errors import ApiError, public_error

MIN_BODY_BYTES_PER_SECOND = 500
"""After its first `AGENTRT_HTTP_BODY_TIMEOUT_SECONDS`, a body must go on arriving at this rate on average (Apache's
`mod_reqtimeout` rule, with its default rate): the wait for each piece alone let a client that sent a byte a minute
hold its connection for weeks. A 4 MiB body may take 60 s + 8,389 s; a chat message of 2 KB, 64 s."""


class BodySizeLimit:
    """ASGI middleware refusing bodies over `max_bytes()` bytes: by `Content-Length` at once, or while reading.

    It also refuses a body sent in a content coding (415): nothing here decodes one, so a gzipped body was read as
    text ("not UTF-8") and a body that only claimed to be gzipped was taken as it was. And it bounds the wait for each
    piece of the body (408): uvicorn puts no limit on it, so a client that sent its headers and then nothing (or a
    byte a minute) held its connection and its request's task for as long as it liked. The whole body is bounded
    too: by `body_timeout`, plus a second for each `MIN_BODY_BYTES_PER_SECOND` bytes received (a client that kept
    sending a byte every few seconds never waited `body_timeout` for a piece).

    Args:
        app: the application.
        max_bytes: the limit, read per request (so it follows the settings the database was started with).
        body_timeout: the longest wait, in seconds, for the next piece of a body not read whole yet, and the time the
            whole body may take before it must average `MIN_BODY_BYTES_PER_SECOND`.
    """

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int], body_timeout: Callable[[], float]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, with a `receive` that counts what it delivers."""
        if scope['type'] != 'http':
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes()
        body_timeout = self.body_timeout()
        headers = dict(scope['headers'])
        declared = headers.get(b'content-length')
        coding = headers.get(b'content-encoding', b'identity').decode('latin-1').strip().lower()
        if declared is not None and not declared.isdigit():
            await _refuse(scope, send, ApiError(400, 'bad_request', 'invalid Content-Length', field='Content-Length'))
            return
        if declared is not None and int(declared) > limit:
            await _refuse(scope, send, ApiError(413, 'body_too_large', f'the request body is over {limit:,} bytes'))
            return
        if coding not in ('identity', ''):
            message = (
                f'Content-Encoding {coding!r} is not served: send the body uncompressed, without a Content-Encoding'
            )
            await _refuse(scope, send, ApiError(415, 'unsupported_media_type', message, field='Content-Encoding'))
            return
        received = 0
        loop = asyncio.get_running_loop()
        started = last_piece = 0.0  # when the body's first read began, and when its last piece came
        # Whether the body's end has been read: a request without one (no length, not chunked) has none to read.
        read_whole = declared in (None, b'0') and b'chunked' not in headers.get(b'transfer-encoding', b'').lower()

        async def counting_receive() -> Message:
            nonlocal received, read_whole, started, last_piece
            if read_whole:  # after the body, a receive waits for the client's hang-up: for as long as the turn runs
                return await receive()
            now = loop.time()
            started = started or now  # from the app's first read: the key's check before it is not the client's
            last_piece = last_piece or now
            # What is left of the body's allowance: the timeout, and a second for each MIN_BODY_BYTES_PER_SECOND.
            allowance = started + body_timeout + received / MIN_BODY_BYTES_PER_SECOND - now
            try:
                message = await asyncio.wait_for(receive(), min(body_timeout, allowance))
            except TimeoutError:
                now = loop.time()
                if now - last_piece >= body_timeout - 0.001:  # (the clock's rounding)
                    detail = f'the request body stopped arriving: nothing of it for {body_timeout:g} s'
                else:
                    detail = (
                        f'the request body arrived too slowly: {received:,} bytes in {now - started:.1f} s (after '
                        f'its first {body_timeout:g} s, a body must average at least {MIN_BODY_BYTES_PER_SECOND} '
                        'bytes a second)'
                    )
                raise ApiError(408, 'request_timeout', f'{detail}; send the whole body without pausing') from None
            last_piece = loop.time()
            if message['type'] == 'http.request':
                received += len(message.get('body', b''))
                if received > limit:
                    raise ApiError(413, 'body_too_large', f'the request body is over {limit:,} bytes')
                read_whole = read_whole or not message.get('more_body', False)
            return message

        async def closing_send(message: Message) -> None:
            if message['type'] == 'http.response.start' and not read_whole:
                message = _closing(message)
            await send(message)

        await self.app(scope, counting_receive, closing_send)


def _closing(start: Message) -> Message:
    """`start` (a response's `http.response.start`) with `Connection: close`: the response goes out before the
    request's body was read, and without it uvicorn, to reuse the connection, read the rest of the body and threw it
    away, without end for a chunked one (QA: 9-15 GB in 8 s after a 401, 2 s of the server's CPU)."""
    headers = [(name, value) for name, value in start.get('headers', []) if name.lower() != b'connection']
    return {**start, 'headers': [*headers, (b'connection', b'close')]}


async def _refuse(scope: Scope, send: Send, refusal: ApiError) -> None:
    """Answer with `refusal` through the one error mapping (its body and log line), without reading the body (and
    closing the connection after it: `_closing`)."""
    error = public_error(refusal, where=f'{scope.get("method", "")} {scope.get("path", "")}')
    response = JSONResponse(error.body(), status_code=error.status, headers={'Connection': 'close'})

    async def no_body() -> Message:
        return {'type': 'http.request', 'body': b'', 'more_body': False}

    await response(scope, no_body, send)
