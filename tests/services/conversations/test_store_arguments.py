"""PostgresConversationStore refuses ids PostgreSQL cannot take, in every public method, before any SQL.

pydantic-ai's UI adapters and user code call the store directly, with ids nobody checked: a NUL or a lone surrogate
(anywhere in the id), an id longer than its column, or one that is not text used to fail with a raw driver error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic_ai import Conversation, ModelRequest, UserPromptPart
from pydantic_ai.conversation_store import ConversationEntry, ConversationRecord
from sqlalchemy import text

from agentrt.db.driver import driver_transaction
from agentrt.db.errors import InvalidInputError
from agentrt.db.models import Account
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.conversations import PostgresConversationStore, TurnClaim, conversation_claim
from agentrt.services.conversations._arguments import (
    CLAIM_ID_CHARS,
    CONVERSATION_ID_CHARS,
    ENTRY_ID_CHARS,
    KIND_CHARS,
    MAX_LIMIT,
    REVISION_CHARS,
    SCOPE_CHARS,
    checked_metadata,
)
from tests.factories import listening

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclasses.dataclass(frozen=True)
class Stored:
    """A conversation 'c' (scope 's') of two entries, stored before each case."""

    store: PostgresConversationStore
    revision: str
    first: str
    head: str

    def record(self, **changes: Any) -> ConversationRecord:
        """A new conversation's record, valid but for `changes` (what `write_record` and `append` are given)."""
        record = ConversationRecord(conversation_id='new', head_id=None, scope='s', updated_at=T0)
        return dataclasses.replace(record, **changes)


def _request(words: str) -> ModelRequest:
    return ModelRequest(parts=[UserPromptPart(words, timestamp=T0)], timestamp=T0)


Call = Callable[[Stored, Any], Awaitable[Any]]


async def _claim_and_read_tail(stored: Stored, value: Any) -> Any:
    claim = TurnClaim.mint(stored.store.account_id, 'c', lease_s=30)
    async with driver_transaction(account=stored.store.account_id) as transaction:
        return await stored.store.claim_and_read_tail(
            transaction, value, claim_sql=claim.sql, claim_params=claim.params(), cap_chars=1000, max_messages=10
        )


async def _conversation_claim(stored: Stored, value: Any) -> None:
    async with conversation_claim(stored.store.account_id, value, lease_s=30):
        pass


async def _mint(stored: Stored, value: Any) -> TurnClaim:
    return TurnClaim.mint(stored.store.account_id, value, lease_s=30)


async def _write_entry(stored: Stored, **changes: Any) -> None:
    entry = dataclasses.replace(ConversationEntry(parent_id=None, message=_request('hi')), **changes)
    await stored.store.write_record(stored.record(), new_entries=[entry], expected_revision=None)


def _record_fields(method: str, call: Callable[[Stored, ConversationRecord], Awaitable[Any]]) -> list[Any]:
    """A case per id of a record: the value replaces that field of an otherwise valid new record."""
    fields = [
        ('conversation_id', CONVERSATION_ID_CHARS),
        ('scope', SCOPE_CHARS),
        ('head_id', ENTRY_ID_CHARS),
        ('revision', REVISION_CHARS),
        ('forked_from', None),  # in the record's JSON only: no column, no length limit
        ('forked_at', ENTRY_ID_CHARS),
    ]
    cases = [
        (method, f'record.{name}', limit, lambda s, v, name=name: call(s, s.record(**{name: v})))
        for name, limit in fields
    ]
    cases.append((method, 'record.branches[1]', ENTRY_ID_CHARS, lambda s, v: call(s, s.record(branches=['b', v]))))
    return cases


