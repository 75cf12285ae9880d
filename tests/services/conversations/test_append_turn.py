"""A chat turn's own load and save: the tail read in one statement, the turn appended in one, nothing read first.

What the fast path stores must be what pydantic-ai's generic `save` stores (same rows, same JSON), its compare-and-swap
and its disconnect handling must hold as `write_record`'s do, and a run that rewrote its history must still be saved
correctly (by the generic path).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic_ai import Agent, BinaryContent, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from sqlalchemy import text

from agentrt.db.driver import DriverStatement, driver_transaction
from agentrt.db.errors import DatabaseDisconnectedError
from agentrt.db.models import Account, ConversationEntryRow
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.conversations import (
    ConcurrentTurnError,
    PostgresConversationStore,
    RecentConversation,
    TurnClaim,
    _turns,
    append_turn,
    load_conversation,
    load_recent_conversation,
    save_turn,
)
from agentrt.services.conversations._stored import RECORDS_HAVE_METADATA, message_json
from agentrt.services.conversations._titles import title_and_summary
from tests.factories import scalar
from tests.services.conversations.test_store import assert_chain, count_rows

BACKEND_PID = DriverStatement.of(text('SELECT pg_backend_pid()'))


def _reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    last = messages[-1]
    if not any(isinstance(part, ToolReturnPart) for part in last.parts):
        return ModelResponse(
            parts=[ToolCallPart('lookup', {'q': 'kale\x00', 'n': 1.5}, tool_call_id=f'c{len(messages)}')]
        )
    return ModelResponse(parts=[TextPart('found \ud800 it\x00')])


def _agent() -> Agent[None, str]:
    agent = Agent(FunctionModel(_reply, model_name='gpt-4o-mini'))

    @agent.tool_plain
    def lookup(q: str, n: float) -> dict[str, Any]:
        return {'q': q, 'n': n, 'text': 'caf\u00e9 \U0001f600 \\u0000'}

    return agent


@pytest.fixture
async def store() -> PostgresConversationStore:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        account = Account(slug='appender', name='Appender')
        session.add(account)
        await session.flush()
        return PostgresConversationStore(account.id)


async def _fast_turn(store: PostgresConversationStore, conversation_id: str, prompt: Any, **kwargs: Any) -> Any:
    recent = await load_recent_conversation(store, conversation_id, max_tokens=16_000)
    result = await _agent().run(prompt, conversation=recent.conversation)
    return recent, result, await append_turn(store, result, recent, **kwargs)


async def _stored_messages(account_id: int) -> list[Any]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = await session.execute(
            text('SELECT message FROM conversation_entries WHERE account_id = :a ORDER BY created_at, id'),
            {'a': account_id},
        )
        return list(rows.scalars())


async def test_the_fast_path_stores_what_the_generic_save_stores(store: PostgresConversationStore) -> None:
    prompt = ['hello \x00 there', BinaryContent(data=b'\x89PNG\x00', media_type='image/png')]
    saved_entries = []
    for _ in range(2):
        _, _, saved = await _fast_turn(store, 'fast', prompt)
        assert saved.stored_chars == sum(len(message_json(entry.message)) for entry in saved.entries)
        saved_entries += saved.entries
    stored = await store.load_entries('fast')
    assert stored is not None and len(stored) == 8 and [e.id for e in stored] == [e.id for e in saved_entries]
    assert_chain(stored)
    # Row for row, the JSON the generic path (`write_record`) would have stored for the same entries.
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = await session.execute(
            text('SELECT id, parent_id, kind, message FROM conversation_entries WHERE account_id = :a'),
            {'a': store.account_id},
        )
        by_id = {row.id: row for row in rows}
    for entry in saved_entries:
        expected = store._entry_row(entry)
        row = by_id[entry.id]
        assert (row.parent_id, row.kind, row.message) == (expected['parent_id'], expected['kind'], expected['message'])
    assert 'found \ufffd it\ufffd' in str(by_id[saved_entries[-1].id].message), 'NUL and lone surrogate as U+FFFD'
    record = await store.read_record('fast')
    assert record is not None and record.head_id == saved_entries[-1].id and record.usage.requests == 4
    # Reloaded whole, the conversation is what the generic load gives, and a generic save continues it.
    loaded = await load_conversation(store, 'fast')
    assert loaded.messages == [entry.message for entry in stored]
    assert len(await save_turn(store, await _agent().run('more', conversation=loaded))) == 4


async def test_the_tail_is_what_the_generic_load_gives(store: PostgresConversationStore) -> None:
    for _ in range(3):
        await _fast_turn(store, 'c', 'question')
    recent = await load_recent_conversation(store, 'c', max_tokens=1_000_000)
    loaded = await store.load('c')
    assert loaded is not None
    assert recent.conversation.messages == loaded.messages and recent.record == await store.read_record('c')
    assert recent.conversation.revision == loaded.revision and recent.conversation.usage == loaded.usage
    assert recent.conversation.new_message_index == len(loaded.messages) and not recent.earlier_omitted
    assert recent.since_summary is None  # never summarised
    small = await load_recent_conversation(store, 'c', max_tokens=100)
    cut = len(loaded.messages) - len(small.conversation.messages)  # from a user prompt: none when a turn is too big
    assert small.earlier_omitted and small.conversation.messages == loaded.messages[cut:]


async def test_a_tail_cut_within_a_turn_is_saved_in_one_statement(
    store: PostgresConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cap cut the tail at a request of tool returns, which pydantic-ai dropped (their calls were left behind):
    # every save of a long conversation went through the comparing save, the claim released apart (QA).
    for _ in range(3):
        await _fast_turn(store, 'cut', 'question')
    sizes = (await store.read_tail('cut', cap_chars=10**9, max_messages=100)).sizes  # type: ignore[union-attr]
    max_tokens = (sum(sizes[-5:]) + 12) // 12  # 12 JSON characters a token: a cut at the tool returns of turn 2

    async def comparing_save(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError('the comparing save')

    monkeypatch.setattr(PostgresConversationStore, 'save', comparing_save)
    claim = TurnClaim.mint(store.account_id, 'cut', lease_s=60)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await claim.take(session=session)
    recent = await load_recent_conversation(store, 'cut', max_tokens=max_tokens)
    assert recent.earlier_omitted
    result = await _agent().run('next', conversation=recent.conversation)
    async with claim.held():
        saved = await append_turn(store, result, recent, claim=claim)
    assert len(recent.stored) == 4, 'the last turn, from its prompt'
    assert len(saved.entries) == 4 and claim.released and await scalar('SELECT count(*) FROM conversation_turns') == 0
    assert len(await store.load_entries('cut') or []) == 16


async def test_a_turn_saved_meanwhile_wins_and_nothing_of_the_late_one_is_stored(
    store: PostgresConversationStore,
) -> None:
    await _fast_turn(store, 'race', 'first')
    mine = await load_recent_conversation(store, 'race', max_tokens=16_000)
    theirs = await load_recent_conversation(store, 'race', max_tokens=16_000)
    mine_result = await _agent().run('mine', conversation=mine.conversation)
    theirs_result = await _agent().run('Their longer question', conversation=theirs.conversation)
    await append_turn(store, theirs_result, theirs)
    before = await count_rows(ConversationEntryRow)
    with pytest.raises(ConcurrentTurnError) as info:
        await append_turn(store, mine_result, mine)
    assert info.value.stage == 'save'
    assert await count_rows(ConversationEntryRow) == before
    # Two first turns of one new conversation: one is created, the other refused.
    first = await load_recent_conversation(store, 'fresh', max_tokens=16_000)
    second = await load_recent_conversation(store, 'fresh', max_tokens=16_000)
    await append_turn(store, await _agent().run('a', conversation=first.conversation), first)
    with pytest.raises(ConcurrentTurnError):
        await append_turn(store, await _agent().run('b', conversation=second.conversation), second)


async def test_the_save_releases_the_claim_in_its_transaction(store: PostgresConversationStore) -> None:
    claim = TurnClaim.mint(store.account_id, 'claimed', lease_s=60)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await claim.take(session=session)
    recent = await load_recent_conversation(store, 'claimed', max_tokens=16_000)
    result = await _agent().run('hi', conversation=recent.conversation)
    async with claim.held():
        await append_turn(store, result, recent, claim=claim)
        assert claim.released
        assert await scalar('SELECT count(*) FROM conversation_turns') == 0
    # A refused save keeps the claim (the turn releases it when it ends).
    claim = TurnClaim.mint(store.account_id, 'claimed', lease_s=60)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await claim.take(session=session)
    with pytest.raises(ConcurrentTurnError):
        await append_turn(store, result, recent, claim=claim)
    assert not claim.released and await scalar('SELECT count(*) FROM conversation_turns') == 1
    await claim.release()


async def test_a_turn_claims_and_loads_in_one_statement(store: PostgresConversationStore) -> None:
    async def claim_and_load(conversation_id: str, claim: TurnClaim) -> RecentConversation:
        async with driver_transaction(account=store.account_id) as transaction:
            return await load_recent_conversation(
                store, conversation_id, max_tokens=16_000, transaction=transaction, claim=claim
            )

    # A new conversation: claimed, loaded empty.
    fresh = TurnClaim.mint(store.account_id, 'one-statement', lease_s=60)
    recent = await claim_and_load('one-statement', fresh)
    assert recent.record is None and recent.conversation.messages == []
    assert await scalar('SELECT claim_id FROM conversation_turns') == fresh.claim_id
    # Held: the next turn is refused at its start, and its transaction (the load with it) is rolled back.
    with pytest.raises(ConcurrentTurnError) as refused:
        await claim_and_load('one-statement', TurnClaim.mint(store.account_id, 'one-statement', lease_s=60))
    assert refused.value.stage == 'start'
    # Taken again by the same claim (a repeated start): counts as taken; a saved conversation loads whole.
    result = await _agent().run('hi', conversation=recent.conversation)
    await append_turn(store, result, recent, claim=fresh)
    again = TurnClaim.mint(store.account_id, 'one-statement', lease_s=60)
    assert len((await claim_and_load('one-statement', again)).conversation.messages) == 4
    assert len((await claim_and_load('one-statement', again)).stored) == 4
    assert await scalar('SELECT count(*) FROM conversation_turns') == 1
    # The claim needs the caller's transaction.
    with pytest.raises(ValueError, match='transaction'):
        await load_recent_conversation(store, 'one-statement', max_tokens=16_000, claim=again)


async def _waiting_on_a_lock() -> int:
    async with get_db_session(account=Unscoped.OWNER) as owner:  # sees every backend's wait
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        return int((await owner.execute(text(query))).scalar_one())


async def test_a_turn_that_claims_while_the_last_one_saves_starts_from_that_save(
    store: PostgresConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim and the tail share a snapshot; a turn whose claim waited for the last turn's save (which releases the
    claim in its transaction) must still load what that save stored."""
    await _fast_turn(store, 'handover', 'first')
    saving = TurnClaim.mint(store.account_id, 'handover', lease_s=60)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await saving.take(session=session)
    recent = await load_recent_conversation(store, 'handover', max_tokens=16_000)
    result = await _agent().run('second', conversation=recent.conversation)
    appended, commit = asyncio.Event(), asyncio.Event()
    real = PostgresConversationStore._append_once

    async def held_open(self: PostgresConversationStore, *args: Any) -> Any:
        outcome = await real(self, *args)
        appended.set()
        await commit.wait()  # the save's transaction stays open, its claim row locked (deleted, not committed)
        return outcome

    monkeypatch.setattr(PostgresConversationStore, '_append_once', held_open)
    save = asyncio.create_task(append_turn(store, result, recent, claim=saving))
    await appended.wait()

    async def next_turn() -> RecentConversation:
        async with driver_transaction(account=store.account_id) as transaction:
            claim = TurnClaim.mint(store.account_id, 'handover', lease_s=60)
            return await load_recent_conversation(
                store, 'handover', max_tokens=16_000, transaction=transaction, claim=claim
            )

    starting = asyncio.create_task(next_turn())
    for _ in range(1000):  # its claim waits for the save's transaction
        if await _waiting_on_a_lock():
            break
        await asyncio.sleep(0.01)
    commit.set()
    await save
    loaded = await starting
    assert len(loaded.conversation.messages) == 8  # both turns, not the snapshot from before the save
    assert loaded.conversation.revision == (await store.read_record('handover')).revision  # type: ignore[union-attr]


