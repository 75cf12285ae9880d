"""What the conversation store writes and reads back: the JSON an entry stores for a message (`message_json`), the
rows of a tail read made into a `StoredTail`, and what an append stored (`Appended`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter
from pydantic_ai.conversation_store import ConversationEntry, ConversationRecord
from pydantic_ai.messages import ModelMessage

from agentrt.services.conversations._off_loop import pieces
from agentrt.services.ledger import dumped_message_json
from agentrt.services.message_json import message_adapter
from agentrt.services.pg_text import storable

record_adapter: TypeAdapter[ConversationRecord] = TypeAdapter(ConversationRecord)
RECORDS_HAVE_METADATA = 'metadata' in ConversationRecord.__dataclass_fields__
"""pydantic-ai 2.78's records carry `title` and `metadata`; 2.68's neither."""
entry_adapter: TypeAdapter[ConversationEntry] = TypeAdapter(ConversationEntry)
# A stored entry's `message` is what `entry_adapter` dumps for it; these read and write that JSON directly.
messages_adapter: TypeAdapter[list[ModelMessage]] = TypeAdapter(list[ModelMessage])


@dataclass(frozen=True)
class StoredTail:
    """What `PostgresConversationStore.read_tail` found: a conversation's record and its newest messages."""

    record: ConversationRecord
    title: str | None
    summary_head_id: str | None
    """The head the stored summary was written from (post-turn work), if any."""
    entry_ids: list[str]
    """The entries of `messages`, oldest first."""
    sizes: list[int]
    """Each entry's stored JSON, in characters."""
    messages: list[ModelMessage]
    reached_first: bool
    """True when `messages` start the conversation."""
    bodies: list[str] = field(default_factory=list)
    """Each message's stored JSON, as `message_json` writes it (empty when the tail holds entries of other kinds)."""


@dataclass(frozen=True)
class Appended:
    """What `PostgresConversationStore.append` stored: the new entries and their stored JSON, in characters."""

    entries: list[ConversationEntry]
    sizes: list[int]
    claim_released: bool
    """The claim given to `append` was deleted in the same transaction."""
    summarised: bool = False
    """A title and summary were stored with the entries (`append`'s `summarise` returned them)."""


def message_json(message: ModelMessage) -> str:
    """The JSON an entry stores for `message` (what `storable` makes of `entry_adapter`'s dump of it).

    A request the ledger dumped as it was sent, unchanged since, is not dumped again: its text is that same dump
    (`dumped_message_json`), still checked for NUL here.
    """
    known = dumped_message_json(message)
    if known is not None and '\\u0000' not in known:
        return known
    return storable_json(message_adapter, message)


def storable_json(adapter: TypeAdapter[Any], value: Any) -> str:
    """`value` as JSON for a `jsonb` column. The fast path is pydantic-core's JSON; a value with a NUL (`\\u0000` in
    the JSON, which `jsonb` refuses) or a lone surrogate (which the encoder refuses) goes through `storable`."""
    try:
        data: str | None = adapter.dump_json(value).decode()
    except ValueError:  # a lone surrogate: UTF-8 cannot encode it
        data = None
    if data is None or '\\u0000' in data:
        data = json.dumps(storable(adapter.dump_python(value, mode='json')), ensure_ascii=False)
    return data


def stored_tail(rows: Sequence[Any], at: int) -> StoredTail:
    """The `StoredTail` of a tail read's rows (`_statements`: `TAIL_ON_DRIVER`, `claimed_tail`), whose columns start
    at `at`: record, title, summary_head_id, then the entry's id, parent_id, kind, body (NULLs: no entries)."""
    first = rows[0]
    record = record_adapter.validate_json(first[at])
    entries = rows if first[at + 3] is not None else []
    bodies: list[str] = [row[at + 6] for row in entries]
    if any(row[at + 5] != 'message' for row in entries):
        messages = [entry_adapter.validate_python(_entry_data(row, at)).message for row in entries]
        stored_bodies: list[str] = []
    else:
        messages = validate_messages(bodies)
        stored_bodies = bodies
    return StoredTail(
        record=record,
        title=first[at + 1],
        summary_head_id=first[at + 2],
        entry_ids=[row[at + 3] for row in entries],
        sizes=[len(body) for body in bodies],
        messages=messages,
        reached_first=not entries or entries[0][at + 4] is None,
        bodies=stored_bodies,
    )


def validate_messages(bodies: Sequence[str]) -> list[ModelMessage]:
    """The messages of `bodies` (each a message's stored JSON), validated a piece at a time (`_off_loop.pieces`): a
    worker thread validating a long conversation gives the GIL back to the event loop between two pieces."""
    messages: list[ModelMessage] = []
    for piece in pieces([len(body) for body in bodies]):
        messages += messages_adapter.validate_json('[' + ','.join(bodies[piece]) + ']')
    return messages


def _entry_data(row: Any, at: int) -> dict[str, Any]:
    return {'id': row[at + 3], 'parent_id': row[at + 4], 'kind': row[at + 5], 'message': json.loads(row[at + 6])}


def titled(data: Any, title: str | None) -> ConversationRecord:
    """A stored record (its JSON as read) with the title of its own column, where the runtime's titles and
    `update(title=...)` write it: pydantic-ai 2.78 carries a title on the record; earlier versions have none, and
    ignore it."""
    if isinstance(data, str | bytes):
        data = json.loads(data)
    return record_adapter.validate_python({**data, 'title': title})
