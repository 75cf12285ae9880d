"""The web UI's files (`api/static/`: HTML, CSS and JavaScript modules, no build step) and how they are served.

The page talks to the API of the same origin with the API key a person signs in with (kept in the tab's
`sessionStorage` only). It builds every element from text (never from HTML strings), and the packaged UI is served
with a Content-Security-Policy that allows only its own scripts and styles, so a model's answer, a tool's output or
a stored prompt that holds markup is shown as text and can never run as script.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from starlette.responses import Response
from starlette.routing import Match, Mount, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

WEB_UI_DIR = Path(__file__).resolve().parent / 'static'
"""The packaged web UI (package data of `agentrt.api`)."""

WEB_UI_HEADERS: Mapping[str, str] = {
    'Content-Security-Policy': (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    'X-Content-Type-Options': 'nosniff',
    'Referrer-Policy': 'no-referrer',
    # Revalidated on every load (cheap: the ETag answers 304), so an upgraded server never runs yesterday's script.
    'Cache-Control': 'no-cache',
}


_RANGE_SPEC = re.compile(r'(?:([0-9]+)-([0-9]*)|-[0-9]+)', re.ASCII)


def is_valid_range(value: bytes) -> bool:
    """Whether a `Range` header is a byte range set RFC 9110 (section 14.1.1, 14.2) lets a server act on.

    `bytes=` (any case), then a comma-separated list (empty elements and spaces or tabs around them allowed) of
    `first-last`, `first-` or `-suffix`, ASCII digits only and `last` not below `first`.
    """
    try:
        unit, _, ranges = value.decode('ascii').partition('=')
    except UnicodeDecodeError:
        return False
    if unit.lower() != 'bytes':
        return False
    specs = [spec.strip(' \t') for spec in ranges.split(',')]
    if not any(specs):
        return False
    for spec in filter(None, specs):
        match = _RANGE_SPEC.fullmatch(spec)
        if match is None or (match[2] and int(match[2]) < int(match[1])):
            return False
    return True


class WebUIFiles(StaticFiles):
    """`StaticFiles` that adds `headers` to every file it serves (the packaged UI's security headers).

    A `Range` header that is not a valid byte range set is ignored, so the whole file answers 200 as RFC 9110 says
    (section 14.2: a server MUST ignore a range unit it does not know, and may ignore any Range): Starlette answered
    such a header with a plain-text 400 (`bytes=5-2`, `items=0-1`), and read `bytes=1_0-20` as bytes 10-20 (Python's
    `int` takes `_`), a wrong 206.
    """

    def __init__(self, *, directory: Path, headers: Mapping[str, str] | None = None) -> None:
        """Serve `directory` at the mount point (`index.html` for a directory), adding `headers`."""
        super().__init__(directory=directory, html=True)
        self._headers = dict(headers or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request, without its `Range` header unless that is a valid byte range set."""
        headers = scope.get('headers', [])
        if any(name == b'range' and not is_valid_range(value) for name, value in headers):
            scope = {**scope, 'headers': [(name, value) for name, value in headers if name != b'range']}
        await super().__call__(scope, receive, send)

    async def get_response(self, path: str, scope: Scope) -> Response:
        """The file, with the extra headers; for a method files do not take, 404 where a `GET` would be one."""
        if scope['method'] not in ('GET', 'HEAD'):
            # Starlette answers such a method 405 `Allow: GET, HEAD` before it looks for the file, so a POST to a path
            # nothing serves (a typo in an API path, `/api/v1/chat/ag-ui` without the agui extra) said GET works
            # there, where a GET is 404. Looked up as a GET would be: that raises the 404 (nothing is read).
            await super().get_response(path, {**scope, 'method': 'GET'})
        response = await super().get_response(path, scope)
        response.headers.update(self._headers)
        return response


class FilesMount(Mount):
    """A `Mount` of files that takes no request an earlier route of `router` matches by its path.

    Starlette's router prefers a route that matches fully to one whose path matches but not its method, so files
    mounted at `/` answered every method an API route does not serve: `HEAD /health/live` was the files' 404, and
    `DELETE /api/v1/chat` their 405 with `Allow: GET, HEAD`. Such a request goes to the API route now, whose 405
    names the methods it serves.
    """

    def __init__(self, path: str, app: ASGIApp, *, router: Router, name: str | None = None) -> None:
        """Mount `app` at `path`, after the routes of `router` (which it must be the last of)."""
        super().__init__(path, app=app, name=name)
        self._router = router

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        """No match for a path an API route has (its method aside), with or without a trailing slash (the router
        redirects it to the route's: `POST /api/v1/chat/` was the files' 405); else the mount's own."""
        path = scope['path']
        other = path.removesuffix('/') if path.endswith('/') else path + '/'
        for route in self._router.routes:
            if route is self:
                break
            if route.matches(scope)[0] is not Match.NONE:
                return Match.NONE, {}
            if path != '/' and route.matches({**scope, 'path': other})[0] is not Match.NONE:
                return Match.NONE, {}
        return super().matches(scope)
