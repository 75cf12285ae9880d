"""Headers every response of the app carries: API responses are not to be cached or content-sniffed.

An API response holds an account's conversations, audit and costs, fetched with a bearer key: `Cache-Control:
no-store` keeps it out of the browser's cache and any shared proxy (a key's answers outliving the key's tab, or served
to the next user of a proxy), and `X-Content-Type-Options: nosniff` keeps a browser from reading JSON that quotes a
prompt as HTML. A response that sets its own (the web UI's files: `no-cache`, revalidated) keeps them.

A redirect to this server (Starlette's from a path with a trailing slash to the route's: `/api/v1/me/`) names it by
a path only: Starlette writes the request's `Host` header into its `Location`, so `Host: evil.example` sent a client
to `http://evil.example/api/v1/me`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import URL, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

RESPONSE_HEADERS: dict[str, str] = {'Cache-Control': 'no-store', 'X-Content-Type-Options': 'nosniff'}
"""What a response carries unless it set the header itself."""


class ResponseHeaders:
    """ASGI middleware adding `RESPONSE_HEADERS` to every HTTP response that does not set them (streams included: the
    headers go out with the response's start).

    Args:
        app: the application.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; add the headers to its response's start."""
        if scope['type'] != 'http':
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message['type'] == 'http.response.start':
                headers = MutableHeaders(scope=message)
                for name, value in RESPONSE_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
                location = headers.get('location')
                if location is not None and 300 <= message['status'] < 400:
                    headers['location'] = relative_location(location, scope)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def relative_location(location: str, scope: Scope) -> str:
    """`location` as a path (and query) when it names the server the request came to, as Starlette builds it from the
    request (its `Host` header, else the server's address); any other location as it is."""
    target, here = urlsplit(location), urlsplit(str(URL(scope=scope)))
    if not target.netloc or (target.scheme, target.netloc) != (here.scheme, here.netloc):
        return location
    path = target.path or '/'
    if path.startswith('//'):  # a path only, not another host's address (`//evil.example`), as Starlette writes one
        path = '/%2F' + path[2:]
    return f'{path}?{target.query}' if target.query else path
