"""`PostgresConversationStore`: pydantic-ai's `ConversationStore` in PostgreSQL, scoped to one account."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

from pydantic_ai import Conversation
from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
    ConversationStore,
)
from pydantic_ai.messages import ModelMessage
from pydantic_ai.run import AgentRunResult
from sqlalchemy import Executable, Integer, Table, func, literal, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.driver import DriverStatement, DriverTransaction, driver_transaction
from agentrt.db.errors import DatabaseDisconnectedError
from agentrt.db.models import ConversationEntryRow, ConversationRow
from agentrt.db.session import get_db_session, retry_on_disconnect
from agentrt.services.conversations._arguments import (
    check_claim_id,
    check_conversation_id,
    check_entries,
    check_entry_id,
    check_limit,
    check_record,
    check_revision,
    check_scope,
)
from agentrt.services.conversations._off_loop import off_loop
from agentrt.services.conversations._statements import (
    APPEND_CREATE_ON_DRIVER,
    APPEND_UPDATE_ON_DRIVER,
    LOCK_NAMESPACE,
    PRUNE_DELETED_HISTORY,
    TAIL_ON_DRIVER,
    claimed_tail,
)
from agentrt.services.conversations._stored import (
    Appended,
    StoredTail,
    entry_adapter,
    message_json,
    record_adapter,
    storable_json,
    stored_tail,
)
from agentrt.services.pg_text import storable, storable_text

T = TypeVar('T')
R = TypeVar('R')
Summariser = Callable[[list[ConversationEntry], list[int]], Awaitable[tuple[str | None, str] | None]]
"""Given a save's new entries and their stored JSON sizes: the title (None: keep) and summary to store with them."""
logger = logging.getLogger('agentrt.conversations')

# Core tables (the ORM types `__table__` as a plain FromClause): inserts and deletes here stay Core statements.
_records = cast(Table, ConversationRow.__table__)
_entries = cast(Table, ConversationEntryRow.__table__)


def _check_tail(conversation_id: object, cap_chars: object, max_messages: object) -> None:
    check_conversation_id(conversation_id)
    check_limit(cap_chars, 'cap_chars')
    check_limit(max_messages, 'max_messages')


async def _read(account_id: int, run: Callable[[AsyncSession], Awaitable[R]], take: Callable[[R], T]) -> T:
    """Run a query in its own session of `account_id` and take its rows; once more on a fresh connection if the first
    was lost."""

    async def once() -> T:
        async with get_db_session(account=account_id) as session:
            return take(await run(session))

    return await retry_on_disconnect(once, what='conversation read')


async def read_on_driver(account_id: int, statement: DriverStatement, params: Mapping[str, Any]) -> list[Any]:
    """The rows of a read `statement` in a driver transaction of its own as `account_id`; once more on a fresh
    connection if the first was lost."""

    async def once() -> list[Any]:
        async with driver_transaction(account=account_id) as own:
            return await own.fetch(statement, params)

    return await retry_on_disconnect(once, what='conversation read')


