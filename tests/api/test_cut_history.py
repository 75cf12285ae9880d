"""A conversation forked between a tool call and its result (`store.fork(..., at=2)`): a turn on it over HTTP is a
422 naming `session_id` on every route, not a 500 with pydantic-ai's UserError and a traceback in the server log."""

from __future__ import annotations

import httpx2
from sqlalchemy import text

from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.conversations import PostgresConversationStore
from tests.api.conftest import Keys, auth

CUT = 'ends with tool calls without their results'


async def test_a_turn_on_a_history_cut_after_tool_calls_is_a_422_on_every_route(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    first = await client.post(
        '/api/v1/conversations/src/turns', json={'message': 'Cardiologists in Seattle'}, headers=auth(keys.acme)
    )
    assert first.status_code == 200, first.text
    async with get_db_session(account=Unscoped.ADMIN) as session:
        account = (await session.execute(text("SELECT id FROM accounts WHERE slug = 'acme-health'"))).scalar_one()
    await PostgresConversationStore(account).fork('src', at=2, new_conversation_id='cut')

    turn = await client.post('/api/v1/conversations/cut/turns', json={'message': 'hi'}, headers=auth(keys.acme))
    assert turn.status_code == 422 and CUT in turn.json()['detail'], turn.text
    body = {
        'trigger': 'submit-message',
        'id': 'cut',
        'messages': [{'id': 'm1', 'role': 'user', 'parts': [{'type': 'text', 'text': 'hi'}]}],
    }
    chat = await client.post('/api/v1/chat', json=body, headers=auth(keys.acme))
    assert chat.status_code == 422 and CUT in chat.json()['detail'], chat.text
    run = {
        'threadId': 'cut',
        'runId': 'r1',
        'state': None,
        'messages': [{'id': 'm1', 'role': 'user', 'content': 'hi'}],
        'tools': [],
        'context': [],
        'forwardedProps': None,
    }
    agui = await client.post('/api/v1/chat/ag-ui', json=run, headers=auth(keys.acme))
    assert agui.status_code == 422 and CUT in agui.json()['detail'], agui.text
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = (await session.execute(text("SELECT count(*) FROM llm_requests WHERE conversation_id = 'cut'"))).scalar()
    assert rows == 0
