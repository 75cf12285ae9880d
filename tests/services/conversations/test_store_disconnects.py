"""The conversation save across a lost connection: repeated safely, never saved twice, never saved over another turn.

A lost connection leaves the save's outcome unknown: nothing was written, or everything was and the reply was lost.
The faults are real (a backend terminated mid-save) or placed exactly where the real one would be (the commit
happened, then the error).
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.models.function import FunctionModel
from sqlalchemy import text

from agentrt.db.errors import DatabaseDisconnectedError
from agentrt.db.models import Account, ConversationEntryRow
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.conversations import ConcurrentTurnError, PostgresConversationStore, load_conversation, save_turn
from tests.services.conversations.test_store import Recorder, assert_chain, count_rows, turn


@pytest.fixture
async def store() -> PostgresConversationStore:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        account = Account(slug='tenant-a', name='Tenant A')
        session.add(account)
        await session.flush()
        return PostgresConversationStore(account.id)


def _agent() -> Agent[None, str]:
    return Agent(FunctionModel(Recorder(), model_name='gpt-4o-mini'))


async def _kill_own_backend(session: Any) -> None:
    """Terminate this session's backend from another connection, as a failover or an operator would."""
    pid = (await session.execute(text('SELECT pg_backend_pid()'))).scalar_one()
    async with get_db_session(account=Unscoped.OWNER) as admin:
        await admin.execute(text('SELECT pg_terminate_backend(:pid)'), {'pid': pid})


async def test_a_save_whose_connection_is_killed_before_commit_is_saved_once(
    store: PostgresConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = _agent()
    await turn(store, agent, 'conv', 'hello')
    result = await agent.run('again', conversation=await load_conversation(store, 'conv'))
    real_swap, attempts = PostgresConversationStore._swap_record, []

    async def swap_on_a_dying_connection(self: PostgresConversationStore, session: Any, *args: Any) -> bool:
        attempts.append(1)
        if len(attempts) == 1:
            await _kill_own_backend(session)
        return await real_swap(self, session, *args)

    monkeypatch.setattr(PostgresConversationStore, '_swap_record', swap_on_a_dying_connection)
    saved = await save_turn(store, result)
    assert len(attempts) == 2 and len(saved) == 2
    entries = await store.load_entries('conv')
    assert entries is not None and [e.message for e in entries] == result.all_messages()
    assert_chain(entries)
    assert await count_rows(ConversationEntryRow) == 4


async def test_a_save_that_committed_before_its_reply_was_lost_is_not_saved_again(
    store: PostgresConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = _agent()
    await turn(store, agent, 'conv', 'hello')
    result = await agent.run('again', conversation=await load_conversation(store, 'conv'))
    real_write, attempts = PostgresConversationStore._write, []

    async def committed_then_lost(self: PostgresConversationStore, *args: Any) -> None:
        attempts.append(1)
        await real_write(self, *args)  # committed...
        if len(attempts) == 1:
            raise DatabaseDisconnectedError('the connection to PostgreSQL was lost')  # ...and the reply lost

    monkeypatch.setattr(PostgresConversationStore, '_write', committed_then_lost)
    saved = await save_turn(store, result)
    assert len(attempts) == 1 and len(saved) == 2  # found committed: not written again, not a conflict
    assert result.conversation.revision == (await store.read_record('conv')).revision  # type: ignore[union-attr]
    assert await count_rows(ConversationEntryRow) == 4
    # The conversation goes on from the saved revision.
    _, more = await turn(store, agent, 'conv', 'and again')
    assert len(more) == 2 and await count_rows(ConversationEntryRow) == 6


async def test_a_retried_save_never_overwrites_a_turn_saved_meanwhile(
    store: PostgresConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = _agent()
    await turn(store, agent, 'conv', 'hello')
    mine = await agent.run('mine', conversation=await load_conversation(store, 'conv'))
    theirs = await agent.run('theirs', conversation=await load_conversation(store, 'conv'))
    real_swap, attempts = PostgresConversationStore._swap_record, []

    async def lost_while_another_turn_saves(self: PostgresConversationStore, session: Any, *args: Any) -> bool:
        attempts.append(1)
        if len(attempts) == 1:
            await _kill_own_backend(session)
            await save_turn(store, theirs)  # the other turn wins while this save's connection is down
        return await real_swap(self, session, *args)

    monkeypatch.setattr(PostgresConversationStore, '_swap_record', lost_while_another_turn_saves)
    with pytest.raises(ConcurrentTurnError):
        await save_turn(store, mine)
    entries = await store.load_entries('conv')
    assert entries is not None and [e.message for e in entries] == theirs.all_messages()
    assert await count_rows(ConversationEntryRow) == 4
