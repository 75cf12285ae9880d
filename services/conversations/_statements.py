"""The conversation store's SQL: a conversation's tail read (alone, or with a turn's claim in one round trip), a turn's
save (the record swapped, its entries added and its claim released in one statement), and the pruning of a deleted
history's entries no other record reaches. The hot ones are `DriverStatement`s, run on the driver connection
(`agentrt.db.driver`); pydantic-ai's primitives (`_primitives.py`) build Core statements here (`swap_record`,
`history_walk`)."""

from __future__ import annotations

from functools import cache
from typing import Any, cast

from pydantic_ai.conversation_store import ConversationRecord
from sqlalchemy import (
    ColumnElement,
    Executable,
    Integer,
    Select,
    Table,
    func,
    literal,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import JSONB, insert

from agentrt.db.driver import DriverStatement
from agentrt.db.models import ConversationEntryRow, ConversationRow
from agentrt.services.conversations._stored import record_adapter
from agentrt.services.pg_text import storable

# A deleted record's history: its entries from its head and branch tips (`:tips`) up the parents.
_DELETED_HISTORY = """history(id, parent_id) AS (
    SELECT e.id, e.parent_id FROM conversation_entries AS e
    WHERE e.account_id = :account_id AND e.id = ANY(CAST(:tips AS text[]))
    UNION
    SELECT p.id, p.parent_id
    FROM history AS h JOIN conversation_entries AS p ON p.account_id = :account_id AND p.id = h.parent_id
)"""

# A delete's first step after its record's: the deleted history's entries locked FOR UPDATE (in id order, so two
# deletes sharing entries wait for each other rather than deadlock), which conflicts with the FOR KEY SHARE every
# writer takes on an entry it points at (a new entry's parent, by its foreign key; a record's head or parent, by
# `_primitives`' check). So a write that points into this history either committed before the prune reads the
# account's records and entries (it sees the write), or waits until the prune commits and then finds what it pointed
# at kept or gone (a conflict, never a dangling history). Only writers into this very history wait: the account-wide
# exclusive lock this replaces held every save of the account for the whole prune (0.5 s behind a 5,000-turn delete).
LOCK_DELETED_HISTORY = text(f"""
WITH RECURSIVE {_DELETED_HISTORY}
SELECT e.id FROM conversation_entries AS e
WHERE e.account_id = :account_id AND e.id IN (SELECT id FROM history)
ORDER BY e.id
FOR UPDATE OF e
""")

# Then the entries of that history (`:history`, as locked) that no other record reaches. Another record reaches an
# entry of it only through an entry of it that is its head or a branch tip, or that is the parent of an entry outside
# it (where a fork's own messages begin): those, and their ancestors, stay. Only the deleted history is walked, not the
# account's (walking every record's took 0.4-1.5 s with 10,000 conversations), and the records with a branch tip in it
# are found by an index (reading every record's tips took 40 ms of a 2-turn delete with 18,000 conversations).
PRUNE_DELETED_HISTORY = text("""
WITH RECURSIVE history(id, parent_id) AS (
    SELECT e.id, e.parent_id FROM conversation_entries AS e
    WHERE e.account_id = :account_id AND e.id = ANY(CAST(:history AS text[]))
), reached(id) AS (
    SELECT child.parent_id FROM conversation_entries AS child JOIN history AS h ON child.parent_id = h.id
    WHERE child.account_id = :account_id AND child.id NOT IN (SELECT id FROM history)
    UNION
    SELECT c.head_id FROM conversations AS c
    WHERE c.account_id = :account_id AND c.head_id IN (SELECT id FROM history)
    UNION
    -- One lookup of `ix_conversations_branches` per entry of the history, not a read of every record of the account.
    SELECT h.id FROM history AS h JOIN conversations AS c ON (c.record -> 'branches') ? h.id
    WHERE c.account_id = :account_id
), kept(id, parent_id) AS (
    SELECT h.id, h.parent_id FROM history AS h WHERE h.id IN (SELECT id FROM reached)
    UNION
    SELECT h.id, h.parent_id FROM kept AS k JOIN history AS h ON h.id = k.parent_id
)
DELETE FROM conversation_entries AS e
WHERE e.account_id = :account_id AND e.id IN (SELECT id FROM history) AND e.id NOT IN (SELECT id FROM kept)
""")

# The record and the newest entries of a conversation, in one statement: from the head back, one entry at a time,
# while the JSON read so far is under the cap (the entry that crosses it is the last one read). Bodies come back as
# text, validated from the text. No row: no record; one row with a NULL id: a record without messages.
_TAIL_CTES = """conv AS (
    SELECT record::text AS record, head_id, title, summary_head_id
    FROM conversations WHERE account_id = :account_id AND conversation_id = :conversation_id
), walk(id, parent_id, kind, body, total, depth) AS (
    SELECT e.id, e.parent_id, e.kind, b.body, length(b.body), 1
    FROM conv
    JOIN conversation_entries AS e ON e.account_id = :account_id AND e.id = conv.head_id
    CROSS JOIN LATERAL (SELECT e.message::text AS body) AS b
    UNION ALL
    SELECT p.id, p.parent_id, p.kind, b.body, w.total + length(b.body), w.depth + 1
    FROM walk AS w
    JOIN conversation_entries AS p ON p.account_id = :account_id AND p.id = w.parent_id
    CROSS JOIN LATERAL (SELECT p.message::text AS body) AS b
    WHERE w.total < :cap AND w.depth < :max_messages
)"""
_TAIL_COLUMNS = 'conv.record, conv.title, conv.summary_head_id, walk.id, walk.parent_id, walk.kind, walk.body'
_TAIL = text(f"""
WITH RECURSIVE {_TAIL_CTES}
SELECT {_TAIL_COLUMNS}
FROM conv LEFT JOIN walk ON true
ORDER BY walk.depth DESC
""")


@cache
def claimed_tail(claim_sql: str) -> DriverStatement:
    """`claim_sql` (a statement that returns a row when it took the claim) and the tail, in one statement: a chat
    turn's claim and load in one round trip. A data-modifying CTE runs once, to completion, whatever the query reads.

    Columns: the rows the claim returned (0: not taken); the claims of other turns the statement's snapshot shows
    (see `PostgresConversationStore.claim_and_read_tail`); then `_TAIL`'s (all NULL without a record).
    """
    return DriverStatement.of(
        text(f"""
WITH RECURSIVE claimed AS ({claim_sql}), {_TAIL_CTES}
SELECT taken.count, (
    SELECT count(*) FROM conversation_turns
    WHERE account_id = :account_id AND conversation_id = :conversation_id AND claim_id <> :claim_id
), {_TAIL_COLUMNS}
FROM (SELECT count(*) FROM claimed) AS taken LEFT JOIN (conv LEFT JOIN walk ON true) ON true
ORDER BY walk.depth DESC
""")
    )


# A turn's save when the record is already stored: the record swapped if it still has the revision the turn loaded,
# the turn's entries added and its claim released, all only if the swap happened. The first entry's parent is the
# record's head (its foreign key check locks it FOR KEY SHARE), which a delete sharing it keeps: see
# `LOCK_DELETED_HISTORY`.
# The title and summary a turn may save with its messages (post-turn work riding on the save, when due): the title
# only when the conversation has none, the summary with the head it was written from; NULLs leave them as they were.
_SUMMARY_SET = """title = coalesce(conversations.title, CAST(:title AS varchar)),
        summary = coalesce(CAST(:summary AS text), conversations.summary),
        summary_head_id = CASE WHEN CAST(:summary AS text) IS NULL THEN conversations.summary_head_id
            ELSE CAST(:head_id AS varchar) END,
        summarised_at = CASE WHEN CAST(:summary AS text) IS NULL THEN conversations.summarised_at ELSE now() END"""
_APPEND_REST = """
added AS (
    INSERT INTO conversation_entries (id, account_id, parent_id, kind, message)
    SELECT e.id, :account_id, e.parent_id, e.kind, CAST(e.message AS jsonb)
    FROM unnest(
        CAST(:ids AS text[]), CAST(:parent_ids AS text[]), CAST(:kinds AS text[]), CAST(:messages AS text[])
    ) AS e(id, parent_id, kind, message)
    WHERE EXISTS (SELECT FROM swapped)
    RETURNING 1
), released AS (
    DELETE FROM conversation_turns
    WHERE account_id = :account_id AND conversation_id = :conversation_id AND claim_id = :claim_id
        AND EXISTS (SELECT FROM swapped)
    RETURNING 1
)
SELECT (SELECT count(*) FROM swapped), (SELECT count(*) FROM released)
"""
_APPEND_UPDATE = text(f"""
WITH swapped AS (
    UPDATE conversations
    SET scope = :scope, head_id = :head_id, revision = :revision,
        -- The stored metadata kept, as `_with_stored_metadata` keeps it for `swap_record` (a Core statement).
        record = coalesce(
            jsonb_set(CAST(:record AS jsonb), '{{metadata}}', conversations.record -> 'metadata'),
            CAST(:record AS jsonb)
        ),
        updated_at = :updated_at, {_SUMMARY_SET}
    WHERE account_id = :account_id AND conversation_id = :conversation_id AND revision = :expected_revision
    RETURNING 1
), {_APPEND_REST}""")
# A new conversation is created when it was last updated (`created_at` = the record's `updated_at`): the column's
# default, the transaction's `now()`, came a few milliseconds after the record's own time.
_APPEND_CREATE = text(f"""
WITH swapped AS (
    INSERT INTO conversations (
        account_id, conversation_id, scope, head_id, revision, record, updated_at, created_at,
        title, summary, summary_head_id, summarised_at
    )
    SELECT :account_id, :conversation_id, :scope, :head_id, :revision, CAST(:record AS jsonb), :updated_at, :updated_at,
        CAST(:title AS varchar), CAST(:summary AS text),
        CASE WHEN CAST(:summary AS text) IS NULL THEN NULL ELSE CAST(:head_id AS varchar) END,
        CASE WHEN CAST(:summary AS text) IS NULL THEN NULL ELSE now() END
    ON CONFLICT (account_id, conversation_id) DO NOTHING
    RETURNING 1
), {_APPEND_REST}""")
# The turn's own load and save run on the driver connection (`agentrt.db.driver`): the same SQL, prepared once per
# connection, without SQLAlchemy's statement and row machinery.
TAIL_ON_DRIVER = DriverStatement.of(_TAIL)
APPEND_UPDATE_ON_DRIVER = DriverStatement.of(_APPEND_UPDATE)
APPEND_CREATE_ON_DRIVER = DriverStatement.of(_APPEND_CREATE)

# A page of older messages (`_pages`): the record, and the entries before `:before` (an entry of the conversation's
# history, from its head back), from its parent back, at most `:max_messages`. No row: no record; `found` 0:
# `:before` is not in the history: not an entry of the account, or another conversation's, or one a `branch()` left
# behind (it was found anywhere in the account, and the page was another history's). Finding it walks the history
# from the head to it, an index lookup per message newer than the position.
_BEFORE = text("""
WITH RECURSIVE conv AS (
    SELECT record::text AS record, head_id, title, summary_head_id
    FROM conversations WHERE account_id = :account_id AND conversation_id = :conversation_id
), history(id, parent_id) AS (
    SELECT e.id, e.parent_id
    FROM conv JOIN conversation_entries AS e ON e.account_id = :account_id AND e.id = conv.head_id
    UNION ALL
    SELECT p.id, p.parent_id
    FROM history AS h JOIN conversation_entries AS p ON p.account_id = :account_id AND p.id = h.parent_id
    WHERE h.id <> :before
), mark AS (
    SELECT parent_id FROM history WHERE id = :before
), walk(id, parent_id, kind, body, depth) AS (
    SELECT e.id, e.parent_id, e.kind, e.message::text, 1
    FROM conv CROSS JOIN mark
    JOIN conversation_entries AS e ON e.account_id = :account_id AND e.id = mark.parent_id
    WHERE :max_messages > 0
    UNION ALL
    SELECT p.id, p.parent_id, p.kind, p.message::text, w.depth + 1
    FROM walk AS w
    JOIN conversation_entries AS p ON p.account_id = :account_id AND p.id = w.parent_id
    WHERE w.depth < :max_messages
)
SELECT conv.record, conv.title, conv.summary_head_id, walk.id, walk.parent_id, walk.kind, walk.body,
    (SELECT count(*) FROM mark) AS found
FROM conv LEFT JOIN walk ON true
ORDER BY walk.depth DESC
""")
BEFORE_ON_DRIVER = DriverStatement.of(_BEFORE)

# Core tables (the ORM types `__table__` as a plain FromClause): the primitives' statements stay Core statements.
RECORDS = cast(Table, ConversationRow.__table__)
ENTRIES = cast(Table, ConversationEntryRow.__table__)


def swap_record(account_id: int, record: ConversationRecord, expected_revision: str | None) -> Executable:
    """Insert or update `record` if the stored revision is `expected_revision` (None: there is no record yet); it
    returns a row when it wrote."""
    values: dict[str, Any] = {
        'scope': record.scope,
        'head_id': record.head_id,
        'revision': record.revision,
        'record': storable(record_adapter.dump_python(record, mode='json')),
        'updated_at': record.updated_at,
    }
    if expected_revision is None:
        return (
            insert(RECORDS)
            # Created when it was last updated: the record's own time, not the transaction's a few ms later.
            .values(
                account_id=account_id, conversation_id=record.conversation_id, created_at=record.updated_at, **values
            )
            .on_conflict_do_nothing(index_elements=[RECORDS.c.account_id, RECORDS.c.conversation_id])
            .returning(RECORDS.c.revision)
        )
    values['record'] = _with_stored_metadata(sql_cast(literal(values['record'], JSONB), JSONB))
    return (
        update(RECORDS)
        .where(
            RECORDS.c.account_id == account_id,
            RECORDS.c.conversation_id == record.conversation_id,
            RECORDS.c.revision == expected_revision,
        )
        .values(**values)
        .returning(RECORDS.c.revision)
    )


def history_walk(account_id: int, head_id: str, limit: int | None) -> Select[Any]:
    """The entries from the first one up to `head_id` (id, parent_id, kind, message), oldest first, or only the last
    `limit`: a recursive walk up the parents, within the account."""
    walk = (
        select(ENTRIES.c.id, ENTRIES.c.parent_id, ENTRIES.c.kind, ENTRIES.c.message, literal(1, Integer).label('depth'))
        .where(ENTRIES.c.account_id == account_id, ENTRIES.c.id == head_id)
        .cte('walk', recursive=True)
    )
    parent = ENTRIES.alias('parent')
    step = (
        select(parent.c.id, parent.c.parent_id, parent.c.kind, parent.c.message, walk.c.depth + 1)
        .join(walk, parent.c.id == walk.c.parent_id)
        .where(parent.c.account_id == account_id)
    )
    if limit is not None:
        step = step.where(walk.c.depth < limit)
    walk = walk.union_all(step)
    return select(walk.c.id, walk.c.parent_id, walk.c.kind, walk.c.message).order_by(walk.c.depth.desc())


class _Unchanged:
    """Not given: `update_details` leaves that part of its statement out."""


UNCHANGED = _Unchanged()


def _with_stored_metadata(new: ColumnElement[Any]) -> ColumnElement[Any]:
    """The record `new` with the stored record's `metadata` (set by `update(metadata=...)`), when it has one: a save
    replaces the record, and must not undo an update made since the record was read (pydantic-ai's contract)."""
    return func.coalesce(func.jsonb_set(new, _METADATA_PATH, RECORDS.c.record['metadata']), new)


_METADATA_PATH: ColumnElement[Any] = literal_column("'{metadata}'")


def update_details(
    account_id: int,
    conversation_id: str,
    *,
    title: str | _Unchanged | None = UNCHANGED,
    metadata: dict[str, Any] | _Unchanged | None = UNCHANGED,
    expected_revision: str,
    expected_title: str | _Unchanged | None = UNCHANGED,
) -> Executable:
    """Set the conversation's title column and its record's `metadata` (each UNCHANGED: left as it is; both: only
    check) if its revision is `expected_revision` and its title `expected_title` (UNCHANGED: any); it returns the record
    and its title when the conditions held. Neither the revision nor `updated_at` changes: a save of the conversation
    never conflicts with it."""
    conditions = [
        RECORDS.c.account_id == account_id,
        RECORDS.c.conversation_id == conversation_id,
        RECORDS.c.revision == expected_revision,
    ]
    if not isinstance(expected_title, _Unchanged):
        conditions.append(RECORDS.c.title.is_not_distinct_from(expected_title))
    values: dict[str, Any] = {}
    if not isinstance(title, _Unchanged):
        values['title'] = title
    if not isinstance(metadata, _Unchanged):
        values['record'] = func.jsonb_set(RECORDS.c.record, _METADATA_PATH, sql_cast(literal(metadata, JSONB), JSONB))
    if not values:
        return select(RECORDS.c.record, RECORDS.c.title).where(*conditions)
    return update(RECORDS).where(*conditions).values(**values).returning(RECORDS.c.record, RECORDS.c.title)
