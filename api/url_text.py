"""A URL whose path or query is not UTF-8 once percent-decoded: a 422 naming the parameter, before any route runs.

The server decodes `%FF` or `%ED%A0%80` (an encoded lone surrogate) into U+FFFD without a word, so a filter
(`?model=%FF`) matched nothing and answered 200 with an empty page, and a conversation id was refused as holding
a U+FFFD the client never sent. The raw bytes of the request line are checked instead, while they still say what
was sent.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from agentrt.api.errors import public_error
from agentrt.db.errors import InvalidInputError

_ENCODED_SURROGATE = re.compile(rb'\xed[\xa0-\xbf][\x80-\xbf]')


class Utf8Url:
    """ASGI middleware refusing a request whose percent-decoded path or query parameter is not UTF-8 text.

    Args:
        app: the application.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, or answer 422 (`invalid_input`, `field` the parameter or `path`)."""
        if scope['type'] == 'http':
            refusal = url_refusal(scope.get('raw_path') or b'', scope.get('query_string') or b'')
            if refusal is not None:
                error = public_error(refusal, where=f'{scope.get("method", "")} {scope.get("path", "")}')
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def url_refusal(raw_path: bytes, query_string: bytes) -> InvalidInputError | None:
    """Why a request line's path or query is not text (the first fault found), or None when both are UTF-8."""
    problem = not_utf8(unquote_to_bytes(raw_path))
    if problem is not None:
        return InvalidInputError(f'the URL path is not UTF-8 text: {problem}', field='path')
    for pair in query_string.split(b'&'):
        raw_name, _, raw_value = pair.partition(b'=')
        name_bytes = unquote_to_bytes(raw_name.replace(b'+', b' '))
        problem = not_utf8(name_bytes)
        if problem is not None:
            return InvalidInputError(f"a query parameter's name is not UTF-8 text: {problem}", field='query')
        name = name_bytes.decode()
        problem = not_utf8(unquote_to_bytes(raw_value.replace(b'+', b' ')))
        if problem is not None:
            return InvalidInputError(f'the query parameter {name!r} is not UTF-8 text: {problem}', field=name)
    return None


URL_ADVICE = 'percent-encode the UTF-8 bytes of the text'
"""What `not_utf8` tells a client to do about a URL."""


def not_utf8(data: bytes, *, advice: str = URL_ADVICE) -> str | None:
    """What is wrong with `data` as UTF-8 (the bad bytes, percent-encoded, and where), and `advice`; or None when it
    is text."""
    try:
        data.decode()
    except UnicodeDecodeError as exc:
        surrogate = _ENCODED_SURROGATE.search(data)
        if surrogate is not None:
            return (
                f'{_percent(surrogate.group())} at byte {surrogate.start()} is an encoded lone surrogate (half of a '
                f'UTF-16 pair), not a character; {advice}'
            )
        bad = _percent(data[exc.start : exc.end])
        return f'{bad} at byte {exc.start} is not UTF-8 ({exc.reason}); {advice}'
    return None


def _percent(data: bytes) -> str:
    return ''.join(f'%{byte:02X}' for byte in data)
