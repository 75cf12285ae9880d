"""The runtime started by the first request when the app's own lifespan never ran: `create_app()` mounted inside
another application (`app.mount('/agent', create_app())`), whose server runs only the outer app's lifespan.

Starlette runs the lifespan of the application it serves, never a mounted one's. Without this, every request of a
mounted `create_app()` failed as if PostgreSQL were down (503 `database_unavailable`, `/health/ready` "unreachable"),
its cause (the runtime never started) only in the log. A turn started the database itself (`simple_chat` does), but
the key check before it did not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from agentrt.agents.runtime import configure_observability
from agentrt.api.errors import public_error
from agentrt.db.engine import current_engine, init_database
from agentrt.db.errors import ConfigError
from agentrt.db.settings import Settings
from agentrt.services.ledger import get_request_tracker
from agentrt.services.log_redaction import loggable

logger = logging.getLogger('agentrt.api')


async def start_database_and_replay(settings: Settings | None) -> None:
    """The app's start after tracing is set up, by its lifespan or by its first request: the database started and
    migrated (a schema left behind is allowed: `/health/ready` says 503 until it is upgraded), then the ledger rows an
    earlier process spooled while the database was down replayed in the background, so they reach the costs now, not
    at this process's first ledger write."""
    await init_database(settings, allow_behind=True)
    get_request_tracker().replay_pending_in_background()


@dataclass
class RuntimeStart:
    """Whether the app's lifespan started the runtime (then nothing is left to do here)."""

    settings: Settings | None
    by_lifespan: bool = False
    said: bool = False


class StartsRuntime:
    """ASGI middleware: before a request, start the runtime if the app's lifespan did not (a mounted app).

    The start is the lifespan's (tracing set-up, database started and migrated, spooled ledger rows replayed), once;
    a start that fails leaves the request to fail as it would have (503), and the next request tries again, unless it
    failed on the configuration (`ConfigError`: a refused login, a bad setting), which no wait changes: then the
    request answers 500 `configuration_error`, as a route does for one (it answered 503 `database_unavailable`, "try
    again shortly", the cause only in the log). Nothing shuts the runtime down at the end: the outer application's
    shutdown calls `shutdown_runtime()`, or runs this app's lifespan inside its own (README "Serving over HTTP").
    With `manage_runtime=False` nothing starts here: a request before the program started the runtime answers 500
    `configuration_error` (`DatabaseNotInitializedError.never_started`, `errors.py`).

    Args:
        app: the application.
        start: the app's start state, shared with its lifespan.
    """

    def __init__(self, app: ASGIApp, start: RuntimeStart) -> None:
        self.app = app
        self.start = start

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Start the runtime if needed, then pass the request on."""
        if scope['type'] == 'http' and not self.start.by_lifespan and current_engine() is None:
            misconfigured = await self._start()
            if misconfigured is not None:
                where = f'{scope["method"]} {scope["path"]}'
                error = public_error(misconfigured, where=where)  # logged there with its id and the error's words
                answer = JSONResponse(error.body(), status_code=error.status, headers=error.headers())
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _start(self) -> ConfigError | None:
        """Start the runtime; the `ConfigError` it failed on, if any."""
        configure_observability()
        try:
            await start_database_and_replay(self.start.settings)
        except ConfigError as exc:
            return exc
        except Exception as exc:  # the request fails as it would have, saying why; the next one tries again
            logger.warning('the runtime could not start for a request: %s', loggable(str(exc)))
            return None
        if not self.start.said:
            self.start.said = True
            logger.info(
                "agentrt's app started the runtime at its first request: its lifespan did not run (an app mounted in "
                'another, whose lifespan should call shutdown_runtime() at its end)'
            )
        return None
