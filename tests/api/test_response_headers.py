"""Every response of the app carries `Cache-Control: no-store` and `X-Content-Type-Options: nosniff` (an account's
data fetched with a bearer key, kept out of caches), JSON, errors and streams alike; the web UI's files keep their own
`Cache-Control`."""

from __future__ import annotations

import httpx2
import pytest
from fastapi import FastAPI

from agentrt.api.app import create_app
from agentrt.api.response_headers import relative_location
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


@pytest.mark.parametrize('web_ui', [True, False], ids=['web UI', 'API only'])
async def test_a_trailing_slash_redirect_names_no_host_from_the_request(web_ui: bool) -> None:
    # Starlette's redirect wrote the Host header into its Location: `Host: evil.example` answered
    # `location: http://evil.example/api/v1/me`, a client sent to whichever host the request named.
    app = create_app(manage_runtime=False, web_ui=web_ui)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url='http://test') as client:
        for path, target in [
            ('/api/v1/me/', '/api/v1/me'),
            ('/api/v1/conversations/?limit=5', '/api/v1/conversations?limit=5'),
            ('/health/live/', '/health/live'),
        ]:
            response = await client.get(path, headers={'Host': 'evil.example'})
            assert (response.status_code, response.headers['location']) == (307, target), path
    # Mounted in another app under a prefix, the path keeps it.
    outer = FastAPI()
    outer.mount('/agent', create_app(manage_runtime=False, web_ui=False))
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=outer), base_url='http://test') as client:
        response = await client.get('/agent/api/v1/me/', headers={'Host': 'evil.example:8080'})
        assert (response.status_code, response.headers['location']) == (307, '/agent/api/v1/me')


def test_only_a_location_naming_this_server_is_made_a_path() -> None:
    scope = {'type': 'http', 'scheme': 'http', 'server': ('127.0.0.1', 8000), 'path': '/x/', 'query_string': b''}
    scope['headers'] = [(b'host', b'evil.example')]
    assert relative_location('http://evil.example/x?a=1', scope) == '/x?a=1'
    assert relative_location('http://evil.example//other.example/', scope) == '/%2Fother.example/'
    assert relative_location('https://evil.example/x', scope) == 'https://evil.example/x'  # not this scheme
    assert relative_location('https://docs.example/page', scope) == 'https://docs.example/page'
    assert relative_location('/already/a/path', scope) == '/already/a/path'