# (method, the argument as the error names it, its length limit (None: none), the call with the value in its place)
CASES: list[tuple[str, str, int | None, Call]] = [
    (
        'read_tail',
        'conversation_id',
        CONVERSATION_ID_CHARS,
        lambda s, v: s.store.read_tail(v, cap_chars=9, max_messages=9),
    ),
    ('claim_and_read_tail', 'conversation_id', CONVERSATION_ID_CHARS, _claim_and_read_tail),
    ('conversation_claim', 'conversation_id', CONVERSATION_ID_CHARS, _conversation_claim),
    ('TurnClaim.mint', 'conversation_id', CONVERSATION_ID_CHARS, _mint),
    *_record_fields('append', lambda s, r: s.store.append(r, [_request('hi')], expected_revision=None)),
    (
        'append',
        'expected_revision',
        REVISION_CHARS,
        lambda s, v: s.store.append(
            s.record(conversation_id='c', head_id=s.head), [_request('hi')], expected_revision=v
        ),
    ),
    (
        'append',
        'claim_id',
        CLAIM_ID_CHARS,
        lambda s, v: s.store.append(s.record(), [_request('hi')], expected_revision=None, claim_id=v),
    ),
    ('read_record', 'conversation_id', CONVERSATION_ID_CHARS, lambda s, v: s.store.read_record(v)),
    ('read_revision', 'conversation_id', CONVERSATION_ID_CHARS, lambda s, v: s.store.read_revision(v)),
    ('read_records', 'scope', SCOPE_CHARS, lambda s, v: s.store.read_records(scope=v)),
    *_record_fields('write_record', lambda s, r: s.store.write_record(r, expected_revision=None)),
    ('write_record', 'new_entries[0].id', ENTRY_ID_CHARS, lambda s, v: _write_entry(s, id=v)),
    ('write_record', 'new_entries[0].parent_id', ENTRY_ID_CHARS, lambda s, v: _write_entry(s, parent_id=v)),
    ('write_record', 'new_entries[0].kind', KIND_CHARS, lambda s, v: _write_entry(s, kind=v)),
    (
        'write_record',
        'expected_revision',
        REVISION_CHARS,
        lambda s, v: s.store.write_record(s.record(conversation_id='c', head_id=s.head), expected_revision=v),
    ),
    (
        'delete_record',
        'conversation_id',
        CONVERSATION_ID_CHARS,
        lambda s, v: s.store.delete_record(v, expected_revision=s.revision),
    ),
    (
        'delete_record',
        'expected_revision',
        REVISION_CHARS,
        lambda s, v: s.store.delete_record('c', expected_revision=v),
    ),
    ('read_entry', 'entry_id', ENTRY_ID_CHARS, lambda s, v: s.store.read_entry(v)),
    ('read_history', 'head_id', ENTRY_ID_CHARS, lambda s, v: s.store.read_history(v)),
    ('load', 'conversation_id', CONVERSATION_ID_CHARS, lambda s, v: s.store.load(v)),
    ('load', 'scope', SCOPE_CHARS, lambda s, v: s.store.load('c', scope=v)),
    ('load_entries', 'conversation_id', CONVERSATION_ID_CHARS, lambda s, v: s.store.load_entries(v)),
    ('load_entries', 'scope', SCOPE_CHARS, lambda s, v: s.store.load_entries('c', scope=v)),
    (
        'save',
        'conversation.conversation_id',
        CONVERSATION_ID_CHARS,
        lambda s, v: s.store.save(Conversation(conversation_id=v, messages=[_request('hi')])),
    ),
    (
        'save',
        'conversation.revision',
        REVISION_CHARS,
        lambda s, v: s.store.save(Conversation(conversation_id='c', messages=[_request('hi')], revision=v)),
    ),
    (
        'save',
        'scope',
        SCOPE_CHARS,
        lambda s, v: s.store.save(Conversation(conversation_id='new', messages=[_request('hi')]), scope=v),
    ),
    (
        'branch',
        'conversation_id',
        CONVERSATION_ID_CHARS,
        lambda s, v: s.store.branch(v, at=1, expected_revision=s.revision),
    ),
    (
        'branch',
        'from_entry',
        ENTRY_ID_CHARS,
        lambda s, v: s.store.branch('c', from_entry=v, expected_revision=s.revision),
    ),
    ('branch', 'expected_revision', REVISION_CHARS, lambda s, v: s.store.branch('c', at=1, expected_revision=v)),
    ('branch', 'scope', SCOPE_CHARS, lambda s, v: s.store.branch('c', at=1, expected_revision=s.revision, scope=v)),
    ('fork', 'conversation_id', CONVERSATION_ID_CHARS, lambda s, v: s.store.fork(v)),
    ('fork', 'from_entry', ENTRY_ID_CHARS, lambda s, v: s.store.fork('c', from_entry=v)),
    ('fork', 'new_conversation_id', CONVERSATION_ID_CHARS, lambda s, v: s.store.fork('c', new_conversation_id=v)),
    ('fork', 'scope', SCOPE_CHARS, lambda s, v: s.store.fork('c', scope=v)),
    ('fork', 'source_scope', SCOPE_CHARS, lambda s, v: s.store.fork('c', source_scope=v)),
    ('list_conversations', 'scope', SCOPE_CHARS, lambda s, v: s.store.list_conversations(scope=v)),
    ('delete', 'conversation_id', CONVERSATION_ID_CHARS, lambda s, v: s.store.delete(v)),
    ('delete', 'scope', SCOPE_CHARS, lambda s, v: s.store.delete('c', scope=v)),
]


