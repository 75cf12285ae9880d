"""`GET /api/v1/conversations/{id}` paged back with `limit` and `before`: the walk, each bad position, isolation."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx2

from agentrt.api.cursors import encode_message_cursor
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, auth

PATH = '/api/v1/conversations/pages'
QUESTIONS = ['Cardiologists in Seattle', 'Dermatologists in Boston', 'Neurologists in Austin']


async def _turns(client: httpx2.AsyncClient, key: str, path: str, questions: list[str]) -> None:
    for question in questions:
        response = await client.post(f'{path}/turns', json={'message': question}, headers=auth(key))
        assert response.status_code == 200, response.text


async def _get(client: httpx2.AsyncClient, key: str, path: str = PATH, **params: Any) -> httpx2.Response:
    return await client.get(path, params=params, headers=auth(key))


async def test_a_conversation_is_paged_back_to_its_start_while_it_goes_on(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    await _turns(client, keys.acme, PATH, QUESTIONS)
    whole = (await _get(client, keys.acme, format='pydantic')).json()
    assert whole['earlier'] is False and whole['earlier_cursor'] is None
    per_turn = len(whole['messages']) // 3
    latest = (await _get(client, keys.acme, format='pydantic', limit=per_turn + 1)).json()
    assert latest['messages'] == whole['messages'][-per_turn:] and latest['earlier'] is True
    await _turns(client, keys.acme, PATH, ['Pediatricians in Denver'])  # a turn saved while the reader pages back
    pages, cursor = [latest['messages']], latest['earlier_cursor']
    while cursor is not None:
        page = (await _get(client, keys.acme, format='pydantic', limit=per_turn + 1, before=cursor)).json()
        assert page['earlier'] is (page['earlier_cursor'] is not None)
        pages.insert(0, page['messages'])
        cursor = page['earlier_cursor']
    assert len(pages) == 3 and [m for page in pages for m in page] == whole['messages']
    # The AI SDK format pages the same way: the first page's earlier_cursor reads the turn before, whole.
    vercel = (await _get(client, keys.acme, limit=per_turn)).json()
    before = (await _get(client, keys.acme, limit=per_turn, before=vercel['earlier_cursor'])).json()
    user_texts = [p['text'] for m in before['messages'] if m['role'] == 'user' for p in m['parts']]
    assert user_texts == QUESTIONS[2:] and before['earlier'] is True


async def test_each_ai_sdk_message_keeps_one_id_on_every_page_and_in_every_read(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    # The ids were `<run_id>-<index in the page>`: pages shorter than a turn gave two messages one id, and a page read
    # again after a turn gave every message another id.
    path = f'{PATH}-ids'
    await _turns(client, keys.acme, path, QUESTIONS)
    whole = (await _get(client, keys.acme, path)).json()['messages']
    assert len({message['id'] for message in whole}) == len(whole)
    for limit in (2, 3):  # each turn is cut across two or more pages
        pages: list[list[dict[str, Any]]] = []
        params: dict[str, Any] = {'limit': limit}
        while True:
            page = (await _get(client, keys.acme, path, **params)).json()
            pages.insert(0, page['messages'])
            if page['earlier_cursor'] is None:
                break
            params['before'] = page['earlier_cursor']
        assert len(pages) > len(QUESTIONS) and [message for page in pages for message in page] == whole
    latest = (await _get(client, keys.acme, path, limit=4)).json()['messages']
    await _turns(client, keys.acme, path, ['Pediatricians in Denver'])
    after = (await _get(client, keys.acme, path)).json()['messages']
    assert after[: len(whole)] == whole and all(message in after for message in latest)


def _raw(data: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip('=')


async def test_each_bad_position_is_422_naming_before(keys: Keys, client: httpx2.AsyncClient) -> None:
    await _turns(client, keys.acme, PATH, QUESTIONS[:1])
    acme, green = await account_id('acme-health'), await account_id('green-grocer')
    listing = (await client.get('/api/v1/conversations', params={'limit': 1}, headers=auth(keys.acme))).json()
    assert listing['next_cursor'] is not None
    other = (await _get(client, keys.acme, limit=1)).json()['earlier_cursor']
    entry = json.loads(base64.urlsafe_b64decode(other + '=' * (-len(other) % 4)))[3]
    bad = {
        'garbage!': 'not a position',
        _raw({'a': 1}): 'not a position',
        _raw(['messages', acme, 'pages']): 'not a position',
        _raw(['messages', str(acme), 'pages', entry]): 'not a position',
        _raw(['messages', acme, 'pages', '']): 'not a position',
        _raw(['messages', acme, 'pages', 'a\x00b']): 'not a position',
        'A' * 601: None,  # FastAPI's own check of the length: its words
        listing['next_cursor']: "a listing's next_cursor",
        encode_message_cursor(entry, conversation_id='pages', account_id=green): "another account's",
        encode_message_cursor(entry, conversation_id='another', account_id=acme): 'another conversation',
        encode_message_cursor('gone', conversation_id='pages', account_id=acme): 'not in the conversation',
        encode_message_cursor('x' * 500, conversation_id='pages', account_id=acme): None,
    }
    for cursor, words in bad.items():
        response = await _get(client, keys.acme, limit=1, before=cursor)
        body = response.json()
        assert response.status_code == 422 and body['error_id'].startswith('err_'), (cursor, body)
        assert 'before' in json.dumps(body), (cursor, body)
        if words is not None:
            assert body['field'] == 'before' and words in body['detail'], (cursor, body)


async def test_another_accounts_conversation_is_not_found_with_or_without_a_position(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    await _turns(client, keys.acme, PATH, QUESTIONS[:2])
    page = (await _get(client, keys.acme, limit=1)).json()
    assert (await _get(client, keys.green, limit=1)).status_code == 404
    # acme's position, made for green's account (as green's own page of a conversation of that id would be): green
    # has no such conversation, and no such entry.
    green = await account_id('green-grocer')
    entry = json.loads(base64.urlsafe_b64decode(page['earlier_cursor'] + '=' * (-len(page['earlier_cursor']) % 4)))[3]
    forged = encode_message_cursor(entry, conversation_id='pages', account_id=green)
    assert (await _get(client, keys.green, limit=1, before=forged)).status_code == 404
    await _turns(client, keys.green, PATH, QUESTIONS[:1])  # now green has a conversation of that id
    refused = await _get(client, keys.green, limit=1, before=forged)
    assert refused.status_code == 422 and refused.json()['field'] == 'before', refused.text
    # acme's own cursor with green's key: made for another account.
    mine = await _get(client, keys.green, limit=1, before=page['earlier_cursor'])
    assert mine.status_code == 422 and "another account's" in mine.json()['detail']
