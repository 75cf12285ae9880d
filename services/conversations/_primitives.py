"""pydantic-ai's `ConversationStore` primitives in PostgreSQL for one account (records swapped by revision, entries,
history walks, deletes that prune), and its own methods with their ids checked before any SQL."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic_ai import Conversation
from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
    ConversationStore,
)
from pydantic_ai.run import AgentRunResult
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.driver import DriverStatement, driver_transaction
from agentrt.db.errors import DatabaseDisconnectedError
from agentrt.db.failures import not_answered
from agentrt.db.session import get_db_session, retry_on_disconnect
from agentrt.services.conversations._arguments import (
    check_conversation_id,
    check_entries,
    check_entry_id,
    check_limit,
    check_record,
    check_revision,
    check_scope,
    checked_metadata,
    checked_title,
)
from agentrt.services.conversations._statements import (
    ENTRIES,
    LOCK_DELETED_HISTORY,
    PRUNE_DELETED_HISTORY,
    RECORDS,
    UNCHANGED,
    history_walk,
    swap_record,
    update_details,
)
from agentrt.services.conversations._stored import RECORDS_HAVE_METADATA, entry_adapter, titled
from agentrt.services.pg_text import storable

T = TypeVar('T')
R = TypeVar('R')
logger = logging.getLogger('agentrt.conversations')


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


class ConversationPrimitives(ConversationStore):
    """pydantic-ai's `ConversationStore` for one account's conversations: the primitives its methods (`load`, `save`,
    `branch`, `fork`, `delete`...) are built on, each in a short session of its own, every query filtered by the
    account. `PostgresConversationStore` adds a turn's own one-statement paths; its docstring states the guarantees.
    """

    def __init__(self, account_id: int) -> None:
        """Create a store for one account's conversations.

        Args:
            account_id: The account (tenant) whose conversations this store reads and writes.
        """
        self.account_id = account_id

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
        query = select(RECORDS.c.record, RECORDS.c.title).where(
            RECORDS.c.account_id == self.account_id, RECORDS.c.conversation_id == conversation_id
        )
        row = await _read(self.account_id, lambda session: session.execute(query), lambda result: result.first())
        return None if row is None else titled(*row)

    async def read_revision(self, conversation_id: str) -> str | None:
        """The stored revision of a conversation of this account, or `None` if there is none: one key lookup.

        A turn compares it with the revision it loaded before each model request, to learn early that another
        turn saved the conversation meanwhile (it would lose at save).
        """
        check_conversation_id(conversation_id)
        query = select(RECORDS.c.revision).where(
            RECORDS.c.account_id == self.account_id, RECORDS.c.conversation_id == conversation_id
        )
        async with get_db_session(account=self.account_id) as session:
            return (await session.execute(query)).scalar_one_or_none()

    async def read_records(self, *, scope: str | None = None, limit: int | None = None) -> Sequence[ConversationRecord]:
        """This account's records, or those with `scope`, newest `updated_at` first, at most `limit` of them."""
        check_scope(scope)
        check_limit(limit)
        query = (
            select(RECORDS.c.record, RECORDS.c.title)
            .where(RECORDS.c.account_id == self.account_id)
            # conversation_id breaks ties so the order is stable between calls.
            .order_by(RECORDS.c.updated_at.desc(), RECORDS.c.conversation_id)
            .limit(limit)
        )
        if scope is not None:
            query = query.where(RECORDS.c.scope == scope)
        rows = await _read(self.account_id, lambda session: session.execute(query), lambda result: result.all())
        return [titled(data, title) for data, title in rows]

    async def write_details(
        self,
        conversation_id: str,
        details: Mapping[str, Any],
        *,
        expected_revision: str,
        expected: Mapping[str, Any] | None = None,
    ) -> ConversationRecord:
        """Set the conversation's title (`details['title']`) or its record's metadata (`details['metadata']`), None
        clearing either, keeping its revision and `updated_at`, if the stored revision is `expected_revision` and
        (`expected['title']`) its title is still that one: what pydantic-ai's `update(...)` calls. The title is the one
        the runtime's own titles fill when there is none, and listings show; a save never changes a title that is set,
        nor metadata set since the record it saves was read.

        Raises:
            ConversationConflict: the conversation was saved, deleted or retitled since it was read.
            NotImplementedError: a key other than those (or `metadata` on a pydantic-ai whose records have none).
            InvalidInputError: an id is not one the store can hold, the title is not text of at most 200 characters,
                or the metadata is not a JSON object.
        """
        check_conversation_id(conversation_id)
        check_revision(expected_revision, 'expected_revision')
        expected = expected or {}
        kept = {'title', 'metadata'} if RECORDS_HAVE_METADATA else {'title'}
        unknown = (set(details) - kept) | (set(expected) - {'title'})
        if unknown:
            raise NotImplementedError(
                f"{type(self).__name__} stores a conversation's {' and '.join(sorted(kept))}, not "
                f'{", ".join(sorted(unknown))}'
            )
        statement = update_details(
            self.account_id,
            conversation_id,
            title=checked_title(details['title']) if 'title' in details else UNCHANGED,
            metadata=checked_metadata(details['metadata']) if 'metadata' in details else UNCHANGED,
            expected_revision=expected_revision,
            expected_title=checked_title(expected['title']) if 'title' in expected else UNCHANGED,
        )
        async with get_db_session(account=self.account_id) as session:
            row = (await session.execute(statement)).first()
        if row is None:
            raise ConversationConflict(conversation_id)
        return titled(*row)

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
            if not_answered(exc) is not None:
                raise  # the server did not answer: its check would wait for it again; the outcome stays unknown
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
            # Swap the record first: the row lock makes a concurrent writer of the same conversation wait
            # here and then find the revision changed, before either inserts a single entry.
            if not await self._swap_record(session, record, expected_revision):
                raise ConversationConflict(record.conversation_id)
            new_ids = {entry.id for entry in new_entries}
            parents = (record.head_id, *(entry.parent_id for entry in new_entries))
            referenced = {entry_id for entry_id in parents if entry_id is not None} - new_ids
            # Its branch tips are locked too, so a delete pruning one waits for this write and then keeps it; they
            # need not exist (pydantic-ai's stores take any tip), so only the head and the parents must be found.
            tips = set(record.branches) - new_ids - referenced
            if (referenced or tips) and not referenced <= await self._lock_entries(session, referenced | tips):
                raise ConversationConflict(record.conversation_id)
            if new_entries:
                await session.execute(ENTRIES.insert(), [self._entry_row(entry) for entry in new_entries])

    async def _stored(self, record: ConversationRecord, new_entries: Sequence[ConversationEntry]) -> bool:
        """Whether this write committed: its first new entry (ids are minted before the write) is there, or, for a
        write without entries, the record carries this write's revision (minted for it)."""
        if new_entries:
            query = (
                select(func.count())
                .select_from(ENTRIES)
                .where(ENTRIES.c.account_id == self.account_id, ENTRIES.c.id == new_entries[0].id)
            )
        else:
            query = (
                select(func.count())
                .select_from(RECORDS)
                .where(
                    RECORDS.c.account_id == self.account_id,
                    RECORDS.c.conversation_id == record.conversation_id,
                    RECORDS.c.revision == record.revision,
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
            RECORDS.delete()
            .where(
                RECORDS.c.account_id == self.account_id,
                RECORDS.c.conversation_id == conversation_id,
                RECORDS.c.revision == expected_revision,
            )
            .returning(RECORDS.c.head_id, RECORDS.c.record['branches'])
        )
        async with get_db_session(account=self.account_id) as session:
            deleted = (await session.execute(statement)).first()
            if deleted is None:
                raise ConversationConflict(conversation_id)
            head_id, branches = deleted
            tips = [tip for tip in [head_id, *(branches or [])] if tip is not None]
            if not tips:
                return
            # The history's entries locked first (see LOCK_DELETED_HISTORY): writes into it wait, no other write does.
            params = {'account_id': self.account_id, 'tips': tips}
            history = (await session.execute(LOCK_DELETED_HISTORY, params)).scalars().all()
            if history:
                await session.execute(PRUNE_DELETED_HISTORY, {'account_id': self.account_id, 'history': list(history)})

    async def read_entry(self, entry_id: str) -> ConversationEntry:
        """The entry with this id in this account.

        Raises:
            KeyError: If this account has no such entry.
        """
        check_entry_id(entry_id, 'entry_id')
        if entry_id is None:
            raise KeyError(entry_id)
        query = select(ENTRIES.c.id, ENTRIES.c.parent_id, ENTRIES.c.kind, ENTRIES.c.message).where(
            ENTRIES.c.account_id == self.account_id, ENTRIES.c.id == entry_id
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
        query = history_walk(self.account_id, head_id, limit)
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

    async def _swap_record(
        self, session: AsyncSession, record: ConversationRecord, expected_revision: str | None
    ) -> bool:
        """Insert or update the record if the stored revision is `expected_revision`; whether it was written."""
        statement = swap_record(self.account_id, record, expected_revision)
        return (await session.execute(statement)).first() is not None

    async def _lock_entries(self, session: AsyncSession, entry_ids: set[str]) -> set[str]:
        """Which of `entry_ids` this account has, each locked FOR KEY SHARE until the transaction ends: a delete
        pruning one waits for this write, or this write for it (and then does not find it): `LOCK_DELETED_HISTORY`.
        Locked in id order, as the delete locks them, so the two never wait for each other in a cycle."""
        query = (
            select(ENTRIES.c.id)
            .where(ENTRIES.c.account_id == self.account_id, ENTRIES.c.id.in_(entry_ids))
            .order_by(ENTRIES.c.id)
            .with_for_update(read=True, key_share=True)
        )
        return set((await session.execute(query)).scalars())

    def _entry_row(self, entry: ConversationEntry) -> dict[str, Any]:
        data = storable(entry_adapter.dump_python(entry, mode='json'))
        return {
            'id': data['id'],
            'account_id': self.account_id,
            'parent_id': data['parent_id'],
            'kind': data['kind'],
            'message': data['message'],
        }