def _hostile(limit: int | None) -> Iterator[tuple[Any, str]]:
    """Each value the store refuses, with the part of the message that says why."""
    yield '\x00abc', "'\\x00abc' has a character PostgreSQL cannot store at position 0 (U+0000, NUL)"
    yield 'ab\x00c', 'at position 2 (U+0000, NUL)'
    yield 'abc\x00', 'at position 3 (U+0000, NUL)'
    yield '\ud800abc', "'\\ud800abc' has a character PostgreSQL cannot store at position 0 (U+D800, a lone surrogate)"
    yield 'ab\udfffc', 'at position 2 (U+DFFF, a lone surrogate)'
    yield 'abc\udbff', 'at position 3 (U+DBFF, a lone surrogate)'
    yield 7, 'must be text, not int'
    if limit is not None:
        yield 'x' * (limit + 1), f'is {limit + 1:,} characters long; the limit is {limit}'


@pytest.fixture
async def stored() -> Stored:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        account = Account(slug='tenant-a', name='Tenant A')
        session.add(account)
        await session.flush()
        account_id = account.id
    store = PostgresConversationStore(account_id)
    conversation = Conversation(conversation_id='c', messages=[_request('one'), _request('two')])
    first, head = await store.save(conversation, scope='s')
    assert conversation.revision is not None
    return Stored(store, conversation.revision, first.id, head.id)


