"""`SchemaGate`: while the database's schema is behind this version's, the API answers 503 `schema_behind`.

An app started with `AGENTRT_AUTO_MIGRATE=false` on a schema an upgrade has not migrated yet starts all the same
(`/health/ready` says 503 until `agentrt db upgrade` runs), so a load balancer keeps requests away. Requests that
reach it anyway (a mounted app whose host has a health check of its own) ran their routes on tables and columns that
are not there: 500 `internal_error` with an `UndefinedColumnError` traceback, "a bug" by the README's table (QA). Now
they are told what is wrong and what to do; the health routes, the web UI's files and the API's documents still
answer. Once the schema is current the gate stays open (a schema only moves forward); a newer version's schema (a
rolling upgrade) is served, as every command does.
"""

from __future__ import annotations

import logging
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from agentrt.api.errors import new_error_id
from agentrt.db.engine import current_engine, schema_caught_up, schema_left_behind
from agentrt.db.schema_version import packaged_head, revision_behind
from agentrt.services.log_redaction import loggable

logger = logging.getLogger('agentrt.api')

RECHECK_S = 2.0
"""How long a schema found behind is taken for behind before it is read again (an upgrade run meanwhile is seen)."""
_GATED_PREFIX = '/api/'


class SchemaGate:
    """ASGI middleware: an API request while the schema is behind answers 503 `schema_behind` (see the module).

    The runtime's start says whether it was behind (`schema_left_behind`); only then is it read again, at most every
    `RECHECK_S`, so a schema at this version's head costs a request nothing.

    Args:
        app: the application.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._read_at = float('-inf')
        self._told = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse an API request while the schema is behind; pass every other request on."""
        if scope['type'] != 'http' or schema_left_behind() is None or not _route_path(scope).startswith(_GATED_PREFIX):
            await self.app(scope, receive, send)
            return
        behind = await self._still_behind()
        if behind is None:
            await self.app(scope, receive, send)
            return
        error_id = new_error_id()
        found = 'never migrated' if behind == 'none' else f'at revision {behind}'
        message = (
            f"the database's schema is behind this version's ({found}; this version needs {packaged_head()}): the "
            "server's operator must run `agentrt db upgrade` (AGENTRT_AUTO_MIGRATE is off); nothing was done"
        )
        if not self._told:  # once: every request while it lasts would say the same
            self._told = True
            # The path is the client's, percent-decoded and not yet authenticated: escaped, or `%0A` forges a line.
            where = loggable(f'{scope["method"]} {scope["path"]}')
            logger.warning('%s %s: %s (said once)', error_id, where, message)
        body = {'detail': message, 'type': 'schema_behind', 'error_id': error_id}
        await JSONResponse(body, status_code=503, headers={'Retry-After': '30'})(scope, receive, send)

    async def _still_behind(self) -> str | None:
        """The revision of the schema while it is behind; None once it caught up (an upgrade ran meanwhile), or when
        the database cannot be asked now (the route answers as it does in an outage: 503 `database_unavailable`)."""
        if time.monotonic() - self._read_at >= RECHECK_S and (engine := current_engine()) is not None:
            self._read_at = time.monotonic()
            try:
                behind = await revision_behind(engine)
            except Exception:  # the driver's own connect errors (a socket gone, refused): it was a 500 (QA)
                return None
            if behind is None:  # at the head now, or past it
                schema_caught_up()
        return schema_left_behind()


def _route_path(scope: Scope) -> str:
    """The request's path within this app: without the prefix of an app it is mounted in (`root_path`), whose
    routes the gate missed (`/agent/api/...`; QA)."""
    path: str = scope['path']
    root: str = scope.get('root_path', '')
    return path[len(root) :] if root and path.startswith(root) else path
