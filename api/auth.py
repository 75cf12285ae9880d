"""API-key authentication: `Authorization: Bearer art_<prefix>_<secret>`; the key fixes the caller's account.

`ChatCaller` and `ReadCaller` are the route parameters that require a key with the `chat` or `read` scope: a missing
or bad key answers 401, a key without the scope 403. The check runs in its own short session inside
`authenticate_api_key` (and is cached), so no dependency here holds, or yields, a database session.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from agentrt.api.errors import ApiError
from agentrt.services.api_keys import ApiCaller, authenticate_api_key

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name='ApiKey',
    bearerFormat='art_<prefix>_<secret>',
    description='An API key from `agentrt keys create`, sent as `Authorization: Bearer art_...`.',
)


async def api_caller(credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> ApiCaller:  # noqa: B008
    """The caller a request's API key speaks for.

    Raises:
        ApiError: 401 when the key is missing, malformed, unknown or revoked.
    """
    if credentials is None:
        raise ApiError(401, 'unauthorized', 'an API key is required: send Authorization: Bearer art_...')
    caller = await authenticate_api_key(credentials.credentials)
    if caller is None:
        raise ApiError(401, 'unauthorized', 'the API key is invalid or revoked')
    return caller


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
