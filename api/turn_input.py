"""Checks on what a client sends for a turn, before anything is looked up, run or billed.

The message itself goes through the same check as `simple_chat`'s (`agentrt.agents.chat_turn.check_message`);
the conversation id must fit the store's column and be text PostgreSQL can hold.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import TypeVar

from pydantic import ValidationError
from starlette.requests import Request

from agentrt.agents.chat_turn import check_message
from agentrt.api.errors import ApiError
from agentrt.db.errors import ConfigError, InvalidInputError

T = TypeVar('T')

MAX_CONVERSATION_ID_CHARS = 200
"""The length of the `conversations.conversation_id` column."""


def check_conversation_id(conversation_id: str, *, field: str = 'id') -> str:
    """The conversation id, if it is 1-200 characters of printable text (no control characters, no lone surrogate).

    Raises:
        InvalidInputError: naming `field` and what is wrong.
    """
    if not conversation_id or len(conversation_id) > MAX_CONVERSATION_ID_CHARS:
        raise InvalidInputError(f'the conversation id must be 1 to {MAX_CONVERSATION_ID_CHARS} characters', field=field)
    if any(unicodedata.category(char) in ('Cc', 'Cs') for char in conversation_id):
        raise InvalidInputError('the conversation id holds a control character or a lone surrogate', field=field)
    return conversation_id


def _encodable(text: str) -> bool:
    """False when `text` holds a lone surrogate (which no UTF-8 text, and so no PostgreSQL column, can hold)."""
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        return False
    return True


def check_new_message(text: str, *, field: str = 'message') -> None:
    """Refuse a message `simple_chat` would refuse, as invalid input of `field`.

    Raises:
        InvalidInputError: the message is empty, holds a NUL or a lone surrogate (PostgreSQL cannot store either),
            or is otherwise not acceptable.
    """
    if '\x00' in text or not _encodable(text):
        raise InvalidInputError('the message holds a NUL character or a lone surrogate', field=field)
    try:
        check_message(text)
    except ConfigError as exc:  # the in-process check reports a bad message as a configuration error
        raise InvalidInputError(str(exc), field=field) from exc
    except InvalidInputError as exc:
        raise InvalidInputError(str(exc), field=field) from exc


def parse_run_input(
    request: Request, body: bytes, build: Callable[[bytes], T], *, tags: frozenset[str] = frozenset()
) -> T:
    """A chat protocol's request body (`build` is the adapter's `build_run_input`), or the error naming the field.

    The field errors do not echo the values sent (they can be huge, or hold what should not come back). `tags` are
    the values of the body's own discriminator (Vercel's `trigger`), which pydantic puts first in a location.

    Raises:
        ApiError: 415 unless the body is declared JSON (also the adapters' guard against cross-site form posts).
        InvalidInputError: the body does not validate; `field` is the first bad field's location.
    """
    media_type = request.headers.get('content-type', '').split(';')[0].strip().lower()
    if media_type != 'application/json':
        raise ApiError(415, 'unsupported_media_type', 'send the body as Content-Type: application/json')
    try:
        return build(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        location = list(first['loc'])
        if location and location[0] in tags:
            location = location[1:]
        where = '.'.join(str(part) for part in location) or 'body'
        raise InvalidInputError(f'{where}: {first["msg"]}', field=where) from exc
