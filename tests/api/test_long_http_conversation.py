"""Long conversations over HTTP (`-m slow`): 150 turns on one conversation through each chat route (Vercel AI, AG-UI,
the non-streamed turn), the Vercel client sending its whole history each turn as the AI SDK's `useChat` does.

Every turn succeeds; at the end the record keeps every message in one chain, each model request has exactly one ledger
row (with its prompt and response stored), no claim is left, and the conversation has a title and a summary."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest

from agentrt.services.background import get_supervisor
from agentrt.services.conversations import PostgresConversationStore
from agentrt.services.ledger import get_request_tracker
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, auth, chat_body, of_type, stream_chat
from tests.factories import scalar

pytestmark = pytest.mark.slow

TURNS = 150
QUESTIONS = [
    'Find me cardiologists in Seattle who accept Medicare',
    'Dermatologists in Boston accepting new patients',
    'Pediatricians in Denver who speak Spanish',
    'Neurologists in Austin who accept Aetna',
]
CONTENTS = (
    'SELECT count(*) FROM llm_request_contents c JOIN llm_requests r ON r.id = c.request_id '
    'WHERE r.chat_session_id = :s'
)


async def _turn(client: httpx2.AsyncClient, key: str, route: str, n: int, history: list[dict[str, Any]]) -> None:
    question = f'{QUESTIONS[n % len(QUESTIONS)]} ({n})'
    if route == 'vercel':
        body = chat_body(route, question, f'm{n}')
        history.append(body['messages'][0])
        body['messages'] = list(history)
        status, events = await stream_chat(client, key, body)
        assert status == 200 and events[-1] == '[DONE]' and not of_type(events, 'error'), (n, events[-3:])
        text = ''.join(event['delta'] for event in of_type(events, 'text-delta'))
        history.append({'id': f'a{n}', 'role': 'assistant', 'parts': [{'type': 'text', 'text': text}]})
    elif route == 'ag-ui':
        body = {'threadId': route, 'runId': f'r{n}', 'messages': [{'id': f'u{n}', 'role': 'user', 'content': question}]}
        response = await client.post('/api/v1/chat/ag-ui', json=body | {'tools': [], 'context': []}, headers=auth(key))
        assert response.status_code == 200 and 'RUN_FINISHED' in response.text and 'RUN_ERROR' not in response.text
    else:
        response = await client.post(
            f'/api/v1/conversations/{route}/turns', json={'message': question}, headers=auth(key)
        )
        assert response.status_code == 200, (n, response.text)


@pytest.mark.parametrize('route', ['vercel', 'ag-ui', 'turns'])
async def test_a_long_conversation_over_each_chat_route_keeps_every_turn_and_bills_each_request_once(
    keys: Keys, client: httpx2.AsyncClient, route: str
) -> None:
    history: list[dict[str, Any]] = []
    for n in range(TURNS):
        await _turn(client, keys.acme, route, n, history)
    await get_request_tracker().flush()
    await get_supervisor().join()

    stored = await PostgresConversationStore(await account_id('acme-health')).load(route)
    assert stored is not None
    prompts = [part.content for m in stored.messages for part in m.parts if part.part_kind == 'user-prompt']
    assert prompts == [f'{QUESTIONS[n % len(QUESTIONS)]} ({n})' for n in range(TURNS)]
    requests = stored.usage.requests
    assert requests == 3 * TURNS
    assert await scalar('SELECT count(*) FROM llm_requests WHERE chat_session_id = :s', s=route) == requests
    assert await scalar('SELECT count(DISTINCT id) FROM llm_requests WHERE chat_session_id = :s', s=route) == requests
    assert await scalar("SELECT count(*) FROM llm_requests WHERE status <> 'complete'") == 0
    assert await scalar(CONTENTS, s=route) == 2 * requests  # a prompt and a response each
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0
    titled = 'SELECT count(*) FROM conversations WHERE title IS NOT NULL AND summary IS NOT NULL'
    assert await scalar(titled) == 1
