"""A race of writers on one conversation revision, shared by the store's own tests and the pooler's."""

from __future__ import annotations

import asyncio

from pydantic_ai import ModelRequest, ModelResponse, TextPart, UserPromptPart
from pydantic_ai.conversation_store import ConversationConflict, ConversationEntry, ConversationRecord

from agentrt.services.conversations import PostgresConversationStore


async def assert_one_writer_wins(store: PostgresConversationStore, writers: int) -> None:
    """Save conversation 'c', then let `writers` concurrent saves expect its revision: exactly one wins, every other
    gets `ConversationConflict`, and the stored revision is the winner's."""
    first = ConversationEntry(parent_id=None, message=ModelRequest(parts=[UserPromptPart('hi')]))
    base = ConversationRecord(conversation_id='c', head_id=first.id)
    await store.write_record(base, new_entries=[first], expected_revision=None)

    async def write(i: int) -> str:
        entry = ConversationEntry(parent_id=first.id, message=ModelResponse(parts=[TextPart(f'writer {i}')]))
        record = ConversationRecord(conversation_id='c', head_id=entry.id)
        await store.write_record(record, new_entries=[entry], expected_revision=base.revision)
        return record.revision

    outcomes = await asyncio.gather(*(write(i) for i in range(writers)), return_exceptions=True)
    winners = [o for o in outcomes if isinstance(o, str)]
    assert len(winners) == 1
    assert all(isinstance(o, ConversationConflict) for o in outcomes if not isinstance(o, str))
    assert (await store.read_record('c')).revision == winners[0]
