"""A turn cancelled once its save was sent: the save runs to its end and the turn returns its result, so a caller's
`CancelledError` always means the turn was not saved (plain and streamed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic_ai import Conversation
from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, ToolReturnPart

from agentrt.agents.simple_chat import ChatResult, simple_chat, simple_chat_stream
from agentrt.services.conversations import PostgresConversationStore, TurnClaim
from tests.agents.conftest import account_id
from tests.factories import scalar

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


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_turn_cancelled_after_a_comparing_save_committed_returns_its_result(
    monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    # A history the run did not keep as loaded (here it starts with tool returns whose calls it never saw: pydantic-ai
    # drops them) is saved by pydantic-ai's comparing save, which cannot delete the claim. The turn's end then awaited
    # the claim's release, and a cancellation arriving in it raised CancelledError though the turn was saved (QA).
    conversation_id = f'orphaned-{streamed}'
    store = PostgresConversationStore(await account_id('acme-health'))
    orphaned = [
        ModelRequest(parts=[ToolReturnPart('t', 'r', tool_call_id='gone')]),
        ModelResponse(parts=[TextPart('a')]),
    ]
    await store.save(Conversation(messages=orphaned, conversation_id=conversation_id))
    turn: asyncio.Task[ChatResult | None] | None = None
    release = TurnClaim.release

    async def cancelling_release(self: TurnClaim) -> None:
        if turn is not None:
            turn.cancel()  # a Ctrl-C, a client gone, a timeout: arriving just after the save committed
        await release(self)

    monkeypatch.setattr(TurnClaim, 'release', cancelling_release)
    turn = asyncio.create_task(_turn(streamed, 'Dermatologists in Boston', conversation_id))
    result = await turn  # not CancelledError: the turn was saved
    assert result is not None and 'Boston' in result.output
    assert await _asked(conversation_id) == ['Dermatologists in Boston']
    for _ in range(200):  # the claim's release, in a task of its own, ends soon after
        if await scalar('SELECT count(*) FROM conversation_turns') == 0:
            break
        await asyncio.sleep(0.01)
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0
