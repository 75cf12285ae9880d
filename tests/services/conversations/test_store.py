"""PostgresConversationStore: turns, concurrency, tenant isolation, scopes, forks, deletes, and parity with memory."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic_ai import (
    Agent,
    Conversation,
    ModelRequest,
    ModelResponse,
    RequestUsage,
    RunUsage,
    TextPart,
    ToolCallPart,
    UserPromptPart,
)
from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
    ConversationStore,
    InMemoryConversationStore,
)
from pydantic_ai.exceptions import UserError
from pydantic_ai.messages import ModelMessage, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from sqlalchemy import func, select, text

from agentrt.agents.simple_chat import simple_chat
from agentrt.db.errors import AgentRuntimeError, InvalidInputError
from agentrt.db.models import Account, ConversationEntryRow, ConversationRow
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.conversations import (
    ConcurrentTurnError,
    PostgresConversationStore,
    append_turn,
    load_conversation,
    load_recent_conversation,
    save_turn,
)
from agentrt.services.conversations._stored import RECORDS_HAVE_METADATA
from tests.conversation_races import assert_one_writer_wins
from tests.factories import wait_until_waiting_on_a_lock


@dataclass
class Recorder:
    """A FunctionModel body that answers `reply #n` and remembers what each request was sent."""

    seen: list[list[ModelMessage]] = field(default_factory=list)

    def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.seen.append(list(messages))
        n_requests = sum(1 for m in messages if m.kind == 'request')
        return ModelResponse(
            parts=[TextPart(f'reply #{n_requests}')], usage=RequestUsage(input_tokens=100, output_tokens=5)
        )


def tool_then_answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Call `lookup` once per turn, then answer with what it returned."""
    last = messages[-1]
    returns = [p for p in last.parts if isinstance(p, ToolReturnPart)]
    if not returns:
        return ModelResponse(
            parts=[ToolCallPart('lookup', {'q': 'kale', 'limit': 2}, tool_call_id=f'call-{len(messages)}')],
            usage=RequestUsage(input_tokens=300, output_tokens=20),
        )
    return ModelResponse(
        parts=[TextPart(f'found {returns[0].content}')],
        usage=RequestUsage(input_tokens=400, output_tokens=10, cache_read_tokens=100),
    )


def tool_agent() -> Agent[None, str]:
    agent = Agent(FunctionModel(tool_then_answer, model_name='gpt-4o-mini'))

    @agent.tool_plain
    async def lookup(q: str, limit: int) -> dict[str, Any]:
        return {'q': q, 'hits': [f'{q}-{i}' for i in range(limit)]}

    return agent


@pytest.fixture
async def account_ids() -> tuple[int, int]:
    """Two bare accounts (the full demo seed is not needed and costs a second per test)."""
    accounts = [Account(slug='tenant-a', name='Tenant A'), Account(slug='tenant-b', name='Tenant B')]
    async with get_db_session(account=Unscoped.ADMIN) as session:
        session.add_all(accounts)
        await session.flush()
        return accounts[0].id, accounts[1].id


@pytest.fixture
def store(account_ids: tuple[int, int]) -> PostgresConversationStore:
    return PostgresConversationStore(account_ids[0])


async def count_rows(model: type, account_id: int | None = None) -> int:
    query = select(func.count()).select_from(model)
    if account_id is not None:
        query = query.where(model.account_id == account_id)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(query)).scalar_one()


async def turn(store: ConversationStore, agent: Agent[None, str], conversation_id: str, prompt: str, **kw: Any):
    conversation = await load_conversation(store, conversation_id, **kw)
    result = await agent.run(prompt, conversation=conversation)
    return result, await save_turn(store, result, **kw)


def assert_chain(entries: list[ConversationEntry]) -> None:
    """Each entry points at the one before it, the first at nothing."""
    assert [e.parent_id for e in entries] == [None, *(e.id for e in entries[:-1])]


# --- turns ---------------------------------------------------------------------------------------


