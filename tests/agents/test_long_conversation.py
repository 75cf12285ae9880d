"""Long conversations: 100 turns with the demo model, plain and streamed, every prompt within the context budget."""

from __future__ import annotations

import json
import time

import pytest
from pydantic_ai import ModelMessagesTypeAdapter

from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
from agentrt.db.engine import current_settings
from agentrt.services.background import get_supervisor
from agentrt.services.conversations import PostgresConversationStore, estimate_tokens
from agentrt.services.ledger import get_request_tracker
from tests.agents.conftest import account_id
from tests.factories import scalar

QUESTIONS = [
    'Find me cardiologists in Seattle who accept Medicare',
    'Dermatologists in Boston accepting new patients',
    'Pediatricians in Denver who speak Spanish',
    'Neurologists in Austin who accept Aetna',
]
BUDGET = 3_000


@pytest.fixture
def small_budget(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(current_settings(), 'context_max_tokens', BUDGET)
    monkeypatch.setattr(current_settings(), 'message_max_chars', 2_000)
    return BUDGET


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_hundred_turns_all_succeed_within_the_budget(
    demo_data: None, small_budget: int, streamed: bool
) -> None:
    t0 = time.perf_counter()
    for turn in range(100):
        question = QUESTIONS[turn % len(QUESTIONS)]
        if streamed:
            async with simple_chat_stream(question, session_id='long', account='acme-health') as stream:
                async for _ in stream:
                    pass
            assert stream.result is not None
            result = stream.result
        else:
            result = await simple_chat(question, session_id='long', account='acme-health')
        assert result.output.startswith('I found'), (turn, result.output)
        assert result.usage.requests == 3
    print('100 turns', time.perf_counter() - t0)
    await get_request_tracker().flush()
    await get_supervisor().join()
    assert result.conversation_usage.requests == 300

    store = PostgresConversationStore(await account_id('acme-health'))
    conversation = await store.load('long')
    assert conversation is not None and len(conversation.messages) == 600, 'the record keeps every message'
    assert conversation.usage.requests == 300

    prompts = await scalar(
        'SELECT json_agg(c.body ORDER BY r.started_at) FROM llm_requests r JOIN llm_request_contents c '
        "ON c.request_id = r.id AND c.kind = 'prompt' WHERE r.chat_session_id = 'long'"
    )
    sizes = []
    for body in prompts:
        sent = ModelMessagesTypeAdapter.validate_python(json.loads(body)['messages'])
        sizes.append(estimate_tokens(sent))
    print(sizes[:12], sizes[-6:], max(sizes))
    assert len(sizes) == 300
    assert max(sizes) <= small_budget
