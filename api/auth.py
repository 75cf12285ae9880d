"""API-key authentication: `Authorization: Bearer art_<prefix>_<secret>`; the key fixes the caller's account.

`ChatCaller` and `ReadCaller` are the route parameters that require a key with the `chat` or `read` scope: a missing
or bad key answers 401, a key without the scope 403. The check runs in its own short session inside
`authenticate_api_key` (and is cached), so no dependency here holds, or yields, a database session.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, ClassVar

from fastapi import Request, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.responses import Response

from agentrt.api.errors import ApiError
from agentrt.services.api_keys import ApiCaller, authenticate_api_key, is_api_key_shaped

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name='ApiKey',
    bearerFormat='art_<prefix>_<secret>',
    description='An API key from `agentrt keys create`, sent as `Authorization: Bearer art_...`.',
)


async def api_caller(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Security(_bearer),  # noqa: B008
) -> ApiCaller:
    """The caller a request's API key speaks for.

    The header is read as RFC 7235 and RFC 6750 say: the scheme `Bearer` in any case, one or more spaces (not a
    tab), then exactly one token, the key; one Authorization header. The 401 says which of the header, the key's form
    or the key itself is wrong (a key's form is public, so saying it leaks nothing): `Bearer<tab>art_...` or a key
    without its `Bearer` was "an API key is required", as if none had been sent, and a truncated or padded key
    "invalid or revoked".

    Raises:
        ApiError: 401 when the key is missing, malformed, unknown or revoked, or the header is not one bearer token.
    """
    del credentials  # declared for OpenAPI's security scheme; the header is read below, as the RFCs say
    checked = request.scope.get(_CHECKED_CALLER)
    if isinstance(checked, ApiCaller):  # checked before the body was read (`KeyBeforeBody`): once is enough
        return checked
    token = _bearer_token(request.headers.getlist('authorization'))
    if not is_api_key_shaped(token):
        raise ApiError(
            401,
            'unauthorized',
            'the API key is malformed: a key is art_, 12 hex digits, _ and 43 letters, digits, - or _ '
            '(as `agentrt keys create` printed it)',
        )
    caller = await authenticate_api_key(token)
    if caller is None:
        raise ApiError(401, 'unauthorized', 'the API key is invalid or revoked')
    return caller


_CHECKED_CALLER = 'agentrt.api_caller'
"""The ASGI scope's entry holding the caller `KeyBeforeBody` checked, so the route's own dependency does not again."""


class KeyBeforeBody(APIRoute):
    """A route that checks the request's API key and its scope (401, 403) before FastAPI reads the body.

    FastAPI reads and parses a route's body parameter before it solves any dependency, the key's included: a client
    without a key had the server buffer and parse a body up to the size limit (4 MiB) first, and one that was not JSON
    answered 422 rather than 401. The streamed chat routes read their body themselves, after the key. The route still
    declares its caller parameter (`ChatCaller`: OpenAPI's security, and the value it uses), which finds the caller
    checked here. A subclass names the scope (`ChatKeyBeforeBody`).
    """

    key_scope: ClassVar[str]

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, after the key's check."""
        handler = super().get_route_handler()
        check = require_scope(self.key_scope)

        async def key_first(request: Request) -> Response:
            request.scope[_CHECKED_CALLER] = await check(await api_caller(request, None))
            await self.after_key(request)
            return await handler(request)

        return key_first

    async def after_key(self, request: Request) -> None:
        """What a subclass does once the key passed, before FastAPI reads the body (nothing here)."""


def _bearer_token(values: list[str]) -> str:
    """The one token of the one `Authorization: Bearer <token>` header (RFC 7235 section 2.1, RFC 6750 section 2.1).

    FastAPI's `HTTPBearer` split at the first space, so a header padded in front (which the field's own whitespace
    is not part of, RFC 9110) read as no header, and kept whatever followed as one "key".

    Raises:
        ApiError: 401 naming what is wrong with the header.
    """
    if len(values) > 1:
        # Which one counts would be a guess (the first here, the last in a proxy that checked it): none does.
        raise ApiError(
            401,
            'unauthorized',
            'the request has several Authorization headers: send one, Authorization: Bearer art_...',
        )
    value = values[0].strip(' \t') if values else ''
    if not value:
        raise ApiError(401, 'unauthorized', 'an API key is required: send Authorization: Bearer art_...')
    scheme, _, token = value.partition(' ')
    token = token.lstrip(' ')
    if scheme.lower() != 'bearer' or not token:
        raise ApiError(
            401,
            'unauthorized',
            "the Authorization header is not 'Bearer <key>' (the word Bearer, a space, the key): "
            'send Authorization: Bearer art_...',
        )
    if ' ' in token or '\t' in token:
        raise ApiError(
            401,
            'unauthorized',
            "the Authorization header holds more than one token after 'Bearer': send the key alone, "
            'Authorization: Bearer art_...',
        )
    return token


def require_scope(scope: str) -> Callable[[ApiCaller], Awaitable[ApiCaller]]:
    """A dependency that admits a key holding `scope` (403 otherwise)."""

    async def check(caller: ApiCaller = Security(api_caller)) -> ApiCaller:  # noqa: B008
        if scope not in caller.scopes:
            raise ApiError(403, 'forbidden', f'this API key does not have the {scope!r} scope')
        return caller

    check.__name__ = f'require_{scope}_scope'
    return check


ChatCaller = Annotated[ApiCaller, Security(require_scope('chat'))]
"""A caller whose key has the `chat` scope: run turns, delete conversations."""
ReadCaller = Annotated[ApiCaller, Security(require_scope('read'))]
"""A caller whose key has the `read` scope: the audit, costs and conversations."""


class ChatKeyBeforeBody(KeyBeforeBody):
    """`KeyBeforeBody` for a route of the `chat` scope (`route_class_override=` of its `add_api_route`)."""

    key_scope = 'chat'