async def _contents() -> list[Any]:
    """Every row of the conversation tables, as text."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = await session.execute(
            text(
                'SELECT (SELECT array_agg(c::text ORDER BY c::text) FROM conversations AS c), '
                '(SELECT array_agg(e::text ORDER BY e::text) FROM conversation_entries AS e), '
                '(SELECT array_agg(t::text ORDER BY t::text) FROM conversation_turns AS t)'
            )
        )
        return list(rows.one())


@pytest.mark.parametrize(('method', 'field', 'limit', 'call'), CASES, ids=[f'{m}-{f}' for m, f, _, _ in CASES])
async def test_every_public_method_refuses_an_id_postgresql_cannot_take_before_any_sql(
    stored: Stored, method: str, field: str, limit: int | None, call: Call
) -> None:
    before = await _contents()
    statements: list[str] = []

    def on_statement(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        statements.append(statement)

    with listening(('before_cursor_execute', on_statement)):
        for value, problem in _hostile(limit):
            with pytest.raises(InvalidInputError) as refused:
                await call(stored, value)
            assert isinstance(refused.value, ValueError) and refused.value.field == field
            assert str(refused.value).startswith(f'the {field} ') and problem in str(refused.value), refused.value
    assert statements == [], f'{method} sent SQL before refusing its {field}'
    assert await _contents() == before  # nothing written (no claim taken either)


async def test_a_limit_is_a_whole_number_from_zero(stored: Stored) -> None:
    store = stored.store
    calls = {'records': store.read_records, 'history': lambda limit: store.read_history(stored.head, limit=limit)}
    for call in calls.values():
        for limit, problem in ((-1, 'from 0 to'), (MAX_LIMIT + 1, 'from 0 to'), ('3', 'whole number, not str')):
            with pytest.raises(InvalidInputError, match=problem):
                await call(limit=limit)
    assert len(await store.read_records(limit=MAX_LIMIT)) == 1 and len(await store.read_records(limit=0)) == 0
    assert [entry.id for entry in await store.read_history(stored.head, limit=MAX_LIMIT)] == [stored.first, stored.head]
    assert [entry.id for entry in await store.read_history(stored.head, limit=1)] == [stored.head]


async def test_ids_at_their_limits_with_any_other_character_are_stored_and_read_back(stored: Stored) -> None:
    # The store refuses only what PostgreSQL cannot take: not the stricter rules of a chat turn's session id.
    conversation_id = 'a/b c\u00e9\U0001f600' + 'x' * (CONVERSATION_ID_CHARS - 7)
    scope = '\u2028' * SCOPE_CHARS
    conversation = Conversation(conversation_id=conversation_id, messages=[_request('hi')])
    [entry] = await stored.store.save(conversation, scope=scope)
    record = await stored.store.read_record(conversation_id)
    assert record is not None and (record.conversation_id, record.scope) == (conversation_id, scope)
    assert [r.conversation_id for r in await stored.store.read_records(scope=scope)] == [conversation_id]
    assert (await stored.store.read_entry(entry.id)).id == entry.id
    assert await stored.store.read_record('') is None  # an empty id is an id like any other (none stored here)


async def test_a_tails_sizes_are_whole_numbers_from_zero(stored: Stored) -> None:
    store = stored.store

    async def claimed(conversation_id: str, **sizes: Any) -> Any:
        claim = TurnClaim.mint(store.account_id, conversation_id, lease_s=30)
        async with driver_transaction(account=store.account_id) as transaction:
            return await store.claim_and_read_tail(
                transaction, conversation_id, claim_sql=claim.sql, claim_params=claim.params(), **sizes
            )

    before = await _contents()
    for call in (store.read_tail, claimed):
        for name in ('cap_chars', 'max_messages'):
            for value, problem in ((-1, 'from 0 to'), (MAX_LIMIT + 1, 'from 0 to'), ('9', 'whole number, not str')):
                sizes: dict[str, Any] = {'cap_chars': 9, 'max_messages': 9} | {name: value}
                with pytest.raises(InvalidInputError, match=f'the {name} must be .*{problem}') as refused:
                    await call('c', **sizes)
                assert refused.value.field == name
    assert await _contents() == before  # nothing written, no claim taken
    tail = await store.read_tail('c', cap_chars=MAX_LIMIT, max_messages=MAX_LIMIT)
    assert tail is not None and len(tail.messages) == 2
    tail = await store.read_tail('c', cap_chars=0, max_messages=MAX_LIMIT)
    assert tail is not None and len(tail.messages) == 1  # the head is read whatever the cap (the entry crossing it)


def test_metadata_nested_too_deeply_is_refused_naming_it() -> None:
    # 500 levels raised Python's RecursionError as it was, from the store's own copy (QA): `update(metadata=)`'s check,
    # called here itself (pydantic-ai 2.68's store has no `update`).
    deep: dict[str, object] = {'leaf': 1}
    for _ in range(5_000):
        deep = {'k': deep}
    with pytest.raises(InvalidInputError, match='the metadata is nested too deeply to store') as refused:
        checked_metadata(deep)
    assert refused.value.field == 'metadata'