async def test_second_turn_sees_first_turn_and_reload_is_equal(store: PostgresConversationStore) -> None:
    recorder = Recorder()
    agent = Agent(FunctionModel(recorder, model_name='gpt-4o-mini'))

    first, saved = await turn(store, agent, 'conv-1', 'hello')
    assert len(saved) == 2
    second, saved = await turn(store, agent, 'conv-1', 'again')
    assert len(saved) == 2

    assert second.output == 'reply #2'
    assert recorder.seen[1][:2] == first.all_messages()  # the model got turn 1's history
    loaded = await store.load('conv-1')
    assert loaded is not None
    assert loaded.messages == second.all_messages()
    assert loaded.usage == second.usage
    assert loaded.usage.requests == 2 and loaded.usage.input_tokens == 200
    assert loaded.usage.cost is not None and loaded.usage.cost > 0
    assert loaded.revision == second.conversation.revision
    assert await count_rows(ConversationRow) == 1
    assert await count_rows(ConversationEntryRow) == 4


CREATED_AND_UPDATED = text(
    'SELECT created_at, updated_at FROM conversations WHERE conversation_id = :c ORDER BY account_id'
)


async def _created_and_updated(conversation_id: str) -> tuple[datetime, datetime]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        created, updated = (await session.execute(CREATED_AND_UPDATED, {'c': conversation_id})).one()
    return created, updated


async def test_a_new_conversation_is_created_when_it_was_updated_and_keeps_it(
    store: PostgresConversationStore, demo_data: None
) -> None:
    # created_at was the transaction's now(), a few ms after the record's own updated_at: created after updated.
    agent = Agent(FunctionModel(Recorder(), model_name='gpt-4o-mini'))
    await turn(store, agent, 'stamped', 'hello')  # pydantic-ai's path: the store's write_record
    created, updated = await _created_and_updated('stamped')
    assert created == updated
    await turn(store, agent, 'stamped', 'again')
    later_created, later_updated = await _created_and_updated('stamped')
    assert later_created == created and later_updated > updated
    await simple_chat('Cardiologists in Seattle', session_id='stamped-turn', account='acme-health')  # a runtime turn
    created, updated = await _created_and_updated('stamped-turn')
    assert created == updated


async def test_load_conversation_starts_empty(store: PostgresConversationStore) -> None:
    conversation = await load_conversation(store, 'new-one')
    assert conversation.conversation_id == 'new-one'
    assert conversation.messages == [] and conversation.revision is None


# --- concurrency ---------------------------------------------------------------------------------


async def test_concurrent_turns_one_wins_other_gets_conflict(store: PostgresConversationStore) -> None:
    agent = Agent(FunctionModel(Recorder(), model_name='gpt-4o-mini'))
    await turn(store, agent, 'conv-1', 'hello')
    a = await load_conversation(store, 'conv-1')
    b = await load_conversation(store, 'conv-1')
    result_a, result_b = await asyncio.gather(agent.run('from A', conversation=a), agent.run('from B', conversation=b))

    outcomes = await asyncio.gather(save_turn(store, result_a), save_turn(store, result_b), return_exceptions=True)

    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], ConcurrentTurnError)
    assert isinstance(errors[0], AgentRuntimeError)
    assert isinstance(errors[0].__cause__, ConversationConflict)
    assert str(errors[0]) == (
        "conversation 'conv-1' was changed by another turn, or was deleted; this turn was not saved; reload and retry"
    )
    winner = result_b if isinstance(outcomes[0], BaseException) else result_a
    entries = await store.load_entries('conv-1')
    assert entries is not None
    assert_chain(entries)
    assert [e.message for e in entries] == winner.all_messages()
    assert await count_rows(ConversationEntryRow) == 4  # the loser left nothing behind

    # Reload and retry succeeds on top of the winner.
    _, saved = await turn(store, agent, 'conv-1', 'from B again')
    assert len(saved) == 2
    assert len((await store.load('conv-1')).messages) == 6


async def test_many_concurrent_writers_exactly_one_wins(store: PostgresConversationStore) -> None:
    await assert_one_writer_wins(store, writers=8)
    assert await count_rows(ConversationEntryRow) == 2


