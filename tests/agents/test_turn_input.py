"""The input rules, without a database: identifiers refused with the field and the reason, messages normalised."""

from __future__ import annotations

import pytest

from agentrt.agents.turn_input import (
    SESSION_ID_MAX_CHARS,
    SLUG_MAX_CHARS,
    validate_identifiers,
    validate_message,
    validate_turn_input,
)
from agentrt.db.errors import AgentRuntimeError, InvalidInputError
from agentrt.db.models import Account, AgentInstance, ConversationRow
from agentrt.db.models.ledger import LLMRequestRow
from agentrt.db.settings import Settings


@pytest.mark.parametrize(
    'session_id',
    ['cli-1a2b3c', 'a', 'user:42@web', 'conv_2026.03.01', '0-x', 'x' * SESSION_ID_MAX_CHARS, 'A-Z.0_9:@-'],
)
def test_good_session_ids_pass_unchanged(session_id: str) -> None:
    assert validate_identifiers(session_id=session_id, account='acme-health') == (session_id, 'acme-health', None)


@pytest.mark.parametrize(
    ('field', 'value', 'reason'),
    [
        ('session_id', '', 'is empty'),
        ('session_id', 'x' * (SESSION_ID_MAX_CHARS + 1), '201 characters long; the limit is 200'),
        ('session_id', 'ab\x00c', 'position 2 (U+0000, NUL)'),
        ('session_id', '\x00', 'position 0 (U+0000, NUL)'),
        ('session_id', 'ab\ud800', 'position 2 (U+D800, a lone surrogate)'),
        ('session_id', 'cli-\udcff', 'position 4 (U+DCFF, a lone surrogate)'),
        ('session_id', 'two words', 'position 3 (U+0020, whitespace)'),
        ('session_id', 'line\nbreak', 'position 4 (U+000A, whitespace)'),
        ('session_id', 'a/b', "position 1 (U+002F '/')"),
        ('session_id', '../etc', "position 0 (U+002E '.')"),
        ('session_id', 'café', "position 3 (U+00E9 'é')"),
        ('session_id', '{"json": 1}', "position 0 (U+007B '{')"),
        ('session_id', 42, 'must be text, not int'),
        ('session_id', None, 'must be text, not NoneType'),
        ('account', '', 'is empty'),
        ('account', 'x' * (SLUG_MAX_CHARS + 1), '65 characters long; the limit is 64'),
        ('account', 'acme\x00', 'position 4 (U+0000, NUL)'),
        ('account', 'acme\ud83d', 'position 4 (U+D83D, a lone surrogate)'),
        ('account', 'acme health', 'position 4 (U+0020, whitespace)'),
        ('account', 'acme:health', "position 4 (U+003A ':')"),
        ('account', b'acme', 'must be text, not bytes'),
        ('agent_instance', '', 'is empty'),
        ('agent_instance', 'x' * (SLUG_MAX_CHARS + 1), '65 characters long; the limit is 64'),
        ('agent_instance', 'finder\x00', 'position 6 (U+0000, NUL)'),
        ('agent_instance', '\udc80finder', 'position 0 (U+DC80, a lone surrogate)'),
        ('agent_instance', "x'; drop table accounts; --", 'position 1 (U+0027 "\'")'),
    ],
)
def test_bad_identifiers_are_refused_with_field_and_reason(field: str, value: object, reason: str) -> None:
    given: dict[str, object] = {'session_id': 'ok', 'account': 'acme-health', 'agent_instance': None, field: value}
    with pytest.raises(InvalidInputError) as info:
        validate_identifiers(**given)
    assert info.value.field == field
    assert reason in str(info.value)
    assert isinstance(info.value, AgentRuntimeError) and isinstance(info.value, ValueError)
    str(info.value).encode('utf-8')  # the message itself prints anywhere: no lone surrogate in it


def test_the_limits_are_the_column_sizes() -> None:
    assert ConversationRow.__table__.c.conversation_id.type.length == SESSION_ID_MAX_CHARS
    assert LLMRequestRow.__table__.c.chat_session_id.type.length == SESSION_ID_MAX_CHARS
    assert Account.__table__.c.slug.type.length == SLUG_MAX_CHARS
    assert AgentInstance.__table__.c.slug.type.length == SLUG_MAX_CHARS


@pytest.mark.parametrize(
    ('message', 'expected'),
    [
        ('plain', 'plain'),
        ('nul\x00inside', 'nul\ufffdinside'),
        ('\x00' * 3 + '?', '\ufffd' * 3 + '?'),
        ('\u200bzero-width first', '\u200bzero-width first'),
        ('\u0301', '\u0301'),  # a combining accent alone shows (on a dotted circle)
        ('\ufe0f\u2764', '\ufe0f\u2764'),
        ('half an emoji \ud83d', 'half an emoji \ufffd'),
        ('argv byte \udcff', 'argv byte \ufffd'),
        ('a whole emoji \U0001f600 stays', 'a whole emoji \U0001f600 stays'),
        ('{"looks": "like json"}\n', '{"looks": "like json"}\n'),
    ],
)
def test_messages_are_normalised_not_refused(message: str, expected: str) -> None:
    assert validate_message(message, max_chars=100) == expected


@pytest.mark.parametrize(
    ('message', 'reason'),
    [
        ('', 'is empty'),
        (' \n\t ', 'is empty'),
        # No question a model could read, yet a whole turn, billed by a real provider (was run: QA).
        ('\x00' * 3, 'no visible character'),
        ('\u200b\u200c\u200d\ufeff', 'no visible character'),
        ('\ud83d \udcff', 'no visible character'),
        ('\u202e\u2066\u00ad\u3000', 'no visible character'),
        ('\ufffd', 'no visible character'),
        ('\x01\x1b\x7f\x85\x9f', 'no visible character'),  # C0, DEL and C1 controls (QA)
        ('\u3164\u115f\uffa0', 'no visible character'),  # Hangul fillers
        ('\ufe0f\U000e0020\U000e007f\u2800', 'no visible character'),  # variation selector, tags, braille blank
        ('\u206a\u206f\ufff9\u0600\u17b4', 'no visible character'),
        ('x' * 101, '101 characters long; the limit is 100 (AGENTRT_MESSAGE_MAX_CHARS)'),
        (None, 'must be text, not NoneType'),
        (b'bytes', 'must be text, not bytes'),
        (['a list'], 'must be text, not list'),
    ],
)
def test_bad_messages_are_refused(message: object, reason: str) -> None:
    with pytest.raises(InvalidInputError, match='the chat message') as info:
        validate_message(message, max_chars=100)
    assert info.value.field == 'message' and reason in str(info.value)


def test_the_message_limit_comes_from_the_settings() -> None:
    settings = Settings(_env_file=None, message_max_chars=10)
    assert validate_turn_input('0123456789', session_id='s', account='a', settings=settings).message == '0123456789'
    with pytest.raises(InvalidInputError, match='11 characters long; the limit is 10'):
        validate_turn_input('0123456789!', session_id='s', account='a', settings=settings)
    assert Settings(_env_file=None).message_max_chars == 32_000