async def test_a_history_the_run_rewrote_is_saved_by_comparing(store: PostgresConversationStore) -> None:
    await _fast_turn(store, 'rewritten', 'first')
    recent = await load_recent_conversation(store, 'rewritten', max_tokens=16_000)
    # The run is given copies of the loaded messages (as a capability that rewrites the history would leave them).
    copied = recent.conversation
    copied.messages = [ModelRequest(parts=[UserPromptPart('first')]), *copied.messages[1:]]
    result = await _agent().run('second', conversation=copied)
    saved = await append_turn(
        store, result, RecentConversation(copied, recent.title, False, recent.record, recent.stored)
    )
    assert saved.entries and saved.stored_chars > 0
    stored = await store.load_entries('rewritten')
    assert stored is not None and [e.id for e in stored[-len(saved.entries) :]] == [e.id for e in saved.entries]
    record = await store.read_record('rewritten')
    assert record is not None and len(record.branches) == 1  # the history it rewrote is kept as a branch


async def test_a_save_whose_connection_is_killed_is_saved_once(
    store: PostgresConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _fast_turn(store, 'killed', 'first')
    recent = await load_recent_conversation(store, 'killed', max_tokens=16_000)
    result = await _agent().run('again', conversation=recent.conversation)
    real, attempts = PostgresConversationStore._append_once, []

    async def on_a_dying_connection(self: PostgresConversationStore, transaction: Any, *args: Any) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            pid = (await transaction.fetch(BACKEND_PID, {}))[0][0]
            async with get_db_session(account=Unscoped.OWNER) as admin:
                await admin.execute(text('SELECT pg_terminate_backend(:pid)'), {'pid': pid})
        return await real(self, transaction, *args)

    monkeypatch.setattr(PostgresConversationStore, '_append_once', on_a_dying_connection)
    saved = await append_turn(store, result, recent)
    assert len(attempts) == 2 and len(saved.entries) == 4
    assert await count_rows(ConversationEntryRow) == 8


async def test_a_save_that_committed_before_its_reply_was_lost_is_not_saved_again(
    store: PostgresConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _fast_turn(store, 'lost-reply', 'first')
    recent = await load_recent_conversation(store, 'lost-reply', max_tokens=16_000)
    result = await _agent().run('again', conversation=recent.conversation)
    real, attempts = PostgresConversationStore._append_write, []

    async def committed_then_lost(self: PostgresConversationStore, *args: Any) -> Any:
        attempts.append(1)
        outcome = await real(self, *args)  # committed...
        if len(attempts) == 1:
            raise DatabaseDisconnectedError('the connection to PostgreSQL was lost')  # ...and the reply lost
        return outcome

    monkeypatch.setattr(PostgresConversationStore, '_append_write', committed_then_lost)
    saved = await append_turn(store, result, recent)
    assert len(attempts) == 1 and len(saved.entries) == 4  # found committed: not written again, not a conflict
    assert await count_rows(ConversationEntryRow) == 8
    await _fast_turn(store, 'lost-reply', 'and again')  # the conversation goes on from the saved revision
    assert await count_rows(ConversationEntryRow) == 12


async def _summary_row(store: PostgresConversationStore, conversation_id: str) -> dict[str, Any]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        row = await session.execute(
            text(
                'SELECT title, summary, summary_head_id, head_id, summarised_at FROM conversations '
                'WHERE account_id = :a AND conversation_id = :c'
            ),
            {'a': store.account_id, 'c': conversation_id},
        )
        return dict(row.mappings().one())


async def test_a_due_title_and_summary_are_stored_by_the_save(store: PostgresConversationStore) -> None:
    # Every second turn: the first turn (no title yet) and the third are due, the second is not.
    every = (2, 10**6)
    *_, first = await _fast_turn(store, 'c', 'hello \x00 there', summary_every=every)
    row = await _summary_row(store, 'c')
    history = await store.read_history(row['head_id'])
    assert first.summarised and row['summary_head_id'] == row['head_id'] and row['summarised_at'] is not None
    # What the post-turn task makes from the stored history (NUL and lone surrogate made storable).
    assert (row['title'], row['summary']) == title_and_summary(history, None)
    *_, second = await _fast_turn(store, 'c', 'again', summary_every=every)
    assert not second.summarised and (await _summary_row(store, 'c'))['summary_head_id'] == row['head_id']
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(text("UPDATE conversations SET title = 'Chosen' WHERE conversation_id = 'c'"))
    *_, third = await _fast_turn(store, 'c', 'and again', summary_every=every)
    after = await _summary_row(store, 'c')
    assert third.summarised and after['summary_head_id'] == after['head_id'] != row['head_id']
    assert (
        after['title'] == 'Chosen' and after['summary'].startswith('Topic: Chosen.') and 'and again' in after['summary']
    )


async def test_a_save_that_loses_the_race_stores_no_summary(store: PostgresConversationStore) -> None:
    mine = await load_recent_conversation(store, 'c', max_tokens=16_000)
    theirs = await load_recent_conversation(store, 'c', max_tokens=16_000)
    theirs_saved = await append_turn(
        store,
        await _agent().run('Their longer question', conversation=theirs.conversation),
        theirs,
        summary_every=(1, 1),
    )
    with pytest.raises(ConcurrentTurnError):
        await append_turn(store, await _agent().run('mine', conversation=mine.conversation), mine, summary_every=(1, 1))
    row = await _summary_row(store, 'c')
    assert (
        theirs_saved.summarised and row['title'] == 'Their longer question' and row['summary_head_id'] == row['head_id']
    )


async def test_a_summary_that_cannot_be_made_leaves_the_save_whole(
    store: PostgresConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(source: Any) -> Any:
        raise RuntimeError('summariser bug')

    monkeypatch.setattr(_turns, 'title_and_summary_from', broken)
    *_, saved = await _fast_turn(store, 'c', 'hello', summary_every=(1, 1))
    row = await _summary_row(store, 'c')
    assert not saved.summarised and len(saved.entries) == 4 and row['head_id'] == saved.entries[-1].id
    assert row['title'] is None and row['summary'] is None  # the post-turn task does it instead


async def test_a_turns_save_keeps_the_title_and_metadata_set_while_it_ran(store: PostgresConversationStore) -> None:
    """A turn's one-statement save builds its record from the one it loaded, without title or metadata: metadata
    set by `update(metadata=...)` (pydantic-ai 2.78) was wiped by the next turn's save, and one set while the turn
    ran as well. The title is a column the save only fills when empty."""
    await _fast_turn(store, 'kept-details', 'first question')
    recent = await load_recent_conversation(store, 'kept-details', max_tokens=16_000)
    record = await store.read_record('kept-details')
    assert record is not None
    details: dict[str, Any] = {'title': 'Set by hand'}
    if RECORDS_HAVE_METADATA:
        details['metadata'] = {'team': 'billing'}
    await store.write_details('kept-details', details, expected_revision=record.revision)  # while the turn runs
    result = await _agent().run('second question', conversation=recent.conversation)
    await append_turn(store, result, recent)
    await _fast_turn(store, 'kept-details', 'third question')  # and a turn loaded after it
    after = await store.read_record('kept-details')
    assert after is not None and after.revision != record.revision
    assert (
        await scalar(
            "SELECT title FROM conversations WHERE account_id = :a AND conversation_id = 'kept-details'",
            a=store.account_id,
        )
        == 'Set by hand'
    )
    if RECORDS_HAVE_METADATA:
        assert getattr(after, 'metadata', None) == {'team': 'billing'}
        assert getattr(after, 'title', None) == 'Set by hand'