async def test_concurrent_creates_of_one_id_one_wins(store: PostgresConversationStore) -> None:
    records = [ConversationRecord(conversation_id='c', head_id=None) for _ in range(5)]
    outcomes = await asyncio.gather(
        *(store.write_record(r, expected_revision=None) for r in records), return_exceptions=True
    )
    assert sum(o is None for o in outcomes) == 1
    assert all(isinstance(o, ConversationConflict) for o in outcomes if o is not None)


# --- tenancy and scope ---------------------------------------------------------------------------


async def test_accounts_are_isolated(account_ids: tuple[int, int]) -> None:
    store_a, store_b = (PostgresConversationStore(i) for i in account_ids)
    agent = Agent(FunctionModel(Recorder(), model_name='gpt-4o-mini'))
    await turn(store_a, agent, 'shared-id', 'secret of A')
    record_a = await store_a.read_record('shared-id')
    entries_a = await store_a.load_entries('shared-id')

    assert await store_b.read_record('shared-id') is None
    assert await store_b.load('shared-id') is None
    assert await store_b.read_records() == []
    assert await store_b.list_conversations() == []
    with pytest.raises(KeyError):
        await store_b.read_entry(entries_a[0].id)
    with pytest.raises(KeyError):
        await store_b.read_history(record_a.head_id)
    # Overwrite attempts: with A's revision, or pointing a new record at A's entries.
    with pytest.raises(ConversationConflict):
        await store_b.write_record(
            ConversationRecord(conversation_id='shared-id', head_id=None), expected_revision=record_a.revision
        )
    with pytest.raises(ConversationConflict):
        await store_b.write_record(
            ConversationRecord(conversation_id='stolen', head_id=record_a.head_id), expected_revision=None
        )
    with pytest.raises(ConversationConflict):
        await store_b.delete_record('shared-id', expected_revision=record_a.revision)
    await store_b.delete('shared-id')  # nothing of B's to delete; A's stays
    assert await store_a.read_record('shared-id') == record_a

    # B can have its own conversation with the same id; deleting it leaves A's entries alone.
    result_b, _ = await turn(store_b, agent, 'shared-id', 'hello from B')
    assert (await store_b.load('shared-id')).messages == result_b.all_messages()
    assert (await store_a.load('shared-id')).messages == [e.message for e in entries_a]
    await store_b.delete('shared-id')
    assert await count_rows(ConversationEntryRow, account_ids[1]) == 0
    assert await count_rows(ConversationEntryRow, account_ids[0]) == 2
    assert await store_a.load_entries('shared-id') == entries_a


async def test_scope_filters_records_and_loads(store: PostgresConversationStore) -> None:
    agent = Agent(FunctionModel(Recorder(), model_name='gpt-4o-mini'))
    await turn(store, agent, 'c-ann', 'hi', scope='ann')
    await turn(store, agent, 'c-bob', 'hi', scope='bob')
    await turn(store, agent, 'c-ann-2', 'hi', scope='ann')

    assert [r.conversation_id for r in await store.read_records()] == ['c-ann-2', 'c-bob', 'c-ann']
    assert [r.conversation_id for r in await store.read_records(scope='ann')] == ['c-ann-2', 'c-ann']
    assert [r.conversation_id for r in await store.read_records(scope='ann', limit=1)] == ['c-ann-2']
    assert await store.read_records(limit=0) == []
    assert await store.load('c-ann', scope='bob') is None
    assert (await store.load('c-ann', scope='ann')).conversation_id == 'c-ann'

    # Bob can't continue Ann's conversation: it loads empty and the save is refused.
    conversation = await load_conversation(store, 'c-ann', scope='bob')
    assert conversation.messages == []
    result = await agent.run('hijack', conversation=conversation)
    with pytest.raises(ConcurrentTurnError):
        await save_turn(store, result, scope='bob')
    assert len((await store.load('c-ann')).messages) == 2


# --- forks, branches, deletes, history -----------------------------------------------------------


