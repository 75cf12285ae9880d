"""A large chat body (a client's copy of a long history) is parsed in a worker thread, not on the event loop, on both
streamed chat routes; a small one on the loop. Its errors are the same either way."""

from __future__ import annotations

import threading
from typing import Any

import httpx2
import pytest

from agentrt.api import turn_input
from tests.api.conftest import Keys, auth

EARLIER = [{'id': f'e{n}', 'role': 'user', 'parts': [{'type': 'text', 'text': 'x'}]} for n in range(3_000)]
"""Earlier messages of many tiny objects: a body past `OFF_LOOP_BODY_BYTES` that is Python's work to parse."""


def _vercel(conversation_id: str, earlier: list[dict[str, Any]], text: str = 'Dermatologists in Boston') -> Any:
    last = {'id': 'last', 'role': 'user', 'parts': [{'type': 'text', 'text': text}]}
    return {'trigger': 'submit-message', 'id': conversation_id, 'messages': [*earlier, last]}


def _agui(conversation_id: str, earlier: list[dict[str, Any]]) -> Any:
    messages = [{'id': m['id'], 'role': 'user', 'content': 'x'} for m in earlier]
    last = {'id': 'last', 'role': 'user', 'content': 'Dermatologists in Boston'}
    return {
        'threadId': conversation_id,
        'runId': 'r1',
        'state': None,
        'messages': [*messages, last],
        'tools': [],
        'context': [],
        'forwardedProps': None,
    }


@pytest.mark.parametrize('route', ['/api/v1/chat', '/api/v1/chat/ag-ui'])
async def test_a_large_body_is_parsed_off_the_event_loop_and_a_small_one_on_it(
    keys: Keys, client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    threads: list[str] = []
    parse = turn_input.parse_run_input

    def noting(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return parse(*args, **kwargs)

    monkeypatch.setattr(turn_input, 'parse_run_input', noting)
    body = _vercel if route == '/api/v1/chat' else _agui
    for conversation_id, earlier in (('small-body', EARLIER[:2]), ('large-body', EARLIER)):
        payload = body(f'{conversation_id}-{route.count("/")}', earlier)
        assert (len(httpx2.Request('POST', 'http://x', json=payload).content) > turn_input.OFF_LOOP_BODY_BYTES) == (
            earlier is EARLIER
        )
        response = await client.post(route, json=payload, headers=auth(keys.acme))
        assert response.status_code == 200, response.text
        assert 'Boston' in response.text  # the turn ran on the last message
    assert threads[0] == threading.current_thread().name  # the small body: on the loop's thread
    assert threads[1].startswith('agentrt-conversation-read')  # the large one: in a worker thread


async def test_a_large_bodys_error_is_the_same_from_the_worker_thread(keys: Keys, client: httpx2.AsyncClient) -> None:
    payload = _vercel('large-bad', EARLIER, text='')
    payload['messages'][-1]['parts'][0]['type'] = 'hologram'
    response = await client.post('/api/v1/chat', json=payload, headers=auth(keys.acme))
    assert response.status_code == 422, response.text
    assert response.json()['field'].startswith('messages'), response.json()
    twice = b'{"trigger": "submit-message", "id": "large-twice", "trigger": "x", "messages": [' + b' ' * 70_000 + b']}'
    response = await client.post(
        '/api/v1/chat', content=twice, headers={**auth(keys.acme), 'Content-Type': 'application/json'}
    )
    assert response.status_code == 422 and 'trigger' in response.json()['field'], response.text


@pytest.mark.parametrize('route', ['/api/v1/chat', '/api/v1/chat/ag-ui'])
async def test_a_last_message_or_body_of_too_many_values_is_a_422_before_it_is_validated(
    keys: Keys, client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    # pydantic validates what a turn reads of its body in one call that holds the GIL: a last message of 150,000
    # empty text parts (3.9 MB) held the event loop 5 s, even from the worker thread (QA). The earlier messages are
    # cut before it, so a long history is not counted.
    built: list[int] = []
    parse = turn_input.parse_run_input

    def noting(request: Any, body: bytes, build: Any, **kwargs: Any) -> Any:
        return parse(request, body, lambda cut: built.append(len(cut)) or build(cut), **kwargs)

    monkeypatch.setattr(turn_input, 'parse_run_input', noting)
    many = turn_input.MAX_TURN_BODY_VALUES
    if route == '/api/v1/chat':
        payload = _vercel('many-parts', EARLIER)
        payload['messages'][-1]['parts'] = [{'type': 'text', 'text': ''}] * (many // 3) + [
            {'type': 'text', 'text': 'Dermatologists in Boston'}
        ]
        field = f'messages.{len(EARLIER)}'
    else:
        payload = _agui('many-tools', EARLIER)
        payload['tools'] = [{'name': f't{n}', 'description': '', 'parameters': {}} for n in range(many // 4)]
        field = 'body'
    response = await client.post(route, json=payload, headers=auth(keys.acme))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body['field'] == field and f'more than {many:,} JSON values' in body['detail'], body
    assert built == [], 'refused before the adapter validated anything'
    # The same history with a last message of ordinary size runs.
    fine = (_vercel if route == '/api/v1/chat' else _agui)(f'few-values-{route.count("/")}', EARLIER)
    response = await client.post(route, json=fine, headers=auth(keys.acme))
    assert response.status_code == 200 and 'Boston' in response.text and len(built) == 1


async def test_a_large_json_turn_body_is_parsed_off_the_event_loop_once(
    keys: Keys, client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FastAPI parsed the JSON turn's body on the event loop, and the duplicate-key check parsed it again there: a
    # 4 MB body of 240,000 tiny objects held the loop 2-5 s before its extra key was refused (QA).
    threads: list[str] = []
    loads = turn_input.loads_with_unique_keys

    def noting(text: Any) -> Any:
        threads.append(threading.current_thread().name)
        return loads(text)

    monkeypatch.setattr(turn_input, 'loads_with_unique_keys', noting)
    padding = [{'a': [{}, {}, {}]}] * 5_000
    path = '/api/v1/conversations/large-json-turn/turns'
    extra = await client.post(path, json={'message': 'hi', 'x': padding}, headers=auth(keys.acme))
    assert extra.status_code == 422 and extra.json()['field'] == 'x', extra.text
    assert len(threads) == 1 and threads[0] != threading.current_thread().name, threads  # once, in a worker thread
    twice = b'{"message": "a", "message": "b", "pad": "' + b' ' * 70_000 + b'"}'
    response = await client.post(path, content=twice, headers={**auth(keys.acme), 'Content-Type': 'application/json'})
    assert response.status_code == 422 and response.json()['field'] == 'message', response.text
    small = await client.post(path, json={'message': 'Dermatologists in Boston'}, headers=auth(keys.acme))
    assert small.status_code == 200 and threads[-1] == threading.current_thread().name  # a small body: on the loop
    broken = await client.post(
        path, content=b'{"message":', headers={**auth(keys.acme), 'Content-Type': 'application/json'}
    )
    assert broken.status_code == 422 and broken.json()['field'] == 'body', broken.text  # not the offset: "11"
