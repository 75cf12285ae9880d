"""Text PostgreSQL cannot store: NUL and lone surrogates become U+FFFD, everything else is left as it is."""

from __future__ import annotations

import pytest

from agentrt.db.errors import InvalidInputError
from agentrt.services.pg_text import (
    checked_identifier,
    is_storable,
    is_storable_value,
    preview,
    storable,
    storable_text,
)


def test_storable_text_replaces_only_nul_and_lone_surrogates() -> None:
    assert storable_text('plain é 中 \U0001f600') == 'plain é 中 \U0001f600'
    assert storable_text('a\x00b\ud800c\udfffd') == 'a\ufffdb\ufffdc\ufffdd'
    assert storable_text('\x01\x7f\u2028') == '\x01\x7f\u2028', 'other control characters are storable'
    ordinary = 'x' * 10_000
    assert storable_text(ordinary) is ordinary, 'no copy when there is nothing to replace'


def test_storable_walks_json_values_keys_included() -> None:
    value = {'k\x00': ['v\udc80', {'n': 1, 'f': 1.5, 'b': True, 'none': None}], 't': ('x\x00',)}
    assert storable(value) == {'k\ufffd': ['v\ufffd', {'n': 1, 'f': 1.5, 'b': True, 'none': None}], 't': ['x\ufffd']}
    storable_text(str(storable(value))).encode('utf-8')


def test_a_value_nested_past_pythons_recursion_is_copied_mended() -> None:
    # A model's arguments nested thousands deep, parsed (a provider that sends dicts): a raw RecursionError (QA).
    deep: object = ['leaf\x00', {'k\ud800': 1}]
    for _ in range(5_000):
        deep = [deep, 'x']
    copied = storable(deep)
    assert not is_storable_value(deep)
    for _ in range(5_000):
        assert isinstance(copied, list) and copied[1] == 'x'
        copied = copied[0]
    assert copied == ['leaf\ufffd', {'k\ufffd': 1}]
    looped: list[object] = []
    looped.append([looped])
    with pytest.raises(ValueError, match='Circular reference'):  # a value that contains itself, as json.dumps says
        storable(looped[0])


def test_is_storable_says_whether_storable_text_would_change_it() -> None:
    assert is_storable('plain é 中 \U0001f600 \x01') and is_storable('')
    assert not any(is_storable(text) for text in ('\x00', 'a\ud800', '\udfffb', 'x' * 10_000 + '\x00'))


def test_an_identifier_refused_shows_none_of_a_secret_pasted_into_it() -> None:
    key = 'sk-proj-' + 'aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9fG1hJ3'
    for value in (key + '\x00', 'conv-' + key + '\ud800', '\x00' + key):
        with pytest.raises(InvalidInputError) as refused:
            checked_identifier(value, 'conversation id')
        message = str(refused.value)
        assert 'conversation id' in message and 'PostgreSQL cannot store' in message
        assert key[:12] not in message and key[-12:] not in message, message
    with pytest.raises(InvalidInputError, match="'plain-id") as refused:
        checked_identifier('plain-id\x00', 'conversation id')


@pytest.mark.parametrize(
    ('value', 'shown'),
    [
        # Printable: as it is. Every non-ASCII character was escaped, `été` shown as '\xe9t\xe9' (QA).
        ('été', "'été'"),
        ('東京 \U0001f600 e\u0301', "'東京 \U0001f600 e\u0301'"),
        # Not printable: escaped, whatever a terminal would do with it.
        ('a\x00b\x1b[2J\x7f\t', "'a\\x00b\\x1b[2J\\x7f\\t'"),
        ('x\u202ey\u200bz\ufeff', "'x\\u202ey\\u200bz\\ufeff'"),  # a direction override, zero-width, a BOM
        ('a\u2028b\u2029c\xa0d', "'a\\u2028b\\u2029c\\xa0d'"),  # separators
        ('caf\udce9', "'caf\\udce9'"),  # a lone surrogate
        # The quote and the escape character: an escape in a preview is always one.
        ("it's a\\x00", "'it\\'s a\\\\x00'"),
    ],
)
def test_preview_shows_printable_characters_as_they_are_and_escapes_the_others(value: str, shown: str) -> None:
    assert preview(value) == shown
