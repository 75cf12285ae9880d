"""Making text safe for PostgreSQL, which cannot store NUL in `text` or `jsonb`, nor a lone surrogate anywhere."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from agentrt.db.errors import InvalidInputError

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


def is_storable_value(value: Any) -> bool:
    """Whether `storable(value)` would find nothing to replace in `value` (checked without copying it); False for a
    value nested deeper than Python's recursion allows (`storable` copies it all the same)."""
    try:
        return _is_storable_value(value)
    except RecursionError:
        return False


def _is_storable_value(value: Any) -> bool:
    if isinstance(value, str):
        return _UNSTORABLE.search(value) is None
    if isinstance(value, dict):
        return all(_is_storable_value(key) and _is_storable_value(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return all(_is_storable_value(item) for item in value)
    return True


def storable(value: Any) -> Any:
    """`value` with `storable_text` applied to every string in it, dict keys and nested lists included.

    For JSON about to go into `jsonb`: a model or a tool can produce a NUL (binary data read as text) or a lone
    surrogate (`"\\ud800"` in a provider's JSON), and the whole write would fail. Replacing them keeps the turn.
    A value nested deeper than Python's recursion allows (a model's hostile arguments, parsed) is copied without
    recursion: it was a raw `RecursionError` (QA).

    Raises:
        ValueError: the value contains itself (as `json.dumps` says of it).
    """
    try:
        return _storable(value)
    except RecursionError:
        return _storable_deep(value)


def _storable(value: Any) -> Any:
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value


def _storable_deep(value: Any) -> Any:
    """`_storable` with a stack of its own instead of Python's: each container is put in its parent as it is opened."""
    if not isinstance(value, dict | list | tuple):
        return _storable(value)
    root: Any = {} if isinstance(value, dict) else []
    stack: list[tuple[Iterator[tuple[Any, Any]], Any, int]] = [(_entries(value), root, id(value))]
    open_ids = {id(value)}
    while stack:
        entries, out, source_id = stack[-1]
        for key, item in entries:
            if isinstance(item, dict | list | tuple):
                if id(item) in open_ids:
                    raise ValueError('Circular reference detected')
                child: Any = {} if isinstance(item, dict) else []
                _put(out, key, child)
                stack.append((_entries(item), child, id(item)))
                open_ids.add(id(item))
                break
            _put(out, key, storable_text(item) if isinstance(item, str) else item)
        else:
            stack.pop()
            open_ids.discard(source_id)
    return root


def _entries(value: dict[Any, Any] | list[Any] | tuple[Any, ...]) -> Iterator[tuple[Any, Any]]:
    if isinstance(value, dict):
        return ((storable_text(k) if isinstance(k, str) else k, v) for k, v in value.items())
    return ((None, v) for v in value)


def _put(out: dict[Any, Any] | list[Any], key: Any, item: Any) -> None:
    if isinstance(out, dict):
        out[key] = item
    else:
        out.append(item)


def checked_identifier(value: object, field: str, *, max_chars: int | None = None) -> str:
    """`value` when it is text PostgreSQL can store and compare as it is, at most `max_chars` characters; else refused.

    For identifiers, which are refused rather than altered as `storable_text` alters text: an altered one would
    address another row. No I/O: for the start of a public method, before any SQL.

    Raises:
        InvalidInputError: naming `field`: not text, longer than `max_chars`, or holding a NUL or a lone surrogate.
    """
    if not isinstance(value, str):
        raise InvalidInputError(f'the {field} must be text, not {type(value).__name__}', field=field)
    if max_chars is not None and len(value) > max_chars:
        raise InvalidInputError(f'the {field} is {len(value):,} characters long; the limit is {max_chars}', field=field)
    bad = _UNSTORABLE.search(value)
    if bad is not None:
        raise InvalidInputError(
            f'the {field} {preview(value)} has a character PostgreSQL cannot store at position {bad.start()} '
            f'({describe_char(bad.group())})',
            field=field,
        )
    return value


def describe_char(char: str) -> str:
    """A character for an error message: its code point, and what it is when it does not print (NUL, a lone
    surrogate, whitespace) or itself when it does."""
    code = f'U+{ord(char):04X}'
    if char == '\x00':
        return f'{code}, NUL'
    if 0xD800 <= ord(char) <= 0xDFFF:
        return f'{code}, a lone surrogate'
    if char.isspace():
        return f'{code}, whitespace'
    return f'{code} {char!r}' if char.isprintable() else code


def preview(value: str) -> str:
    """`value` quoted for an error message: its secrets redacted, then at most 40 characters, each one a terminal
    shows as itself (`été`, `東京`) kept, the others escaped (`\\x00`, `\\u202e`), so it prints on any terminal.

    Redacted before the cut: a key pasted as an id or a name, cut at 40 characters, no longer has the shape a rule
    knows, and the redaction of the whole message (the CLI's error line, the API's error body) showed its start.
    """
    from agentrt.services.ledger.redaction import redact_text  # only on an error: the rules cost an import

    value = redact_text(value)[0]
    shown = ''.join(_previewed(char) for char in value[:40])
    return f"'{shown}'" + ('...' if len(value) > 40 else '')


def _previewed(char: str) -> str:
    """`char` as `preview` shows it: as itself when printable (`str.isprintable`), else escaped: a control or format
    character (a direction override, a zero-width space), a separator (U+2028, a no-break space), a lone surrogate.
    Every non-ASCII character was escaped, so `été` read `\\xe9t\\xe9` beside its own `(U+00E9 'é')` (QA)."""
    if char in ('\\', "'"):  # the quote and the escape character itself: an escape in the preview is always one
        return '\\' + char
    if char.isprintable():
        return char
    return char.encode('unicode_escape').decode('ascii')