class PostgresConversationStore(ConversationStore):
    """A `ConversationStore` in PostgreSQL, holding one account's conversations.

    Every query is filtered by `account_id`, so two accounts can use the same conversation id without
    seeing each other; `scope` (a user, a channel) narrows further within the account. Each primitive
    opens its own short session, so one store can serve concurrent tasks and never holds a connection
    between calls.

    Saves use compare-and-swap on the record's revision: of two turns saved from the same revision one
    wins and the other gets `ConversationConflict`. Deleting a conversation also deletes the entries of its
    history that no remaining record of the account reaches (forks pointing into it keep theirs). Writes take a
    shared per-account advisory lock and deletes an exclusive one, so the pruning never races a save or fork that
    points at an entry it would delete.

    Every public method refuses, before any SQL, an id PostgreSQL cannot take as it is (`InvalidInputError`, a
    `ValueError`, naming the argument): not text, longer than its column, or holding a NUL or a lone surrogate
    (`_arguments`). A `limit` is a whole number from 0 to 2**31 - 1.
    """

    def __init__(self, account_id: int) -> None:
        """Create a store for one account's conversations.

        Args:
            account_id: The account (tenant) whose conversations this store reads and writes.
        """
        self.account_id = account_id

    async def read_tail(
        self,
        conversation_id: str,
        *,
        cap_chars: int,
        max_messages: int,
        transaction: DriverTransaction | None = None,
        in_thread: bool = False,
    ) -> StoredTail | None:
        """The record and the newest messages of a conversation, up to about `cap_chars` of stored JSON: one query.

        Messages are validated once, from the text PostgreSQL sends (no intermediate Python objects).

        Args:
            conversation_id: the conversation.
            cap_chars: stop walking back once this much JSON was read (the entry that crosses it is included).
            max_messages: read at most this many.
            transaction: run in the caller's transaction (`driver_transaction`); else in one of its own (repeated
                once if the connection is lost: a read).
            in_thread: validate the messages in a worker thread, a piece at a time (`_off_loop`), not on the event
                loop: for a read that may be megabytes (a whole conversation).

        Returns:
            None when the account has no such conversation.

        Raises:
            InvalidInputError: `conversation_id` is not an id the store can hold, or `cap_chars` or `max_messages` is
                not a whole number from 0 to 2**31 - 1.
        """
        _check_tail(conversation_id, cap_chars, max_messages)
        params = {
            'account_id': self.account_id,
            'conversation_id': conversation_id,
            'cap': cap_chars,
            'max_messages': max_messages,
        }
        if transaction is not None:
            rows = await transaction.fetch(TAIL_ON_DRIVER, params)
        else:
            rows = await read_on_driver(self.account_id, TAIL_ON_DRIVER, params)
        if not rows:
            return None
        return await off_loop(stored_tail, rows, 0) if in_thread else stored_tail(rows, 0)

    async def claim_and_read_tail(
        self,
        transaction: DriverTransaction,
        conversation_id: str,
        *,
        claim_sql: str,
        claim_params: Mapping[str, Any],
        cap_chars: int,
        max_messages: int,
    ) -> tuple[bool, StoredTail | None]:
        """`read_tail` in the caller's transaction, after `claim_sql` in the same statement (a chat turn's start).

        The claim and the tail share the statement's snapshot. When that snapshot still showed another turn's claim
        (a turn that was saving: its save releases the claim in its own transaction, and this statement waited for
        it), the tail is read again in a statement of its own, so a turn always starts from the last saved turn, as
        when the claim and the load were two statements.

        Args:
            transaction: the caller's transaction on the driver connection.
            conversation_id: the conversation.
            claim_sql: a statement (`TurnClaim.sql`) that returns a row when it took the claim.
            claim_params: its parameters, with the claim's `claim_id` (`account_id` and `conversation_id` are this
                store's and `conversation_id`).
            cap_chars: as for `read_tail`.
            max_messages: as for `read_tail`.

        Returns:
            Whether the claim was taken, and the tail (None when the account has no such conversation).

        Raises:
            InvalidInputError: `conversation_id` is not an id the store can hold, or `cap_chars` or `max_messages` is
                not a whole number from 0 to 2**31 - 1.
        """
        _check_tail(conversation_id, cap_chars, max_messages)
        params = {
            **claim_params,
            'account_id': self.account_id,
            'conversation_id': conversation_id,
            'cap': cap_chars,
            'max_messages': max_messages,
        }
        rows = await transaction.fetch(claimed_tail(claim_sql), params)
        taken, first = bool(rows[0][0]), rows[0]
        if taken and first[1]:
            # The snapshot showed another turn's claim, gone by the time this one was taken: that turn released it
            # (its save, which deletes the claim in the transaction that appends, committed while this statement
            # waited on the row), so the tail read with the snapshot may miss its messages. Read it again, as a new
            # statement (a new snapshot): the conversation as that turn left it.
            return True, await self.read_tail(
                conversation_id, cap_chars=cap_chars, max_messages=max_messages, transaction=transaction
            )
        return taken, (stored_tail(rows, 2) if first[2] is not None else None)

    async def append(
        self,
        record: ConversationRecord,
        messages: Sequence[ModelMessage],
        *,
        expected_revision: str | None,
        claim_id: str | None = None,
        summarise: Summariser | None = None,
    ) -> Appended:
        """Store `record` with `messages` appended after its previous head, in one statement and one transaction.

        The save of a turn that loaded the record: nothing is read first (the compare-and-swap on
        `expected_revision` finds a record changed since), and the turn's claim (`claim_id`) is released in the
        same transaction. `record.head_id` must be the parent of `messages[0]`: `append` mints the entries and
        sets `record.head_id` to the last one. A lost connection is handled as `write_record` does.

        `summarise`, when given, is awaited with the new entries and their stored JSON sizes before the write; the
        title and summary it returns (None: none now) are stored by the same statement (`Appended.summarised`).

        Raises:
            ConversationConflict: the stored revision is not `expected_revision` (or a record exists when it is
                None).
            InvalidInputError: an id of `record`, `expected_revision` or `claim_id` is not one the store can hold.
        """
        check_record(record)
        check_revision(expected_revision, 'expected_revision')
        check_claim_id(claim_id)
        entries: list[ConversationEntry] = []
        parent_id = record.head_id
        for message in messages:
            entries.append(ConversationEntry(parent_id=parent_id, message=message))
            parent_id = entries[-1].id
        record.head_id = parent_id
        bodies = [message_json(message) for message in messages]
        sizes = [len(body) for body in bodies]
        titled = await summarise(entries, sizes) if summarise is not None else None
        params = {
            'namespace': LOCK_NAMESPACE,
            'lock_key': self.account_id % 2**31,
            'account_id': self.account_id,
            'conversation_id': record.conversation_id,
            'scope': record.scope,
            'head_id': record.head_id,
            'revision': record.revision,
            'record': storable_json(record_adapter, record),
            'updated_at': record.updated_at,
            'expected_revision': expected_revision,
            'ids': [entry.id for entry in entries],
            'parent_ids': [entry.parent_id for entry in entries],
            'kinds': [entry.kind for entry in entries],
            'messages': bodies,
            'claim_id': claim_id,
            'title': storable_text(titled[0]) if titled is not None and titled[0] is not None else None,
            'summary': storable_text(titled[1]) if titled is not None else None,
        }
        statement = APPEND_CREATE_ON_DRIVER if expected_revision is None else APPEND_UPDATE_ON_DRIVER
        try:
            released = await self._append_write(record.conversation_id, statement, params)
        except DatabaseDisconnectedError as exc:
            logger.info('conversation %r: the save lost its connection (%s)', record.conversation_id, exc)
            # As in `write_record`: committed whole or not at all, and a second write is the same compare-and-swap.
            if await retry_on_disconnect(lambda: self._stored(record, entries), what='conversation save check'):
                released = claim_id is not None
            else:
                released = await self._append_write(record.conversation_id, statement, params)
        return Appended(entries, sizes, released, summarised=titled is not None)

    async def _append_write(self, conversation_id: str, statement: DriverStatement, params: dict[str, Any]) -> bool:
        """One attempt of `append`, in its own transaction; whether the claim was released.

        On the driver connection (`driver_transaction`: the same role, tenant, error translation and statement
        events as a session): one statement needs none of SQLAlchemy's statement machinery."""
        async with driver_transaction(account=self.account_id) as transaction:
            swapped, released = await self._append_once(transaction, statement, params)
        if not swapped:
            raise ConversationConflict(conversation_id)
        return bool(released)

    async def _append_once(
        self, transaction: DriverTransaction, statement: DriverStatement, params: dict[str, Any]
    ) -> tuple[int, int]:
        row = (await transaction.fetch(statement, params))[0]
        return row[0], row[1]

    # pydantic-ai's methods built on the primitives: their ids checked first, so a bad one is refused before any SQL
    # (a primitive would refuse it too, but some only after a read).

    async def load(
        self, conversation_id: str, *, limit: int | None = None, scope: str | None = None
    ) -> Conversation | None:
        check_conversation_id(conversation_id)
        check_scope(scope)
        return await super().load(conversation_id, limit=limit, scope=scope)

    async def load_entries(
        self, conversation_id: str, *, limit: int | None = None, scope: str | None = None
    ) -> list[ConversationEntry] | None:
        check_conversation_id(conversation_id)
        check_scope(scope)
        return await super().load_entries(conversation_id, limit=limit, scope=scope)

    async def save(
        self, conversation: Conversation | AgentRunResult[Any], *, scope: str | None = None
    ) -> list[ConversationEntry]:
        saved = conversation.conversation if isinstance(conversation, AgentRunResult) else conversation
        check_conversation_id(saved.conversation_id, 'conversation.conversation_id')
        check_revision(saved.revision, 'conversation.revision')
        check_scope(scope)
        return await super().save(conversation, scope=scope)

    async def branch(
        self,
        conversation_id: str,
        *,
        at: int | None = None,
        from_entry: str | None = None,
        expected_revision: str | None,
        scope: str | None = None,
    ) -> Conversation:
        check_conversation_id(conversation_id)
        check_entry_id(from_entry, 'from_entry')
        check_revision(expected_revision, 'expected_revision')
        check_scope(scope)
        return await super().branch(
            conversation_id, at=at, from_entry=from_entry, expected_revision=expected_revision, scope=scope
        )

    async def fork(
        self,
        conversation_id: str,
        *,
        at: int | None = None,
        from_entry: str | None = None,
        new_conversation_id: str | None = None,
        scope: str | None = None,
        source_scope: str | None = None,
    ) -> Conversation:
        check_conversation_id(conversation_id)
        check_entry_id(from_entry, 'from_entry')
        if new_conversation_id is not None:
            check_conversation_id(new_conversation_id, 'new_conversation_id')
        check_scope(scope)
        check_scope(source_scope, 'source_scope')
        return await super().fork(
            conversation_id,
            at=at,
            from_entry=from_entry,
            new_conversation_id=new_conversation_id,
            scope=scope,
            source_scope=source_scope,
        )

    async def list_conversations(
        self, *, scope: str | None = None, limit: int | None = None
    ) -> list[ConversationRecord]:
        check_scope(scope)
        return await super().list_conversations(scope=scope, limit=limit)

    async def delete(self, conversation_id: str, *, scope: str | None = None) -> None:
        check_conversation_id(conversation_id)
        check_scope(scope)
        await super().delete(conversation_id, scope=scope)

    async def read_record(self, conversation_id: str) -> ConversationRecord | None:
        """The record for a conversation of this account, or `None` if there is none."""
        check_conversation_id(conversation_id)
        query = select(_records.c.record).where(
            _records.c.account_id == self.account_id, _records.c.conversation_id == conversation_id
        )
        data = await _read(
            self.account_id, lambda session: session.execute(query), lambda result: result.scalar_one_or_none()
        )
        return None if data is None else record_adapter.validate_python(data)

    async def read_revision(self, conversation_id: str) -> str | None:
        """The stored revision of a conversation of this account, or `None` if there is none: one key lookup.

        A turn compares it with the revision it loaded before each model request, to learn early that another
        turn saved the conversation meanwhile (it would lose at save).
        """
        check_conversation_id(conversation_id)
        query = select(_records.c.revision).where(
            _records.c.account_id == self.account_id, _records.c.conversation_id == conversation_id
        )
        async with get_db_session(account=self.account_id) as session:
            return (await session.execute(query)).scalar_one_or_none()

    async def read_records(self, *, scope: str | None = None, limit: int | None = None) -> Sequence[ConversationRecord]:
        """This account's records, or those with `scope`, newest `updated_at` first, at most `limit` of them."""
        check_scope(scope)
        check_limit(limit)
        query = (
            select(_records.c.record)
            .where(_records.c.account_id == self.account_id)
            # conversation_id breaks ties so the order is stable between calls.
            .order_by(_records.c.updated_at.desc(), _records.c.conversation_id)
            .limit(limit)
        )
        if scope is not None:
            query = query.where(_records.c.scope == scope)
        rows = await _read(
            self.account_id, lambda session: session.execute(query), lambda result: result.scalars().all()
        )
        return [record_adapter.validate_python(data) for data in rows]

    async def write_record(
        self,
        record: ConversationRecord,
        *,
        new_entries: Sequence[ConversationEntry] = (),
        expected_revision: str | None,
    ) -> None:
        """Store `record` and `new_entries` in one transaction, if the stored revision is `expected_revision`.

        Raises:
            ConversationConflict: If the stored revision isn't `expected_revision` (or a record exists
                when it is `None`), or `record.head_id` or an entry's parent names an entry this account
                doesn't have and `new_entries` doesn't add.
            InvalidInputError: an id of `record` or `new_entries`, or `expected_revision`, is not one the store can
                hold.
        """
        check_record(record)
        check_entries(new_entries)
        check_revision(expected_revision, 'expected_revision')
        try:
            await self._write(record, new_entries, expected_revision)
            return
        except DatabaseDisconnectedError as exc:
            logger.info('conversation %r: the save lost its connection (%s)', record.conversation_id, exc)
        # Nothing was written, or everything was and the reply was lost (one transaction). Which of the two shows in
        # the database; and a second write is safe either way: it is the same compare-and-swap on
        # `expected_revision`, which fails if anyone (this save included) wrote meanwhile.
        if not await retry_on_disconnect(lambda: self._stored(record, new_entries), what='conversation save check'):
            await self._write(record, new_entries, expected_revision)

    async def _write(
        self, record: ConversationRecord, new_entries: Sequence[ConversationEntry], expected_revision: str | None
    ) -> None:
        async with get_db_session(account=self.account_id) as session:
            await self._lock(session, exclusive=False)
            # Swap the record first: the row lock makes a concurrent writer of the same conversation wait
            # here and then find the revision changed, before either inserts a single entry.
            if not await self._swap_record(session, record, expected_revision):
                raise ConversationConflict(record.conversation_id)
            new_ids = {entry.id for entry in new_entries}
            parents = (record.head_id, *(entry.parent_id for entry in new_entries))
            referenced = {entry_id for entry_id in parents if entry_id is not None} - new_ids
            if referenced and await self._count_entries(session, referenced) != len(referenced):
                raise ConversationConflict(record.conversation_id)
            if new_entries:
                await session.execute(_entries.insert(), [self._entry_row(entry) for entry in new_entries])

    async def _stored(self, record: ConversationRecord, new_entries: Sequence[ConversationEntry]) -> bool:
        """Whether this write committed: its first new entry (ids are minted before the write) is there, or, for a
        write without entries, the record carries this write's revision (minted for it)."""
        if new_entries:
            query = (
                select(func.count())
                .select_from(_entries)
                .where(_entries.c.account_id == self.account_id, _entries.c.id == new_entries[0].id)
            )
        else:
            query = (
                select(func.count())
                .select_from(_records)
                .where(
                    _records.c.account_id == self.account_id,
                    _records.c.conversation_id == record.conversation_id,
                    _records.c.revision == record.revision,
                )
            )
        async with get_db_session(account=self.account_id) as session:
            return bool((await session.execute(query)).scalar_one())

    async def delete_record(self, conversation_id: str, *, expected_revision: str) -> None:
        """Delete a record if its revision is `expected_revision`, and the entries of its history no other record
        reaches.

        Raises:
            ConversationConflict: If no record with `expected_revision` is stored for this account.
        """
        check_conversation_id(conversation_id)
        check_revision(expected_revision, 'expected_revision')
        statement = (
            _records.delete()
            .where(
                _records.c.account_id == self.account_id,
                _records.c.conversation_id == conversation_id,
                _records.c.revision == expected_revision,
            )
            .returning(_records.c.head_id, _records.c.record['branches'])
        )
        async with get_db_session(account=self.account_id) as session:
            await self._lock(session, exclusive=True)
            deleted = (await session.execute(statement)).first()
            if deleted is None:
                raise ConversationConflict(conversation_id)
            head_id, branches = deleted
            tips = [tip for tip in [head_id, *(branches or [])] if tip is not None]
            if tips:
                await session.execute(PRUNE_DELETED_HISTORY, {'account_id': self.account_id, 'tips': tips})

    async def read_entry(self, entry_id: str) -> ConversationEntry:
        """The entry with this id in this account.

        Raises:
            KeyError: If this account has no such entry.
        """
        check_entry_id(entry_id, 'entry_id')
        if entry_id is None:
            raise KeyError(entry_id)
        query = select(_entries.c.id, _entries.c.parent_id, _entries.c.kind, _entries.c.message).where(
            _entries.c.account_id == self.account_id, _entries.c.id == entry_id
        )
        row = await _read(
            self.account_id, lambda session: session.execute(query), lambda result: result.mappings().first()
        )
        if row is None:
            raise KeyError(entry_id)
        return entry_adapter.validate_python(dict(row))

    async def read_history(self, head_id: str | None, *, limit: int | None = None) -> list[ConversationEntry]:
        """The entries from the first one up to `head_id`, in order, or only the last `limit`: one query.

        Raises:
            KeyError: If `head_id`, or a parent on the way, is not an entry of this account.
        """
        check_entry_id(head_id, 'head_id')
        check_limit(limit)
        if head_id is None or limit == 0:
            return []
        walk = (
            select(
                _entries.c.id,
                _entries.c.parent_id,
                _entries.c.kind,
                _entries.c.message,
                literal(1, Integer).label('depth'),
            )
            .where(_entries.c.account_id == self.account_id, _entries.c.id == head_id)
            .cte('walk', recursive=True)
        )
        parent = _entries.alias('parent')
        step = (
            select(parent.c.id, parent.c.parent_id, parent.c.kind, parent.c.message, walk.c.depth + 1)
            .join(walk, parent.c.id == walk.c.parent_id)
            .where(parent.c.account_id == self.account_id)
        )
        if limit is not None:
            step = step.where(walk.c.depth < limit)
        walk = walk.union_all(step)
        query = select(walk.c.id, walk.c.parent_id, walk.c.kind, walk.c.message).order_by(walk.c.depth.desc())
        rows = await _read(
            self.account_id, lambda session: session.execute(query), lambda result: result.mappings().all()
        )
        if not rows:
            raise KeyError(head_id)
        # A parent the walk could not find would make the default implementation's read_entry fail too.
        first_parent = rows[0]['parent_id']
        if first_parent is not None and (limit is None or len(rows) < limit):
            raise KeyError(first_parent)
        return [entry_adapter.validate_python(dict(row)) for row in rows]

    async def _lock(self, session: AsyncSession, *, exclusive: bool) -> None:
        """Take this account's conversation lock until the transaction ends: shared to write, exclusive to prune."""
        lock = func.pg_advisory_xact_lock if exclusive else func.pg_advisory_xact_lock_shared
        # The two-key form keeps clear of single-key advisory locks; collisions past 2**31 accounts only
        # serialise more, they never lose a lock.
        key = self.account_id % 2**31
        await session.execute(select(lock(literal(LOCK_NAMESPACE, Integer), literal(key, Integer))))

    async def _swap_record(
        self, session: AsyncSession, record: ConversationRecord, expected_revision: str | None
    ) -> bool:
        """Insert or update the record if the stored revision is `expected_revision`; whether it was written."""
        values: dict[str, Any] = {
            'scope': record.scope,
            'head_id': record.head_id,
            'revision': record.revision,
            'record': storable(record_adapter.dump_python(record, mode='json')),
            'updated_at': record.updated_at,
        }
        statement: Executable
        if expected_revision is None:
            statement = (
                insert(_records)
                # Created when it was last updated: the record's own time, not the transaction's a few ms later.
                .values(
                    account_id=self.account_id,
                    conversation_id=record.conversation_id,
                    created_at=record.updated_at,
                    **values,
                )
                .on_conflict_do_nothing(index_elements=[_records.c.account_id, _records.c.conversation_id])
                .returning(_records.c.revision)
            )
        else:
            statement = (
                update(_records)
                .where(
                    _records.c.account_id == self.account_id,
                    _records.c.conversation_id == record.conversation_id,
                    _records.c.revision == expected_revision,
                )
                .values(**values)
                .returning(_records.c.revision)
            )
        return (await session.execute(statement)).first() is not None

    async def _count_entries(self, session: AsyncSession, entry_ids: set[str]) -> int:
        query = (
            select(func.count())
            .select_from(_entries)
            .where(_entries.c.account_id == self.account_id, _entries.c.id.in_(entry_ids))
        )
        return (await session.execute(query)).scalar_one()

    def _entry_row(self, entry: ConversationEntry) -> dict[str, Any]:
        data = storable(entry_adapter.dump_python(entry, mode='json'))
        return {
            'id': data['id'],
            'account_id': self.account_id,
            'parent_id': data['parent_id'],
            'kind': data['kind'],
            'message': data['message'],
        }
