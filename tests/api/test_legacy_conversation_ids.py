"""A conversation whose id an earlier agentrt stored before the id rules came (before 2026-12-01 a session id was any
text: `café au lait`, `team/alice`): it is listed, so it opens, pages back and deletes over HTTP; a new turn on it is
still refused."""

from __future__ import annotations

from urllib.parse import quote

import httpx2
import pytest
from sqlalchemy import text

from agentrt.db.session import Unscoped, get_db_session
from tests.api.conftest import Keys, auth


async def _legacy_conversation(client: httpx2.AsyncClient, key: str, legacy: str) -> list[object]:
    """Two turns saved under an allowed id, then renamed to `legacy` as the old version had it: its messages."""
    for question in ('Cardiologists in Seattle', 'Dermatologists in Boston'):
        response = await client.post(
            '/api/v1/conversations/legacy-src/turns', json={'message': question}, headers=auth(key)
        )
        assert response.status_code == 200, response.text
    saved = await client.get('/api/v1/conversations/legacy-src', params={'format': 'pydantic'}, headers=auth(key))
    async with get_db_session(account=Unscoped.ADMIN) as session:
        renamed = await session.execute(
            text("UPDATE conversations SET conversation_id = :legacy WHERE conversation_id = 'legacy-src'"),
            {'legacy': legacy},
        )
        assert renamed.rowcount == 1
    messages: list[object] = saved.json()['messages']
    return messages


@pytest.mark.parametrize('legacy', ['café au lait', 'team/alice'])
async def test_a_conversation_with_an_id_from_before_the_rules_opens_pages_and_deletes(
    legacy: str, keys: Keys, client: httpx2.AsyncClient
) -> None:
    messages = await _legacy_conversation(client, keys.acme, legacy)
    listed = (await client.get('/api/v1/conversations', headers=auth(keys.acme))).json()['items']
    assert legacy in [item['conversation_id'] for item in listed]
    path = f'/api/v1/conversations/{quote(legacy, safe="")}'  # as the web UI sends it (encodeURIComponent)
    whole = await client.get(path, params={'format': 'pydantic'}, headers=auth(keys.acme))
    assert whole.status_code == 200, whole.text
    assert whole.json()['conversation_id'] == legacy and whole.json()['messages'] == messages
    assert (await client.get(path, headers=auth(keys.acme))).status_code == 200  # the web UI's format, vercel
    latest = (await client.get(path, params={'format': 'pydantic', 'limit': 2}, headers=auth(keys.acme))).json()
    earlier = await client.get(
        path, params={'format': 'pydantic', 'limit': 100, 'before': latest['earlier_cursor']}, headers=auth(keys.acme)
    )
    assert earlier.status_code == 200, earlier.text
    assert earlier.json()['messages'] + latest['messages'] == messages
    # Another account's key does not see it; a new turn on it is still refused by the rules, before any I/O.
    assert (await client.get(path, headers=auth(keys.green))).status_code == 404
    turn = await client.post(f'{path}/turns', json={'message': 'hi'}, headers=auth(keys.acme))
    assert turn.status_code == 422 and 'not allowed' in turn.json()['detail'], turn.text
    deleted = await client.delete(path, headers=auth(keys.acme))
    assert deleted.status_code == 204, deleted.text
    assert (await client.get(path, headers=auth(keys.acme))).status_code == 404


async def test_an_id_outside_the_rules_that_was_never_stored_is_not_found(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    for path in ('/api/v1/conversations/a%20b', '/api/v1/conversations/-x', '/api/v1/conversations/a%07b'):
        for method in ('GET', 'DELETE'):
            response = await client.request(method, path, headers=auth(keys.acme))
            assert response.status_code == 404 and response.json()['type'] == 'not_found', (method, path, response.text)
    turns = await client.get('/api/v1/conversations/x/turns', headers=auth(keys.acme))  # the turn route is POST only
    assert turns.status_code == 405, turns.text
    # What no version could store stays a 422 naming the id: too long, a NUL.
    for path in (f'/api/v1/conversations/{"c" * 201}', '/api/v1/conversations/a%00b'):
        response = await client.get(path, headers=auth(keys.acme))
        assert response.status_code == 422, (path, response.text)


@pytest.mark.parametrize('conversation_id', ['turns', 'turns-1', 'my-turns'])
async def test_a_conversation_named_turns_opens_continues_and_deletes(
    conversation_id: str, keys: Keys, client: httpx2.AsyncClient
) -> None:
    # The id route's `(?<!/turns)` also saw the `/` before the id: `turns` was created (by /chat) and listed, and then
    # every route redirected it to `turns/` and answered 404 or 405.
    path = f'/api/v1/conversations/{conversation_id}'
    for question in ('Cardiologists in Seattle', 'Dermatologists in Boston'):  # the turn route, created and continued
        turn = await client.post(f'{path}/turns', json={'message': question}, headers=auth(keys.acme))
        assert turn.status_code == 200, turn.text
    opened = await client.get(path, params={'format': 'pydantic'}, headers=auth(keys.acme), follow_redirects=False)
    assert opened.status_code == 200, opened.text
    assert opened.json()['conversation_id'] == conversation_id and len(opened.json()['messages']) >= 4
    assert (await client.get(f'{path}/turns', headers=auth(keys.acme))).status_code == 405  # the turn route's, POST
    deleted = await client.delete(path, headers=auth(keys.acme), follow_redirects=False)
    assert deleted.status_code == 204, deleted.text
    assert (await client.get(path, headers=auth(keys.acme))).status_code == 404