async def test_fork_branch_and_delete_prune(store: PostgresConversationStore) -> None:
    agent = Agent(FunctionModel(Recorder(), model_name='gpt-4o-mini'))
    for prompt in ['one', 'two', 'three']:
        await turn(store, agent, 'main', prompt)
    main_entries = await store.load_entries('main')
    assert len(main_entries) == 6

    fork = await store.fork('main', at=2, new_conversation_id='fork')
    assert fork.messages == [e.message for e in main_entries[:2]]
    fork_record = await store.read_record('fork')
    assert fork_record.forked_from == 'main' and fork_record.forked_at == main_entries[1].id
    assert await count_rows(ConversationEntryRow) == 6  # the fork shares entries, copies none
    with pytest.raises(ConversationConflict):
        await store.fork('main', new_conversation_id='fork')

    branched = await store.branch('main', at=4, expected_revision=(await store.read_record('main')).revision)
    result = await agent.run('two, again', conversation=branched)
    await save_turn(store, result)
    record = await store.read_record('main')
    assert record.branches == [main_entries[-1].id]
    new_entries = await store.load_entries('main')
    assert new_entries[:4] == main_entries[:4] and len(new_entries) == 6
    back = await store.branch('main', from_entry=main_entries[-1].id, expected_revision=record.revision)
    assert back.messages == [e.message for e in main_entries]
    assert await count_rows(ConversationEntryRow) == 8

    # Deleting main keeps what the fork reaches, and nothing else.
    await store.delete('main')
    assert await store.read_record('main') is None
    assert await count_rows(ConversationEntryRow) == 2
    assert await store.load_entries('fork') == main_entries[:2]
    for gone in [*main_entries[2:], *new_entries[4:]]:
        with pytest.raises(KeyError):
            await store.read_entry(gone.id)
    await store.delete('fork')
    assert await count_rows(ConversationEntryRow) == 0
    assert await count_rows(ConversationRow) == 0


async def test_delete_racing_fork_never_leaves_a_dangling_history(store: PostgresConversationStore) -> None:
    # The prune must not delete entries a concurrent fork is pointing its new record at.
    agent = Agent(FunctionModel(Recorder(), model_name='gpt-4o-mini'))
    for i in range(6):
        await turn(store, agent, f'main-{i}', 'one')
        await turn(store, agent, f'main-{i}', 'two')
        deleted, forked = await asyncio.gather(
            store.delete(f'main-{i}'),
            store.fork(f'main-{i}', at=2, new_conversation_id=f'fork-{i}'),
            return_exceptions=True,
        )
        assert deleted is None
        # The fork may find main already gone (UserError) or its entries pruned (ConversationConflict).
        assert isinstance(forked, Conversation | UserError), forked
    for record in await store.read_records():
        history = await store.read_history(record.head_id)
        assert_chain(history)
        assert len(history) == 2
    assert await count_rows(ConversationEntryRow) == 2 * len(await store.read_records())


async def test_delete_record_checks_revision(store: PostgresConversationStore) -> None:
    await store.write_record(ConversationRecord(conversation_id='c', head_id=None), expected_revision=None)
    with pytest.raises(ConversationConflict):
        await store.delete_record('c', expected_revision='stale')
    with pytest.raises(ConversationConflict):
        await store.delete_record('missing', expected_revision='x')
    await store.delete_record('c', expected_revision=(await store.read_record('c')).revision)
    assert await store.read_record('c') is None


async def test_write_record_refuses_unknown_head(store: PostgresConversationStore) -> None:
    with pytest.raises(ConversationConflict):
        await store.write_record(ConversationRecord(conversation_id='c', head_id='nope'), expected_revision=None)
    orphan = ConversationEntry(parent_id='nope', message=ModelRequest(parts=[UserPromptPart('x')]))
    with pytest.raises(ConversationConflict):
        await store.write_record(
            ConversationRecord(conversation_id='c', head_id=orphan.id), new_entries=[orphan], expected_revision=None
        )
    assert await count_rows(ConversationRow) == 0 and await count_rows(ConversationEntryRow) == 0


