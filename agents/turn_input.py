"""Checking a chat turn's input at the boundary, before any database work, model request or billing.

The rules (README, "Input rules"): a session id is 1-200 characters of letters, digits and `. _ : @ -`, starting
with a letter or digit (it goes into 200-character columns and into URLs); an account or agent slug is 1-64
characters of letters, digits and `. _ -`, starting with a letter or digit. Identifiers are refused, never
altered: changing one would address another conversation or tenant. The message is text of at most
`AGENTRT_MESSAGE_MAX_CHARS` characters, not blank; a NUL or a lone surrogate in it (which PostgreSQL cannot
store) is replaced by U+FFFD, as the store does with a model's or a tool's text, so the model sees what is saved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agentrt.db.errors import InvalidInputError
from agentrt.db.settings import Settings
from agentrt.services.pg_text import describe_char, preview, storable_text

SESSION_ID_MAX_CHARS = 200
"""`conversations.conversation_id` and `llm_requests.chat_session_id` are `varchar(200)`."""
SLUG_MAX_CHARS = 64
"""`accounts.slug` and `agent_instances.slug` are `varchar(64)`."""

_SESSION_ID = re.compile(r'[A-Za-z0-9][A-Za-z0-9._:@-]*')
_SLUG = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')
_SESSION_ID_CHARS = 'letters, digits and . _ : @ - (starting with a letter or digit)'
_SLUG_CHARS = 'letters, digits and . _ - (starting with a letter or digit)'


@dataclass(frozen=True)
class TurnInput:
    """A turn's input once checked: identifiers as given, the message normalised."""

    message: str
    session_id: str
    account: str
    agent_instance: str | None


def validate_turn_input(
    message: object, *, session_id: object, account: object, agent_instance: object = None, settings: Settings
) -> TurnInput:
    """Check a turn's message and identifiers; return them ready to use.

    Args:
        message: the user's message.
        session_id: the conversation id.
        account: the account slug.
        agent_instance: the agent slug, or None for the account's first agent.
        settings: where `message_max_chars` comes from.

    Raises:
        InvalidInputError: naming the field (`message`, `session_id`, `account`, `agent_instance`) and the problem.
    """
    identifiers = validate_identifiers(session_id=session_id, account=account, agent_instance=agent_instance)
    return TurnInput(validate_message(message, max_chars=settings.message_max_chars), *identifiers)


def validate_identifiers(
    *, session_id: object, account: object, agent_instance: object = None
) -> tuple[str, str, str | None]:
    """Check a session id, an account slug and an optional agent slug (the rules in the module docstring).

    Raises:
        InvalidInputError: naming the first field that breaks the rules, and how.
    """
    checked_session = _identifier(session_id, 'session_id', 'session id', _SESSION_ID, SESSION_ID_MAX_CHARS)
    checked_account = _identifier(account, 'account', 'account slug', _SLUG, SLUG_MAX_CHARS)
    if agent_instance is None:
        return checked_session, checked_account, None
    checked_agent = _identifier(agent_instance, 'agent_instance', 'agent slug', _SLUG, SLUG_MAX_CHARS)
    return checked_session, checked_account, checked_agent


def validate_message(message: object, *, max_chars: int) -> str:
    """Check a chat message and return it with NUL and lone surrogates replaced by U+FFFD.

    Raises:
        InvalidInputError: the message is not text, is longer than `max_chars` characters, or is blank.
    """
    if not isinstance(message, str):
        raise InvalidInputError(f'the chat message must be text, not {type(message).__name__}', field='message')
    if len(message) > max_chars:
        raise InvalidInputError(
            f'the chat message is {len(message):,} characters long; the limit is {max_chars:,} '
            '(AGENTRT_MESSAGE_MAX_CHARS)',
            field='message',
        )
    if not message.strip():
        raise InvalidInputError('the chat message is empty', field='message')
    return storable_text(message)


def _identifier(value: object, field: str, name: str, pattern: re.Pattern[str], max_chars: int) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f'the {name} must be text, not {type(value).__name__}', field=field)
    if not value:
        raise InvalidInputError(f'the {name} is empty', field=field)
    if len(value) > max_chars:
        raise InvalidInputError(f'the {name} is {len(value):,} characters long; the limit is {max_chars}', field=field)
    if pattern.fullmatch(value) is None:
        position, char = _first_bad(value, pattern)
        allowed = _SESSION_ID_CHARS if pattern is _SESSION_ID else _SLUG_CHARS
        raise InvalidInputError(
            f'the {name} {preview(value)} has a character that is not allowed at position {position} '
            f'({describe_char(char)}); use {allowed}',
            field=field,
        )
    return value


def _first_bad(value: str, pattern: re.Pattern[str]) -> tuple[int, str]:
    matched = pattern.match(value)
    position = matched.end() if matched is not None else 0
    return position, value[position]
