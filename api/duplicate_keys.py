"""A key given twice in one object of a JSON body (`{"message": "a", "message": "b"}`): refused, naming it.

JSON parsers keep the last of the two (Python's, pydantic's), so such a body was taken as if the first were never
sent: a client that built its body by joining text, or a proxy that added a field, had one of its values dropped
without a word. RFC 8259 leaves it to the parser; this API refuses it, as it refuses any input it would have to
guess about.
"""

from __future__ import annotations

import json
from typing import Any

from agentrt.db.errors import InvalidInputError


class _Repeated(dict[str, Any]):
    """An object of the body with a key given more than once (the last value kept, as JSON parsers do)."""

    repeated: str = ''


def loads_with_unique_keys(text: str | bytes) -> Any:
    """`json.loads(text)`, refusing an object with a key given twice.

    Raises:
        ValueError: `text` is not JSON (as `json.loads`).
        RecursionError: it nests deeper than the parser goes.
        InvalidInputError: an object of it has a key twice; `field` is the key's location (`messages.0.role`).
    """
    repeated: list[str] = []

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        made = dict(pairs)
        if len(made) == len(pairs):  # the common case: no Python-level work beyond this call
            return made
        marked = _Repeated(made)
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                marked.repeated = key
                break
            seen.add(key)
        repeated.append(marked.repeated)
        return marked

    data = json.loads(text, object_pairs_hook=unique_keys)
    if not repeated:
        return data
    try:
        location, key = _first_repeated(data, ()) or ((), repeated[0])
    except RecursionError:  # nested about as deep as the parser goes: the key alone
        location, key = (), repeated[0]
    where = '.'.join(str(part) for part in (*location, key))
    raise InvalidInputError(
        f'{where}: the key {key!r} is given more than once in one object; send each key once', field=where
    )


def _first_repeated(value: Any, location: tuple[str | int, ...]) -> tuple[tuple[str | int, ...], str] | None:
    """The location of the first object with a repeated key, and the key (an object before what it holds)."""
    if isinstance(value, _Repeated):
        return location, value.repeated
    items: Any = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for part, item in items:
        if isinstance(item, dict | list):
            found = _first_repeated(item, (*location, part))
            if found is not None:
                return found
    return None