async def test_read_history_limit_returns_last_n_in_order(store: PostgresConversationStore) -> None:
    agent = Agent(FunctionModel(Recorder(), model_name='gpt-4o-mini'))
    for prompt in ['one', 'two', 'three']:
        await turn(store, agent, 'c', prompt)
    entries = await store.load_entries('c')
    head = entries[-1].id

    assert await store.read_history(head) == entries
    assert await store.read_history(head, limit=2) == entries[-2:]
    assert await store.read_history(head, limit=1) == entries[-1:]
    assert await store.read_history(head, limit=0) == []
    assert await store.read_history(head, limit=99) == entries
    assert await store.read_history(None) == []
    assert await store.read_history(entries[2].id) == entries[:3]
    # Same answers as the base class's entry-by-entry walk.
    for limit in [None, 0, 1, 4, 6, 7]:
        assert await store.read_history(head, limit=limit) == await ConversationStore.read_history(
            store, head, limit=limit
        )
    with pytest.raises(KeyError):
        await store.read_history('unknown')
    loaded = await store.load('c', limit=3)
    assert loaded.messages == [e.message for e in entries[-3:]]


# --- serialization -------------------------------------------------------------------------------


async def test_entries_and_records_survive_json_round_trip(store: PostgresConversationStore) -> None:
    agent = tool_agent()
    await turn(store, agent, 'c', 'find kale')
    second, saved = await turn(store, agent, 'c', 'and again')

    loaded = await store.load('c')
    assert loaded.messages == second.all_messages()
    assert loaded.usage == second.usage
    assert loaded.usage.tool_calls == 2 and loaded.usage.cache_read_tokens == 200
    assert isinstance(loaded.usage.cost, Decimal) and loaded.usage.cost == second.usage.cost
    calls = [p for m in loaded.messages for p in m.parts if isinstance(p, ToolCallPart)]
    assert [c.args for c in calls] == [{'q': 'kale', 'limit': 2}] * 2
    returns = [p for m in loaded.messages for p in m.parts if isinstance(p, ToolReturnPart)]
    assert returns[0].content == {'q': 'kale', 'hits': ['kale-0', 'kale-1']}
    responses = [m for m in loaded.messages if isinstance(m, ModelResponse)]
    assert [r.usage for r in responses] == [r.usage for r in second.all_messages() if isinstance(r, ModelResponse)]
    assert [await store.read_entry(e.id) for e in saved] == saved

    # Stored as JSON objects, readable from SQL.
    async with get_db_session(account=Unscoped.ADMIN) as session:
        kinds = (
            await session.execute(text("SELECT message ->> 'kind' FROM conversation_entries ORDER BY id"))
        ).scalars()
        assert sorted(kinds) == ['request'] * 4 + ['response'] * 4

    record = ConversationRecord(
        conversation_id='r',
        head_id=None,
        usage=RunUsage(requests=2, input_tokens=10, cost=Decimal('0.000123'), details={'reasoning': 3}),
        scope='ann',
        forked_from='x',
        branches=['a', 'b'],
    )
    await store.write_record(record, expected_revision=None)
    assert await store.read_record('r') == record


# --- parity with InMemoryConversationStore -------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def request(text_: str) -> ModelRequest:
    return ModelRequest(parts=[UserPromptPart(text_, timestamp=T0)], timestamp=T0)


def response(text_: str) -> ModelResponse:
    return ModelResponse(parts=[TextPart(text_)], usage=RequestUsage(input_tokens=7, output_tokens=3), timestamp=T0)


