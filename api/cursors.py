"""Opaque keyset cursors: the sort key of the last row a page showed, for a next page that stays stable while rows
arrive. A cursor is base64url JSON; clients pass it back unchanged and never parse it."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime

from agentrt.db.errors import InvalidInputError
from agentrt.services.pg_text import is_storable

MAX_CURSOR_CHARS = 600


def encode_cursor(moment: datetime, key: str | uuid.UUID) -> str:
    """A cursor after the row sorted at (`moment`, `key`)."""
    raw = json.dumps([moment.isoformat(), str(key)], separators=(',', ':')).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip('=')


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """(moment, key) from a cursor made by `encode_cursor`.

    Raises:
        InvalidInputError: `cursor` is not one (field `cursor`).
    """
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError('too long')
        raw = base64.urlsafe_b64decode(cursor + '=' * (-len(cursor) % 4))
        moment, key = json.loads(raw)
        parsed = datetime.fromisoformat(moment)
        if parsed.tzinfo is None or not isinstance(key, str) or not is_storable(key):
            raise ValueError('not a cursor')
        # In UTC here: the driver converts it, and a moment past year 9999 or before year 1 there was a 500.
        return parsed.astimezone(UTC), key
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInputError('not a cursor from this API; pass next_cursor back unchanged', field='cursor') from exc


def decode_uuid_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """`decode_cursor` for a cursor whose key is a UUID (the audit's)."""
    moment, key = decode_cursor(cursor)
    try:
        return moment, uuid.UUID(key)
    except ValueError as exc:
        raise InvalidInputError('not a cursor of this listing', field='cursor') from exc
