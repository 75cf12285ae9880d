"""`DELETE /api/v1/conversations/{id}` racing a turn that saves the conversation between the route's read and its
delete: without If-Match it deletes whatever revision is there (it was a 409 asking the caller, who named no revision,
to read again and retry); with If-Match naming the revision read, it is still a 409."""

from __future__ import annotations

import httpx2
import pytest
from pydantic_ai.conversation_store import ConversationRecord

from agentrt.agents.simple_chat import simple_chat
from agentrt.services.conversations import PostgresConversationStore
from tests.api.conftest import Keys, auth


def _turn_after_first_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The route's first read of the record returns it, then a turn saves the conversation (a new revision)."""
    read = PostgresConversationStore.read_record
    calls = 0

    async def read_then_turn(self: PostgresConversationStore, conversation_id: str) -> ConversationRecord | None:
        nonlocal calls
        calls += 1
        record = await read(self, conversation_id)
        if calls == 1:
            await simple_chat('Dermatologists in Boston', session_id=conversation_id, account='acme-health')
        return record

    monkeypatch.setattr(PostgresConversationStore, 'read_record', read_then_turn)


async def test_a_delete_without_if_match_deletes_the_revision_a_racing_turn_saved(
    keys: Keys, client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    turn = await client.post('/api/v1/conversations/raced/turns', json={'message': 'hi'}, headers=auth(keys.acme))
    assert turn.status_code == 200, turn.text
    _turn_after_first_read(monkeypatch)
    deleted = await client.delete('/api/v1/conversations/raced', headers=auth(keys.acme))
    assert deleted.status_code == 204, deleted.text
    assert (await client.get('/api/v1/conversations/raced', headers=auth(keys.acme))).status_code == 404


async def test_a_delete_with_if_match_of_the_revision_read_is_a_409_when_a_turn_saved_since(
    keys: Keys, client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    turn = await client.post('/api/v1/conversations/raced/turns', json={'message': 'hi'}, headers=auth(keys.acme))
    revision = (await client.get('/api/v1/conversations/raced', headers=auth(keys.acme))).json()['revision']
    assert turn.status_code == 200, turn.text
    _turn_after_first_read(monkeypatch)
    headers = auth(keys.acme) | {'If-Match': f'"{revision}"'}
    deleted = await client.delete('/api/v1/conversations/raced', headers=headers)
    assert deleted.status_code == 409, deleted.text
    assert (await client.get('/api/v1/conversations/raced', headers=auth(keys.acme))).status_code == 200
