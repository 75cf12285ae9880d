"""Every response of the app carries `Cache-Control: no-store` and `X-Content-Type-Options: nosniff` (an account's
data fetched with a bearer key, kept out of caches), JSON, errors and streams alike; the web UI's files keep their own
`Cache-Control`."""

from __future__ import annotations

import httpx2
import pytest
from fastapi import FastAPI

from agentrt.api.app import create_app
from agentrt.api.web_ui import WEB_UI_HEADERS
from tests.api.conftest import Keys, auth, chat_body


def assert_not_cached(response: httpx2.Response) -> None:
    assert response.headers['cache-control'] == 'no-store', response.headers
    assert response.headers['x-content-type-options'] == 'nosniff', response.headers


async def test_json_answers_and_refusals_are_not_to_be_cached(client: httpx2.AsyncClient, keys: Keys) -> None:
    assert_not_cached(await client.get('/api/v1/me', headers=auth(keys.acme)))  # 200
    assert_not_cached(await client.get('/api/v1/me'))  # 401, no key
    assert_not_cached(await client.get('/api/v1/conversations?limit=-1', headers=auth(keys.acme)))  # 422
    assert_not_cached(await client.get('/api/v1/conversations/%FF', headers=auth(keys.acme)))  # 422 before any route
    assert_not_cached(await client.get('/api/v1/no-such-route', headers=auth(keys.acme)))  # 404
    assert_not_cached(await client.get('/health/live'))


async def test_a_streamed_turn_is_not_to_be_cached(client: httpx2.AsyncClient, keys: Keys) -> None:
    body = chat_body('headers-stream', 'Find me cardiologists in Seattle who accept Medicare')
    async with client.stream('POST', '/api/v1/chat', json=body, headers=auth(keys.acme)) as response:
        assert response.status_code == 200
        assert response.headers['content-type'].startswith('text/event-stream')
        assert_not_cached(response)
        await response.aread()


@pytest.fixture
def app() -> FastAPI:
    return create_app(manage_runtime=False, web_ui=True)


async def test_the_web_ui_files_keep_their_own_cache_control(client: httpx2.AsyncClient) -> None:
    page = await client.get('/')
    assert page.status_code == 200
    assert page.headers['cache-control'] == WEB_UI_HEADERS['Cache-Control'] == 'no-cache'
    assert page.headers['x-content-type-options'] == 'nosniff'
