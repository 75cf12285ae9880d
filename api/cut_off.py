"""A request the server's shutdown cancels before it answered: a 503 in the API's error shape, not uvicorn's 500; and
a request a bug failed: a 500 in that shape, logged once.

When `--shutdown-seconds` runs out, uvicorn cancels the requests still running; for one whose response had not
started (a JSON turn, `POST .../turns`, waiting for its model) it then answered `500 Internal Server Error` in plain
text: a server error with no error id, where the turn had only been stopped (not saved, its ledger row `cancelled`)
and can be sent again to the next server. A streamed response that has started cannot change its status: it ends
with the protocol's error event instead (`TurnStreamingResponse`).
"""

from __future__ import annotations

from asyncio import CancelledError

from opentelemetry import trace
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentrt.api.errors import ApiError, public_error
from agentrt.services.span_errors import record_redacted

STOPPED = (
    'the server is shutting down and stopped this request before it finished (a chat turn stopped so is not saved); '
    'send it again'
)


class CutOffAnswer:
    """ASGI middleware answering 503 `shutting_down` for a request cancelled before its response started, and 500
    `internal_error` for one an unexpected exception failed (logged once, redacted, and not raised on to the server).

    The cancellation goes on (re-raised) once the answer is sent: uvicorn then closes the connection, as it does for
    every request it cut off.

    Args:
        app: the application.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; answer it if it is cancelled before it answered."""
        if scope['type'] != 'http':
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message['type'] == 'http.response.start':
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except CancelledError:
            if not started:
                error = public_error(
                    ApiError(503, 'shutting_down', STOPPED), where=f'{scope.get("method", "")} {scope.get("path", "")}'
                )
                response = JSONResponse(
                    error.body(), status_code=error.status, headers={**(error.headers() or {}), 'Connection': 'close'}
                )
                await response(scope, receive, send)
            raise
        except Exception as exc:
            # A route's unexpected error (a bug), past the handlers of the errors the API knows: answered here, logged
            # once by `public_error` (redacted, with its error id). Starlette's outermost middleware answered it and
            # then re-raised it, so the server logged it a second time, a whole traceback, and under a uvicorn of the
            # user's own unredacted (a secret in the exception's message; QA).
            error = public_error(exc, where=f'{scope.get("method", "")} {scope.get("path", "")}')
            span = trace.get_current_span()  # the request's, when its telemetry is on: the error on it, redacted
            if span.is_recording():
                record_redacted(span, exc)
            if not started:  # else the response cannot change: the connection ends with it unfinished
                response = JSONResponse(error.body(), status_code=error.status, headers=error.headers())
                await response(scope, receive, send)
