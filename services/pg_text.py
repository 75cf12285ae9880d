"""Making text safe for PostgreSQL, which cannot store NUL in `text` or `jsonb`, nor a lone surrogate anywhere."""

from __future__ import annotations

import re
from typing import Any

REPLACEMENT = '\ufffd'

# A lone surrogate (U+D800-U+DFFF) is not a character: UTF-8 cannot encode it, so the driver fails on the whole
# statement. Python produces them from `surrogateescape` (undecodable bytes in argv or a file name), from JSON
# (`"\ud800"` is valid JSON) and from UTF-16 text cut in half.
_UNSTORABLE = re.compile('[\x00\ud800-\udfff]')


def storable_text(text: str) -> str:
    """`text` with every NUL and lone surrogate replaced by U+FFFD, so PostgreSQL can store it (and a reader sees it).

    Python strings never hold a valid surrogate pair (an astral character is one code point), so every surrogate in
    a `str` is a lone one.
    """
    return _UNSTORABLE.sub(REPLACEMENT, text) if _UNSTORABLE.search(text) else text


def is_storable(text: str) -> bool:
    """Whether `text` holds no NUL and no lone surrogate (`storable_text` would return it as it is)."""
    return _UNSTORABLE.search(text) is None


def storable(value: Any) -> Any:
    """`value` with `storable_text` applied to every string in it, dict keys and nested lists included.

    For JSON about to go into `jsonb`: a model or a tool can produce a NUL (binary data read as text) or a lone
    surrogate (`"\\ud800"` in a provider's JSON), and the whole write would fail. Replacing them keeps the turn.
    """
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value