async def scripted(store: ConversationStore) -> list[Any]:
    """A fixed sequence of store operations; returns what it observed, with entry ids made positional."""
    labels: dict[str, str] = {}

    def label(entry_id: str | None) -> str | None:
        return None if entry_id is None else labels.setdefault(entry_id, f'e{len(labels)}')

    def record_view(record: ConversationRecord | None) -> Any:
        if record is None:
            return None
        return (
            record.conversation_id,
            label(record.head_id),
            record.scope,
            record.forked_from,
            label(record.forked_at),
            [label(b) for b in record.branches],
            record.usage,
        )

    async def attempt(coro: Any) -> Any:
        try:
            return await coro
        except Exception as exc:
            return type(exc).__name__

    seen: list[Any] = []
    first = Conversation(conversation_id='c', messages=[request('q1'), response('a1')], usage=RunUsage(requests=1))
    seen.append([label(e.id) for e in await store.save(first, scope='u')])
    stale = copy.deepcopy(first)
    first.messages += [request('q2'), response('a2')]
    seen.append([(label(e.id), label(e.parent_id)) for e in await store.save(first)])
    seen.append(await attempt(store.save(stale)))
    seen.append(await attempt(store.save(Conversation(conversation_id='c', messages=[request('x')]))))
    seen.append(await attempt(store.save(first, scope='other')))
    # A rewritten history (as after compaction) branches off the shared prefix.
    rewritten = Conversation(
        conversation_id='c', messages=[request('q1'), response('a1'), request('q2*')], revision=first.revision
    )
    seen.append([(label(e.id), label(e.parent_id)) for e in await store.save(rewritten)])
    seen.append(record_view(await store.read_record('c')))
    fork = await store.fork('c', at=2, new_conversation_id='f', scope='v')
    seen.append((fork.messages == [request('q1'), response('a1')], record_view(await store.read_record('f'))))
    seen.append(await attempt(store.fork('c', at=9)))
    branched = await store.branch('c', at=1, expected_revision=rewritten.revision)
    seen.append(([m.kind for m in branched.messages], record_view(await store.read_record('c'))))
    seen.append(await attempt(store.branch('c', at=1, expected_revision='stale')))
    seen.append([record_view(r) for r in await store.list_conversations()])
    seen.append([record_view(r) for r in await store.list_conversations(scope='v')])
    seen.append([label(e.id) for e in await store.load_entries('c', limit=1)])
    seen.append((await store.load('c', scope='v'), await store.load_entries('missing')))
    all_ids = list(labels)
    await store.delete('c', scope='v')  # wrong scope: kept
    seen.append(record_view(await store.read_record('c')))
    await store.delete('c')
    seen.append([label(i) for i in all_ids if await attempt(store.read_entry(i)) != 'KeyError'])
    seen.append([m.parts[0].content for m in (await store.load('f')).messages])
    await store.delete('f')
    seen.append([label(i) for i in all_ids if await attempt(store.read_entry(i)) != 'KeyError'])
    seen.append(await store.list_conversations())
    return seen


async def test_parity_with_in_memory_store(store: PostgresConversationStore) -> None:
    expected = await scripted(InMemoryConversationStore())
    assert await scripted(store) == expected
    # The script really exercised the interesting paths.
    assert expected[2] == expected[3] == expected[4] == 'ConversationConflict'
    assert expected[8] == 'UserError' and expected[10] == 'ConversationConflict'
    assert expected[9][1][5] == ['e3', 'e4']  # two branches left
    assert expected[16] == ['e0', 'e1'] and expected[18] == []  # pruned down to the fork's entries, then to none


async def test_nul_characters_do_not_lose_the_turn(store: PostgresConversationStore) -> None:
    """PostgreSQL rejects NUL in jsonb; a tool result containing one must not make the save fail."""
    agent = Agent(FunctionModel(lambda messages, info: ModelResponse(parts=[TextPart('bin\x00ary')])))
    conversation = await load_conversation(store, 'nul')
    result = await agent.run('read\x00me', conversation=conversation)
    await save_turn(store, result)
    loaded = await store.load('nul')
    assert loaded is not None
    assert loaded.messages[-1].parts[0].content == 'bin\ufffdary'


