"""`HEAD` on every `GET` route: the answer `GET` would give, without its body (RFC 9110 section 9.3.2).

FastAPI's routes serve only the methods they declare, so `HEAD /health/live` was a 405 (Starlette's own routes, such
as `/openapi.json` and the files of the web UI, add `HEAD` to a `GET` themselves). Declaring `HEAD` on each route would
put a second operation of each in OpenAPI; instead a `HEAD` request whose path a `GET` route serves goes to that route
as a `GET`, and only the head of its answer goes back: status and headers (`Content-Length` the body's), no body.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _all_routes(routes: Iterable[BaseRoute]) -> Iterator[Route]:
    """The routes in `routes`, those of included routers too (FastAPI keeps a router it includes as one entry)."""
    for route in routes:
        if isinstance(route, Route):
            yield route
        included = getattr(route, 'original_router', None)
        if included is not None:
            yield from _all_routes(included.routes)


def methods_served(routes: Iterable[BaseRoute], scope: Scope) -> set[str]:
    """The methods the routes of `routes` whose path matches the request's serve (a path's `GET` and `DELETE` may be
    two routes)."""
    methods: set[str] = set()
    for route in _all_routes(routes):
        if route.methods and route.matches(scope)[0] is not Match.NONE:
            methods |= route.methods
    return methods


class HeadAsGet:
    """ASGI middleware answering `HEAD` on a path a `GET` route serves (and no route serves `HEAD` on) with that
    route's `GET` answer, its body left out.

    Args:
        app: the application (the FastAPI app's inner stack; its routes are read from the request's `scope['app']`).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A `HEAD` a `GET` route serves goes on as that `GET`, and its body is dropped; anything else passes."""
        if scope['type'] != 'http' or scope['method'] != 'HEAD':
            await self.app(scope, receive, send)
            return
        routes = getattr(getattr(scope.get('app'), 'router', None), 'routes', ())
        methods = methods_served(routes, scope)
        if 'HEAD' in methods or 'GET' not in methods:
            # A route of its own (Starlette's add HEAD to GET), or the router's 405 (or 404) naming what it serves.
            await self.app(scope, receive, send)
            return

        async def head_only(message: Message) -> None:
            if message['type'] == 'http.response.body':
                message = {**message, 'body': b''}
            await send(message)

        # A copy: the server keeps its own scope, whose HEAD tells it that no body follows the headers.
        await self.app({**scope, 'method': 'GET'}, receive, head_only)
