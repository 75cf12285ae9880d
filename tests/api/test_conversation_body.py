"""`GET /api/v1/conversations/{id}`'s body made off the event loop: the same bytes FastAPI encoded from the
`ConversationMessages` the route returned before, and its CPU work (validation, dumps, encoding) in worker threads."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from pydantic import TypeAdapter
from pydantic_ai.messages import ModelMessagesTypeAdapter

from agentrt.api import conversations as conversations_route
from agentrt.api.cursors import encode_message_cursor
from agentrt.api.schemas import ConversationMessages
from agentrt.api.vercel_messages import vercel_messages
from agentrt.services.conversations import PostgresConversationStore, _off_loop, _store, load_page
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, auth

PATH = '/api/v1/conversations/body'
QUESTIONS = [
    'Cardiologists in Seattle',
    'Dermatologen in München? «ja» — 東京 too 🙂',
    'Quote " backslash \\ and "messages":[] in the text',
]


async def _turns(client: httpx2.AsyncClient, key: str, path: str) -> None:
    for question in QUESTIONS:
        response = await client.post(f'{path}/turns', json={'message': question}, headers=auth(key))
        assert response.status_code == 200, response.text


async def _fastapi_body(conversation_id: str, format: str, limit: int | None) -> bytes:
    """What the route returned before (a `ConversationMessages`), as FastAPI encoded it: its response model's
    `dump_json`, by alias."""
    account = await account_id('acme-health')
    page = await load_page(PostgresConversationStore(account), conversation_id, limit=limit)
    assert page is not None
    dumped = (
        vercel_messages(page)
        if format == 'vercel'
        else ModelMessagesTypeAdapter.dump_python(page.messages, mode='json')
    )
    model = ConversationMessages(
        conversation_id=conversation_id,
        revision=page.revision,
        title=page.title,
        format=format,  # type: ignore[arg-type]
        messages=dumped,
        earlier=page.earlier is not None,
        earlier_cursor=(
            encode_message_cursor(page.earlier, conversation_id=conversation_id, account_id=account)
            if page.earlier is not None
            else None
        ),
    )
    return TypeAdapter(ConversationMessages).dump_json(model, by_alias=True)


@pytest.mark.parametrize('format', ['vercel', 'pydantic'])
async def test_the_body_is_byte_for_byte_what_fastapi_encoded(
    keys: Keys, client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch, format: str
) -> None:
    path = f'{PATH}-{format}'
    await _turns(client, keys.acme, path)
    monkeypatch.setattr(_off_loop, 'CHUNK_CHARS', 1)  # every message validated by a call of its own
    for limit in (None, 3):
        params: dict[str, Any] = {'format': format} | ({'limit': limit} if limit else {})
        response = await client.get(path, params=params, headers=auth(keys.acme))
        assert response.status_code == 200, response.text
        assert response.headers['content-type'] == 'application/json'
        assert response.content == await _fastapi_body(path.rsplit('/', 1)[1], format, limit)
        assert response.json()['earlier'] is (limit is not None)


def _recording(original: Callable[..., Any], threads: list[threading.Thread]) -> Callable[..., Any]:
    def recorded(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    return recorded


async def test_the_messages_are_validated_and_encoded_off_the_event_loop(
    keys: Keys, client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = f'{PATH}-threads'
    await _turns(client, keys.acme, path)
    loop_thread = threading.current_thread()  # the event loop's: the in-process client runs the app here
    validated: list[threading.Thread] = []
    encoded: list[threading.Thread] = []
    monkeypatch.setattr(_store, 'stored_tail', _recording(_store.stored_tail, validated))
    monkeypatch.setattr(conversations_route, 'messages_body', _recording(conversations_route.messages_body, encoded))
    freed: list[threading.Thread] = []
    load = conversations_route.load_page

    async def watched_load(*args: Any, **kwargs: Any) -> Any:
        page = await load(*args, **kwargs)
        weakref.finalize(page, lambda: freed.append(threading.current_thread()))
        return page

    monkeypatch.setattr(conversations_route, 'load_page', watched_load)
    response = await client.get(path, headers=auth(keys.acme))
    assert response.status_code == 200 and len(response.json()['messages']) >= 2 * len(QUESTIONS)
    assert validated and encoded
    assert all(thread is not loop_thread for thread in validated + encoded)
    assert len(freed) == 1 and freed[0] is not loop_thread  # the page was freed in the worker thread too
    assert {thread.name.rsplit('_', 1)[0] for thread in validated + encoded + freed} == {'agentrt-conversation-read'}