async def test_delete_prunes_only_what_no_other_record_reaches_of_its_history(store: PostgresConversationStore) -> None:
    # Other records reach a deleted history through their head (a fork with no message of its own), a branch tip,
    # or an entry of their own whose parent is in it (a fork that continued): each keeps that entry and its ancestors.
    agent = Agent(FunctionModel(Recorder(), model_name='gpt-4o-mini'))
    for prompt in ['one', 'two', 'three']:
        await turn(store, agent, 'main', prompt)
    main_entries = await store.load_entries('main')
    continued = await store.fork('main', at=4, new_conversation_id='continued')
    await save_turn(store, await agent.run('four', conversation=continued))
    await store.fork('main', at=3, new_conversation_id='bare')
    await store.fork('main', new_conversation_id='branched')
    branched = await store.branch('branched', at=2, expected_revision=(await store.read_record('branched')).revision)
    await save_turn(store, await agent.run('two, again', conversation=branched))
    assert (await store.read_record('branched')).branches == [main_entries[-1].id]
    histories = {c: await store.load_entries(c) for c in ['continued', 'bare', 'branched']}
    assert await count_rows(ConversationEntryRow) == 10

    await store.delete('main')  # every entry of it is reached by another record
    assert await count_rows(ConversationEntryRow) == 10
    assert {c: await store.load_entries(c) for c in histories} == histories
    back = await store.branch(
        'branched', from_entry=main_entries[-1].id, expected_revision=(await store.read_record('branched')).revision
    )
    assert back.messages == [entry.message for entry in main_entries]
    await store.delete('continued')  # its own two go; main's first four stay (main's fifth, branched's, is a child)
    assert await count_rows(ConversationEntryRow) == 8
    assert await store.load_entries('bare') == histories['bare']
    await store.delete('branched')  # its own two and main's last three go; bare's head and ancestors stay
    assert await count_rows(ConversationEntryRow) == 3
    assert await store.load_entries('bare') == histories['bare'] == main_entries[:3]
    await store.delete('bare')
    assert await count_rows(ConversationEntryRow) == 0


async def test_a_delete_in_progress_holds_no_save_of_another_conversation(store: PostgresConversationStore) -> None:
    # The delete used to take the account's exclusive lock for its whole prune: every save of the account waited
    # (0.5 s behind a 5,000-turn conversation's delete). Now it locks only its history's entries.
    agent = Agent(FunctionModel(Recorder(), model_name='gpt-4o-mini'))
    for prompt in ['one', 'two']:
        await turn(store, agent, 'main', prompt)
    await turn(store, agent, 'saved', 'one')
    await turn(store, agent, 'appended', 'one')
    main_entries = await store.load_entries('main')
    await store.fork('main', at=2, new_conversation_id='fork')
    async with get_db_session(account=Unscoped.ADMIN) as holder:
        # A writer pointing at main's last entry (as a fork of it would): the delete waits for it before its prune.
        lock = 'SELECT id FROM conversation_entries WHERE id = :id FOR KEY SHARE'
        await holder.execute(text(lock), {'id': main_entries[-1].id})
        deleting = asyncio.create_task(store.delete('main'))
        await wait_until_waiting_on_a_lock('%history(id, parent_id)')
        async with asyncio.timeout(5):  # both ways a turn saves, on two other conversations of the account
            await turn(store, agent, 'saved', 'two')
            recent = await load_recent_conversation(store, 'appended', max_tokens=16_000)
            await append_turn(store, await agent.run('two', conversation=recent.conversation), recent)
        assert not deleting.done()
    await deleting
    assert await store.read_record('main') is None
    # main's own two entries are gone; the two the fork shares with it stay.
    assert await store.load_entries('fork') == main_entries[:2]
    assert await count_rows(ConversationEntryRow) == 2 + 4 + 4


async def title_column(store: PostgresConversationStore, conversation_id: str) -> str | None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        query = select(ConversationRow.title).where(
            ConversationRow.account_id == store.account_id, ConversationRow.conversation_id == conversation_id
        )
        return (await session.execute(query)).scalar_one()


