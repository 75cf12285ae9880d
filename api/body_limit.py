"""A cap on request bodies (`AGENTRT_HTTP_MAX_BODY_BYTES`): 413 before a byte more is read, whatever the framing."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentrt.api.errors import ApiError


class BodySizeLimit:
    """ASGI middleware refusing bodies over `max_bytes()` bytes: by `Content-Length` at once, or while reading.

    Args:
        app: the application.
        max_bytes: the limit, read per request (so it follows the settings the database was started with).
    """

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, with a `receive` that counts what it delivers."""
        if scope['type'] != 'http':
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes()
        declared = dict(scope['headers']).get(b'content-length')
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _refuse(scope, send, limit, bad_length=not declared.isdigit())
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message['type'] == 'http.request':
                received += len(message.get('body', b''))
                if received > limit:
                    raise ApiError(413, 'body_too_large', f'the request body is over {limit:,} bytes')
            return message

        await self.app(scope, counting_receive, send)


async def _refuse(scope: Scope, send: Send, limit: int, *, bad_length: bool) -> None:
    from starlette.responses import JSONResponse

    if bad_length:
        response = JSONResponse({'detail': 'invalid Content-Length', 'type': 'bad_request'}, status_code=400)
    else:
        detail = f'the request body is over {limit:,} bytes'
        response = JSONResponse({'detail': detail, 'type': 'body_too_large'}, status_code=413)

    async def no_body() -> Message:
        return {'type': 'http.request', 'body': b'', 'more_body': False}

    await response(scope, no_body, send)
