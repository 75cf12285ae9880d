"""Making text safe for PostgreSQL, which cannot store the NUL character in `text` or `jsonb`."""

from __future__ import annotations

from typing import Any

REPLACEMENT = '\ufffd'


def without_nul(value: Any) -> Any:
    """Return `value` with every NUL character in its strings (nested in dicts and lists too) replaced by U+FFFD.

    A model or a tool can produce a NUL (binary data read as text); PostgreSQL rejects it in `jsonb` and `text`,
    and the whole write would fail. Replacing it keeps the turn and is visible to a reader.
    """
    if isinstance(value, str):
        return value.replace('\x00', REPLACEMENT) if '\x00' in value else value
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_nul(v) for v in value]
    return value