async def test_a_title_is_set_by_revision_and_expected_title_and_a_save_keeps_it(
    store: PostgresConversationStore,
) -> None:
    """pydantic-ai 2.78's `update(title=...)` raised NotImplementedError (no `write_details`), and its records read
    back had no title though the runtime had stored one (a QA run). The title is the conversation's column, which the
    runtime's own titles fill when empty and listings show."""
    agent = Agent(FunctionModel(Recorder(), model_name='gpt-4o-mini'))
    await turn(store, agent, 'titled', 'hello')
    record = await store.read_record('titled')
    assert record is not None
    with pytest.raises(ConversationConflict):  # another revision: nothing written
        await store.write_details('titled', {'title': 'Mine'}, expected_revision='not-it')
    written = await store.write_details(
        'titled', {'title': 'Mine\x00'}, expected_revision=record.revision, expected={'title': None}
    )
    assert await title_column(store, 'titled') == 'Mine\N{REPLACEMENT CHARACTER}'
    with pytest.raises(ConversationConflict):  # it is titled now: a writer that expects no title writes nothing
        await store.write_details(
            'titled', {'title': 'Theirs'}, expected_revision=record.revision, expected={'title': None}
        )
    # An expected title is compared as it would be stored (a NUL in it was a driver error in the comparison).
    await store.write_details(
        'titled', {'title': 'Mine\x00'}, expected_revision=record.revision, expected={'title': 'Mine\x00'}
    )
    with pytest.raises(NotImplementedError, match='summary'):  # what the store does not keep on a record
        await store.write_details('titled', {'summary': 'x'}, expected_revision=record.revision)
    with pytest.raises(InvalidInputError) as too_long:
        await store.write_details('titled', {'title': 'x' * 201}, expected_revision=record.revision)
    assert too_long.value.field == 'title'

    after = await store.read_record('titled')
    assert after is not None and after.revision == record.revision and after.updated_at == record.updated_at
    await turn(store, agent, 'titled', 'and again')  # a save keeps the title
    assert await title_column(store, 'titled') == 'Mine\N{REPLACEMENT CHARACTER}'
    if RECORDS_HAVE_METADATA:  # pydantic-ai 2.78, whose records carry a title: what its users read and update
        assert getattr(written, 'title', None) == 'Mine\N{REPLACEMENT CHARACTER}'
        assert [getattr(r, 'title', None) for r in await store.read_records()] == ['Mine\N{REPLACEMENT CHARACTER}']
        updated = await store.update('titled', title='Renamed')  # type: ignore[attr-defined, unused-ignore]
        assert updated.title == 'Renamed' and await title_column(store, 'titled') == 'Renamed'
        listed = await store.list_conversations()
        assert [getattr(r, 'title', None) for r in listed] == ['Renamed']


async def test_metadata_set_by_update_is_kept_by_the_saves_that_follow(store: PostgresConversationStore) -> None:
    """pydantic-ai 2.78's `update(metadata=...)` needs `write_details`, and a save (a turn's append, pydantic-ai's
    `save`) replaces the record: it must keep metadata set since the record it saves was read."""
    agent = Agent(FunctionModel(Recorder(), model_name='gpt-4o-mini'))
    await turn(store, agent, 'tagged', 'hello')
    loaded = await load_conversation(store, 'tagged')  # read before the update: its save must not undo it
    record = await store.read_record('tagged')
    assert record is not None
    if not RECORDS_HAVE_METADATA:  # pydantic-ai 2.68: records have no metadata to keep
        with pytest.raises(NotImplementedError, match='metadata'):
            await store.write_details('tagged', {'metadata': {'a': 1}}, expected_revision=record.revision)
        return
    for bad in ([1], {'x': float('nan')}, {'x': object()}):
        with pytest.raises(InvalidInputError) as refused:
            await store.write_details('tagged', {'metadata': bad}, expected_revision=record.revision)
        assert refused.value.field == 'metadata'
    written = await store.write_details(
        'tagged', {'metadata': {'team': 'a\x00b', 'n': 1}}, expected_revision=record.revision
    )
    assert getattr(written, 'metadata', None) == {'team': 'a\N{REPLACEMENT CHARACTER}b', 'n': 1}
    result = await agent.run('again', conversation=loaded)
    await save_turn(store, result)  # the turn's one-statement append
    after_turn = await store.read_record('tagged')
    assert after_turn is not None and after_turn.revision != record.revision
    assert getattr(after_turn, 'metadata', None) == {'team': 'a\N{REPLACEMENT CHARACTER}b', 'n': 1}
    updated = await store.update('tagged', metadata={'team': 'b'})  # type: ignore[attr-defined, unused-ignore]
    assert updated.metadata == {'team': 'b'}
    stale = await store.load('tagged')
    assert stale is not None
    await store.update('tagged', metadata={'team': 'c'})  # type: ignore[attr-defined, unused-ignore]
    again = await agent.run('once more', conversation=stale)
    await store.save(again)  # pydantic-ai's save: write_record, with the metadata as it was loaded
    final = await store.read_record('tagged')
    assert final is not None and getattr(final, 'metadata', None) == {'team': 'c'}
    whole = await store.load('tagged')
    assert whole is not None and len(whole.messages) == 6  # three turns saved
