"""A turn cancelled once its save was sent: the save runs to its end and the turn returns its result, so a caller's
`CancelledError` always means the turn was not saved (plain and streamed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agentrt.agents.simple_chat import ChatResult, simple_chat, simple_chat_stream
from agentrt.services.conversations import PostgresConversationStore
from tests.agents.conftest import account_id

pytestmark = pytest.mark.usefixtures('demo_data')


async def _asked(conversation_id: str) -> list[str]:
    stored = await PostgresConversationStore(await account_id('acme-health')).load(conversation_id)
    assert stored is not None
    return [
        part.content for m in stored.messages for part in m.parts if getattr(part, 'part_kind', '') == 'user-prompt'
    ]


async def _turn(streamed: bool, text: str, conversation_id: str) -> ChatResult | None:
    if not streamed:
        return await simple_chat(text, session_id=conversation_id, account='acme-health')
    async with simple_chat_stream(text, session_id=conversation_id, account='acme-health') as stream:
        async for _ in stream:
            pass
    return stream.result


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_turn_cancelled_during_its_save_is_saved_and_returns_its_result(
    monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    # The save was not shielded: a cancellation with its COMMIT's reply in flight left the turn saved, and the caller,
    # told "cancelled", asked again: the message twice in the history, its model requests billed twice (QA). Here
    # the save waits a moment after it started, and the cancellation lands in that moment.
    conversation_id = f'cancelled-save-{streamed}'
    await _turn(streamed, 'Dermatologists in Boston', conversation_id)
    started = asyncio.Event()
    write = PostgresConversationStore._append_write

    async def slow_write(self: PostgresConversationStore, *args: Any, **kwargs: Any) -> Any:
        started.set()
        await asyncio.sleep(0.2)
        return await write(self, *args, **kwargs)

    monkeypatch.setattr(PostgresConversationStore, '_append_write', slow_write)
    turn = asyncio.create_task(_turn(streamed, 'and in Denver?', conversation_id))
    await started.wait()
    turn.cancel()
    result = await turn  # not CancelledError: the save had started
    assert result is not None and 'Denver' in result.output
    assert await _asked(conversation_id) == ['Dermatologists in Boston', 'and in Denver?']

    # Cancelled before its save started: CancelledError, and nothing saved.
    monkeypatch.setattr(PostgresConversationStore, '_append_write', write)
    before = asyncio.create_task(_turn(streamed, 'and in Austin?', conversation_id))
    await asyncio.sleep(0)
    before.cancel()
    with pytest.raises(asyncio.CancelledError):
        await before
    assert await _asked(conversation_id) == ['Dermatologists in Boston', 'and in Denver?']
    again = await _turn(streamed, 'and in Austin?', conversation_id)  # the conversation is free, and goes on
    assert again is not None and await _asked(conversation_id) == [
        'Dermatologists in Boston',
        'and in Denver?',
        'and in Austin?',
    ]
