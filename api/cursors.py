"""Opaque keyset cursors: the sort key of the last row a page showed, for a next page that stays stable while rows
arrive. A cursor is base64url JSON; clients pass it back unchanged and never parse it.

A cursor names the listing and the account it was made for, and is refused (422, field `cursor`) by any other: the
position of a row of another account (or of another listing, the audit's in the conversations') answered with a page
of the caller's own rows starting at a place that meant nothing to them, a wrong page given as a right one. The
account is not a secret (`GET /api/v1/me` says it); nothing else of it is in the cursor.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from agentrt.db.errors import InvalidInputError
from agentrt.services.pg_text import is_storable

MAX_CURSOR_CHARS = 600

Listing = Literal['audit', 'conversations', 'conversations-created']
"""The listings that page with a cursor: `GET /api/v1/llm-audit/interactions`, `GET /api/v1/conversations` with
`order=updated` (`conversations`, the name its cursors had when that was the only order, so they stay valid) and with
`order=created` (`conversations-created`): a position in one order means nothing in the other."""
_LISTINGS: tuple[str, ...] = get_args(Listing)

_NOT_A_CURSOR = 'not a cursor from this API; pass next_cursor back unchanged'
_LISTING_WORDS = {
    'audit': 'the audit',
    'conversations': 'the conversations by order=updated',
    'conversations-created': 'the conversations by order=created',
}
"""Each listing as a client names it (its route and query), for the error of a cursor of another."""


def _packed(fields: list[Any]) -> str:
    """`fields` as a cursor: compact JSON in base64url without padding."""
    return base64.urlsafe_b64encode(json.dumps(fields, separators=(',', ':')).encode()).decode().rstrip('=')


def _unpacked(cursor: str) -> Any:
    """The JSON a cursor `_packed` made.

    Raises:
        ValueError, binascii.Error, UnicodeDecodeError: `cursor` is longer than `MAX_CURSOR_CHARS` or is not one.
    """
    if len(cursor) > MAX_CURSOR_CHARS:
        raise ValueError('too long')
    return json.loads(base64.urlsafe_b64decode(cursor + '=' * (-len(cursor) % 4)))


def encode_cursor(moment: datetime, key: str | uuid.UUID, *, listing: Listing, account_id: int) -> str:
    """A cursor after the row sorted at (`moment`, `key`) of `listing`, for `account_id`'s requests only."""
    return _packed([listing, account_id, moment.isoformat(), str(key)])


def decode_cursor(cursor: str, *, listing: Listing, account_id: int) -> tuple[datetime, str]:
    """(moment, key) from a cursor `encode_cursor` made for this listing and account.

    Raises:
        InvalidInputError: `cursor` is not one, or was made for another listing or another account (field `cursor`).
    """
    try:
        made_for, owner, moment, key = _unpacked(cursor)
        parsed = datetime.fromisoformat(moment)
        if parsed.tzinfo is None or not isinstance(key, str) or not is_storable(key):
            raise ValueError('not a cursor')
        # In UTC here: the driver converts it, and a moment past year 9999 or before year 1 there was a 500.
        after = parsed.astimezone(UTC), key
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInputError(_NOT_A_CURSOR, field='cursor') from exc
    if made_for not in _LISTINGS or not isinstance(owner, int):
        raise InvalidInputError(_NOT_A_CURSOR, field='cursor')
    if made_for != listing:
        raise InvalidInputError(
            f'this cursor is a position in {_LISTING_WORDS[made_for]}, not in {_LISTING_WORDS[listing]}: pass back the '
            'next_cursor of this listing, with the query (order=) of the page that gave it',
            field='cursor',
        )
    if owner != account_id:
        raise InvalidInputError(
            "this cursor was made for another account's page: pass back the next_cursor of a page listed with this "
            'API key',
            field='cursor',
        )
    return after


def decode_uuid_cursor(cursor: str, *, listing: Listing, account_id: int) -> tuple[datetime, uuid.UUID]:
    """`decode_cursor` for a cursor whose key is a UUID (the audit's)."""
    moment, key = decode_cursor(cursor, listing=listing, account_id=account_id)
    try:
        return moment, uuid.UUID(key)
    except ValueError as exc:
        raise InvalidInputError('not a cursor of this listing', field='cursor') from exc


# A position in a conversation's messages (`GET /api/v1/conversations/{id}?before=`): the entry the page shown last
# began with, for the conversation and account it was made for.
_MESSAGES = 'messages'
_NOT_A_POSITION = 'not a position from this API; pass earlier_cursor back unchanged'


def encode_message_cursor(entry_id: str, *, conversation_id: str, account_id: int) -> str:
    """A cursor for the messages before the entry `entry_id` of `conversation_id`, for `account_id`'s requests only."""
    return _packed([_MESSAGES, account_id, conversation_id, entry_id])


def decode_message_cursor(cursor: str, *, conversation_id: str, account_id: int) -> str:
    """The entry id of a cursor `encode_message_cursor` made for this conversation and account.

    Raises:
        InvalidInputError: `cursor` is not one, or was made for another conversation or another account (field
            `before`).
    """
    try:
        made_for, owner, conversation, entry_id = _unpacked(cursor)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInputError(_NOT_A_POSITION, field='before') from exc
    if made_for in _LISTINGS:
        raise InvalidInputError(
            f"this is a listing's next_cursor ({made_for!r}), not a position in a conversation's messages: pass "
            'the earlier_cursor of a page of this conversation',
            field='before',
        )
    if made_for != _MESSAGES or not isinstance(owner, int) or not isinstance(conversation, str):
        raise InvalidInputError(_NOT_A_POSITION, field='before')
    if not isinstance(entry_id, str) or not entry_id or not is_storable(entry_id):
        raise InvalidInputError(_NOT_A_POSITION, field='before')
    if owner != account_id:
        raise InvalidInputError(
            "this position was made for another account's conversation: pass back the earlier_cursor of a page read "
            'with this API key',
            field='before',
        )
    if conversation != conversation_id:
        raise InvalidInputError(
            'this position is in another conversation: pass back the earlier_cursor of a page of this one',
            field='before',
        )
    return entry_id
