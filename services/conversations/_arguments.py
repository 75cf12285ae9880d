"""The conversation store's arguments checked before any SQL: identifiers PostgreSQL cannot take are refused.

`PostgresConversationStore` is pydantic-ai's `ConversationStore`, so pydantic-ai's UI adapters and user code call it
directly, with ids nobody checked (a chat turn checks its own with `agentrt.agents.turn_input`, stricter). An id
holding a NUL or a lone surrogate, longer than its column, or not text would fail the statement with a driver
error; these refuse it first with `InvalidInputError` (a `ValueError`) naming the argument. Ids are refused, never
altered (`storable_text`): an altered id would address another conversation or entry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

from pydantic_ai.conversation_store import ConversationEntry, ConversationRecord
from sqlalchemy import String

from agentrt.db.errors import InvalidInputError
from agentrt.db.models import ConversationEntryRow, ConversationRow, ConversationTurnRow
from agentrt.services.pg_text import checked_identifier, storable, storable_text


def _chars(column: Any) -> int:
    length = cast(String, column.type).length
    assert length is not None
    return length


CONVERSATION_ID_CHARS = _chars(ConversationRow.__table__.c.conversation_id)
SCOPE_CHARS = _chars(ConversationRow.__table__.c.scope)
REVISION_CHARS = _chars(ConversationRow.__table__.c.revision)
ENTRY_ID_CHARS = _chars(ConversationEntryRow.__table__.c.id)
KIND_CHARS = _chars(ConversationEntryRow.__table__.c.kind)
CLAIM_ID_CHARS = _chars(ConversationTurnRow.__table__.c.claim_id)
TITLE_CHARS = _chars(ConversationRow.__table__.c.title)
MAX_LIMIT = 2**31 - 1
"""A `limit` is bound as a PostgreSQL `integer`."""


def check_conversation_id(value: object, field: str = 'conversation_id') -> None:
    """Raises `InvalidInputError` unless `value` is a conversation id the `conversations` table can hold."""
    checked_identifier(value, field, max_chars=CONVERSATION_ID_CHARS)


def check_scope(value: object, field: str = 'scope') -> None:
    """Raises `InvalidInputError` unless `value` is None or a scope the `conversations` table can hold."""
    if value is not None:
        checked_identifier(value, field, max_chars=SCOPE_CHARS)


def check_entry_id(value: object, field: str) -> None:
    """Raises `InvalidInputError` unless `value` is None or an entry id the `conversation_entries` table can hold."""
    if value is not None:
        checked_identifier(value, field, max_chars=ENTRY_ID_CHARS)


def check_revision(value: object, field: str) -> None:
    """Raises `InvalidInputError` unless `value` is None or a revision the `conversations` table can hold."""
    if value is not None:
        checked_identifier(value, field, max_chars=REVISION_CHARS)


def check_claim_id(value: object) -> None:
    """Raises `InvalidInputError` unless `value` is None or a claim id (`conversation_turns`)."""
    if value is not None:
        checked_identifier(value, 'claim_id', max_chars=CLAIM_ID_CHARS)


def check_limit(value: object, field: str = 'limit') -> None:
    """Raises `InvalidInputError` unless `value` is None or a whole number from 0 to `MAX_LIMIT` (bound as an
    `integer`: a `limit`, a tail's `cap_chars` or `max_messages`)."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInputError(f'the {field} must be a whole number, not {type(value).__name__}', field=field)
    if not 0 <= value <= MAX_LIMIT:
        raise InvalidInputError(f'the {field} must be from 0 to {MAX_LIMIT:,}, not {value:,}', field=field)


def check_record(record: ConversationRecord) -> None:
    """Raises `InvalidInputError` unless every id of `record` can be stored as it is: the columns' (conversation id,
    scope, head, revision) and those in its JSON (the conversation it was forked from, the fork's entry, branches).

    On a turn's save: the field names are constants, so a record that passes costs no string formatting.
    """
    check_conversation_id(record.conversation_id, 'record.conversation_id')
    check_scope(record.scope, 'record.scope')
    check_entry_id(record.head_id, 'record.head_id')
    checked_identifier(record.revision, 'record.revision', max_chars=REVISION_CHARS)
    if record.forked_from is not None:
        checked_identifier(record.forked_from, 'record.forked_from')
    check_entry_id(record.forked_at, 'record.forked_at')
    for index, tip in enumerate(record.branches):
        check_entry_id(tip, f'record.branches[{index}]')


def check_entries(entries: Sequence[ConversationEntry]) -> None:
    """Raises `InvalidInputError` unless the id, parent and kind of every entry of `new_entries` can be stored as
    they are."""
    for index, entry in enumerate(entries):
        checked_identifier(entry.id, f'new_entries[{index}].id', max_chars=ENTRY_ID_CHARS)
        check_entry_id(entry.parent_id, f'new_entries[{index}].parent_id')
        checked_identifier(entry.kind, f'new_entries[{index}].kind', max_chars=KIND_CHARS)


def checked_title(value: object) -> str | None:
    """A title to store (`update(title=...)`): None, or text of at most `TITLE_CHARS` characters, what PostgreSQL
    cannot store replaced (a title is text shown, not an id: `storable_text`).

    Raises:
        InvalidInputError: not text, or too long.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f'the title must be text, not {type(value).__name__}', field='title')
    if len(value) > TITLE_CHARS:
        raise InvalidInputError(
            f'the title is {len(value):,} characters long; the limit is {TITLE_CHARS}', field='title'
        )
    return storable_text(value)


def checked_metadata(value: object) -> dict[str, Any] | None:
    """Metadata to store (`update(metadata=...)`): None, or a JSON object, what PostgreSQL cannot store in its text
    replaced (`storable`).

    Raises:
        InvalidInputError: not a dict, or not JSON (a value `json` cannot write, or NaN).
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInputError(
            f'the metadata must be a JSON object (a dict), not {type(value).__name__}', field='metadata'
        )
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f'the metadata is not JSON: {exc}', field='metadata') from None
    except RecursionError:  # was raised as it was, from `storable` (QA)
        raise InvalidInputError('the metadata is nested too deeply to store', field='metadata') from None
    stored: dict[str, Any] = storable(value)
    return stored
