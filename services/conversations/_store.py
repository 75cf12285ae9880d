"""`PostgresConversationStore`: pydantic-ai's `ConversationStore` in PostgreSQL, scoped to one account, with a chat
turn's own paths: its start (the claim and the tail read in one statement) and its save (one statement, `append`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
)
from pydantic_ai.messages import ModelMessage

from agentrt.db.driver import DriverStatement, DriverTransaction, driver_transaction
from agentrt.db.errors import DatabaseDisconnectedError
from agentrt.db.failures import not_answered
from agentrt.db.session import retry_on_disconnect
from agentrt.services.conversations._arguments import (
    check_claim_id,
    check_conversation_id,
    check_limit,
    check_record,
    check_revision,
)
from agentrt.services.conversations._off_loop import off_loop
from agentrt.services.conversations._primitives import ConversationPrimitives, read_on_driver
from agentrt.services.conversations._statements import (
    APPEND_CREATE_ON_DRIVER,
    APPEND_UPDATE_ON_DRIVER,
    TAIL_ON_DRIVER,
    claimed_tail,
)
from agentrt.services.conversations._stored import (
    Appended,
    StoredTail,
    message_json,
    record_adapter,
    storable_json,
    stored_tail,
)
from agentrt.services.pg_text import storable_text

Summariser = Callable[[list[ConversationEntry], list[int]], Awaitable[tuple[str | None, str] | None]]
"""Given a save's new entries and their stored JSON sizes: the title (None: keep) and summary to store with them."""
logger = logging.getLogger('agentrt.conversations')


def _check_tail(conversation_id: object, cap_chars: object, max_messages: object) -> None:
    check_conversation_id(conversation_id)
    check_limit(cap_chars, 'cap_chars')
    check_limit(max_messages, 'max_messages')


class PostgresConversationStore(ConversationPrimitives):
    """A `ConversationStore` in PostgreSQL, holding one account's conversations.

    Every query is filtered by `account_id`, so two accounts can use the same conversation id without
    seeing each other; `scope` (a user, a channel) narrows further within the account. Each primitive
    (`ConversationPrimitives`, `_primitives.py`) opens its own short session, so one store can serve concurrent tasks
    and never holds a connection between calls.

    Saves use compare-and-swap on the record's revision: of two turns saved from the same revision one
    wins and the other gets `ConversationConflict`. Deleting a conversation also deletes the entries of its
    history that no remaining record of the account reaches (forks pointing into it keep theirs). A delete locks only
    the entries of its history (FOR UPDATE), which every write locks FOR KEY SHARE where it points into it, so the
    pruning never races a save or fork that points at an entry it would delete, and saves elsewhere never wait for it.

    Every public method refuses, before any SQL, an id PostgreSQL cannot take as it is (`InvalidInputError`, a
    `ValueError`, naming the argument): not text, longer than its column, or holding a NUL or a lone surrogate
    (`_arguments`). A `limit` is a whole number from 0 to 2**31 - 1.
    """

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
            if not_answered(exc) is not None:
                raise  # the server did not answer: its check would wait for it again; the outcome stays unknown
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
