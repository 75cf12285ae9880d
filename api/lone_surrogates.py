"""A lone surrogate escape in a JSON body (`"\\ud800"`): found and named, for a 422 that says what is wrong and where.

JSON allows `\\ud800` on its own, but it is half of a UTF-16 pair, not a character: UTF-8 cannot encode it and
PostgreSQL cannot store it. pydantic refuses it in its own words, which do not say so: the chat protocols' parser
(jiter) with "unexpected end of hex escape" or "lone leading surrogate in hex escape" and a column, FastAPI's body
validation with "unable to parse raw data as a unicode string". The body is read again only once it was refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_SURROGATE = re.compile('[\ud800-\udfff]')


@dataclass(frozen=True, slots=True)
class LoneSurrogate:
    """The first string of a JSON value that holds a lone surrogate."""

    location: tuple[str | int, ...]
    """Where the string is: its path, or the path of the object when it is a key (`()` for the top level)."""
    text: str
    in_key: bool

    @property
    def where(self) -> str:
        """The location as a field name (`messages.0.parts.0.text`), `body` for the top level."""
        return '.'.join(str(part) for part in self.location) or 'body'

    def message(self) -> str:
        """What is wrong, for an error message (without the location)."""
        return lone_surrogate_message(self.text, in_key=self.in_key)


def lone_surrogate_message(text: str, *, in_key: bool = False) -> str:
    """Why `text` (a string or an object's key of a JSON body) is refused: the escape and its position in it."""
    found = _SURROGATE.search(text)
    position, escape = (found.start(), f'\\u{ord(found.group()):04x}') if found else (0, 'a \\ud800-\\udfff escape')
    what = 'a key' if in_key else 'the text'
    return (
        f'{what} has an invalid unicode escape, {escape} at position {position}: a lone surrogate (half of a UTF-16 '
        'pair without its other half), which is not a character; send the character itself, or both halves of its pair'
    )


def lone_surrogate_in_body(body: bytes) -> LoneSurrogate | None:
    """The first lone surrogate in a body a JSON parser refused, or None when that was not the reason.

    Python's parser, unlike pydantic's, takes a lone surrogate escape; a body it refuses too has another fault.
    """
    try:
        return first_lone_surrogate(json.loads(body))
    except (ValueError, RecursionError):  # not JSON even to Python, or nested deeper than the walk goes
        return None


def first_lone_surrogate(value: Any, location: tuple[str | int, ...] = ()) -> LoneSurrogate | None:
    """The first string holding a lone surrogate in a parsed JSON value (keys before their values), or None."""
    if isinstance(value, str):
        return LoneSurrogate(location, value, in_key=False) if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _SURROGATE.search(key):
                return LoneSurrogate(location, key, in_key=True)
            found = first_lone_surrogate(item, (*location, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = first_lone_surrogate(item, (*location, index))
            if found is not None:
                return found
    return None


def is_key_of(body: Any, location: tuple[str | int, ...], text: str) -> bool:
    """Whether `text` is a key of the object at `location` of `body` (a validation error's location names the object
    for a bad key, the value for a bad value)."""
    for part in location:
        try:
            body = body[part]
        except (KeyError, IndexError, TypeError):
            return False
    return isinstance(body, dict) and text in body
