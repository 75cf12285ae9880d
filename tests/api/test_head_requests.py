"""`HEAD` on every `GET` route: the `GET` answer's status and headers, no body (RFC 9110); it was a 405."""

from __future__ import annotations

import re

import httpx2
from fastapi import FastAPI

from tests.api.conftest import Keys, auth


def _get_paths(app: FastAPI) -> list[str]:
    """Every `GET` path of OpenAPI, a placeholder in each path parameter."""
    return [
        re.sub(r'\{[^}]+\}', 'c-1', path) for path, operations in app.openapi()['paths'].items() if 'get' in operations
    ]


async def test_head_answers_every_get_route_as_get_does_without_the_body(
    keys: Keys, app: FastAPI, client: httpx2.AsyncClient
) -> None:
    paths = _get_paths(app)
    assert '/health/live' in paths and '/api/v1/conversations' in paths
    for path in paths:
        for headers in ({}, auth(keys.acme)):
            get = await client.get(path, headers=headers)
            head = await client.head(path, headers=headers)
            assert (head.status_code, head.content) == (get.status_code, b''), (path, head.status_code)
            for name in ('content-type', 'www-authenticate', 'cache-control'):
                assert head.headers.get(name) == get.headers.get(name), (path, name)
    # The routes' OpenAPI is as it was: no HEAD operation beside each GET.
    assert not [path for path, operations in app.openapi()['paths'].items() if 'head' in operations]


async def test_head_over_a_server_and_the_405_lists_it(keys: Keys, live_url: str) -> None:
    async with httpx2.AsyncClient(base_url=live_url) as client:
        get = await client.get('/api/v1/me', headers=auth(keys.acme))
        head = await client.head('/api/v1/me', headers=auth(keys.acme))
        assert head.status_code == 200 and head.content == b''
        assert head.headers['content-length'] == get.headers['content-length'] == str(len(get.content))
        # Another method on a GET route: 405 naming GET and HEAD; HEAD where no GET is served: 405 too.
        put = await client.put('/api/v1/conversations', headers=auth(keys.acme))
        assert (put.status_code, put.headers['allow']) == (405, 'GET, HEAD')
        post_only = await client.head('/api/v1/chat', headers=auth(keys.acme))
        assert (post_only.status_code, post_only.headers['allow']) == (405, 'POST')
