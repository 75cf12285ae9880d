"""Fixtures of the HTTP API tests: the app (no lifespan: the suite's runtime is already up), API keys of the demo
accounts, an in-process client for JSON, and the app served by uvicorn on loopback for streaming and disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest
import uvicorn
from fastapi import FastAPI
from logfire.testing import capfire  # noqa: F401 - the fixture, here rather than through logfire's pytest plugin

from agentrt.api.app import create_app
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.api_keys import create_api_key, forget_cached_api_keys
from tests.conftest import TEST_MAX_OVERFLOW, TEST_POOL_SIZE

TEST_POOL_OUT = {'size': TEST_POOL_SIZE, 'max_overflow': TEST_MAX_OVERFLOW}
"""What `/health/ready` reports of the suite's pool."""


@dataclass(frozen=True)
class Keys:
    """Keys of the two demo accounts: `acme` and `green` with both scopes, and one-scope keys of acme."""

    acme: str
    green: str
    acme_read_only: str
    acme_chat_only: str


def auth(key: str) -> dict[str, str]:
    """The header that carries `key`."""
    return {'Authorization': f'Bearer {key}'}


@pytest.fixture
async def keys(demo_data: None) -> Keys:
    forget_cached_api_keys()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        made = [
            await create_api_key(session=session, account='acme-health', name='acme'),
            await create_api_key(session=session, account='green-grocer', name='green'),
            await create_api_key(session=session, account='acme-health', name='reader', scopes=['read']),
            await create_api_key(session=session, account='acme-health', name='chatter', scopes=['chat']),
        ]
    return Keys(*(key.token for key in made))


@pytest.fixture
def app() -> FastAPI:
    return create_app(manage_runtime=False)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx2.AsyncClient]:
    """In-process client: the whole response is buffered (for JSON, and streams read to their end)."""
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx2.AsyncClient(transport=transport, base_url='http://test', timeout=30) as client:
        yield client


async def serve(app: FastAPI) -> AsyncIterator[str]:
    """Serve `app` with uvicorn on a free loopback port in this event loop; yield its base URL."""
    config = uvicorn.Config(app, host='127.0.0.1', port=0, lifespan='off', log_level='warning', access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f'http://127.0.0.1:{port}'
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def live_url(app: FastAPI) -> AsyncIterator[str]:
    async for url in serve(app):
        yield url


def chat_body(conversation_id: str, text: str, message_id: str = 'm1', **extra: Any) -> dict[str, Any]:
    """A Vercel AI SDK `useChat` body with one new user message."""
    message = {'id': message_id, 'role': 'user', 'parts': [{'type': 'text', 'text': text}]}
    return {'trigger': 'submit-message', 'id': conversation_id, 'messages': [message], **extra}


def chat_scope(key: str, body: bytes, *, spec_version: str = '2.3') -> dict[str, Any]:
    """The ASGI scope of a `POST /api/v1/chat` carrying `body` with `key`, for a test that calls the app with a `send`
    of its own (a client that stops reading, or is cut off mid-send)."""
    return {
        'type': 'http', 'asgi': {'version': '3.0', 'spec_version': spec_version}, 'http_version': '1.1',
        'method': 'POST', 'scheme': 'http', 'path': '/api/v1/chat', 'raw_path': b'/api/v1/chat', 'root_path': '',
        'query_string': b'', 'server': ('test', 80), 'client': ('127.0.0.1', 5000),
        'headers': [
            (b'host', b'test'), (b'content-type', b'application/json'),
            (b'content-length', str(len(body)).encode()), (b'authorization', f'Bearer {key}'.encode()),
        ],
    }  # fmt: skip


def agui_body(thread: str, text: str) -> dict[str, object]:
    """An AG-UI `RunAgentInput` body with one user message (no client tools, no context)."""
    return {
        'threadId': thread,
        'runId': 'r1',
        'messages': [{'id': 'u1', 'role': 'user', 'content': text}],
        'tools': [],
        'context': [],
    }


def sse_events(body: str) -> list[dict[str, Any] | str]:
    """The `data:` events of a server-sent event stream (JSON decoded; `[DONE]` kept as text)."""
    events: list[dict[str, Any] | str] = []
    for line in body.splitlines():
        if line.startswith('data: '):
            data = line[len('data: ') :]
            events.append(data if data == '[DONE]' else json.loads(data))
    return events


async def stream_chat(
    client: httpx2.AsyncClient,
    key: str,
    body: dict[str, Any],
    *,
    stop: Callable[[dict[str, Any] | str], bool] | None = None,
    path: str = '/api/v1/chat',
) -> tuple[int, list[dict[str, Any] | str]]:
    """POST a chat turn and read its events as they arrive; with `stop`, hang up after the first event it accepts. A
    refused turn's events are its error body (`{'type': 'http-error', ...}`), so a failing test shows it."""
    events: list[dict[str, Any] | str] = []
    async with client.stream('POST', path, json=body, headers=auth(key)) as response:
        if response.status_code >= 400:
            return response.status_code, [{'type': 'http-error', 'body': (await response.aread()).decode()[:500]}]
        async for line in response.aiter_lines():
            if not line.startswith('data: '):
                continue
            data = line[len('data: ') :]
            events.append(data if data == '[DONE]' else json.loads(data))
            if stop is not None and stop(events[-1]):
                break
        return response.status_code, events


def of_type(events: list[dict[str, Any] | str], kind: str) -> list[dict[str, Any]]:
    """The events of one `type`."""
    return [event for event in events if isinstance(event, dict) and event.get('type') == kind]
