"""Reading a chat turn from an HTTP request: the protocol's body, then the turn's input checked as `simple_chat`
checks it (`agentrt.agents.chat_turn.check_turn_input`: message size and text, conversation id and slugs), with
the HTTP name of each field in the error."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pydantic import ValidationError
from starlette.requests import Request

from agentrt.agents.chat_turn import check_turn_input
from agentrt.agents.turn_input import SESSION_ID_MAX_CHARS, TurnInput, validate_identifiers
from agentrt.api.duplicate_keys import loads_with_unique_keys
from agentrt.api.errors import ApiError
from agentrt.api.lone_surrogates import lone_surrogate_in_body
from agentrt.api.url_text import not_utf8
from agentrt.db.errors import InvalidInputError, validation_message
from agentrt.services.conversations import off_loop

T = TypeVar('T')


def check_http_turn(
    message: object,
    *,
    conversation_id: object,
    account: str,
    account_id: int,
    agent: str | None,
    id_field: str,
    message_field: str,
) -> TurnInput:
    """The turn's input, checked before anything is looked up, run or billed.

    Args:
        message: the new user message.
        conversation_id: the conversation, as the request names it.
        account: the account slug of the caller's key.
        account_id: its account's id: the turn is refused if the slug names another account by then (the key's
            account deleted and its slug given to a new one while the server still trusted the key).
        agent: the agent slug the request asks for, or None.
        id_field: where the request carries the conversation id (`id`, `threadId`, `conversation_id`).
        message_field: where it carries the message (`messages`, `message`).

    Raises:
        InvalidInputError: naming the request's field and the problem.
    """
    try:
        checked = check_turn_input(message, session_id=conversation_id, account=account, agent_instance=agent)
    except InvalidInputError as exc:
        field = {'message': message_field, 'session_id': id_field, 'agent_instance': 'agent'}.get(exc.field, exc.field)
        raise InvalidInputError(_in_http_words(exc), field=field) from exc
    return replace(checked, account_id=account_id)


def check_conversation_id(conversation_id: str, *, account: str) -> str:
    """A conversation id from the path of a read or a delete: one a turn may name, or one stored before the turn's
    rules came (agentrt before 2026-12-01 took any text as a session id, so `conv ü` or `a b` may be in the table:
    such a conversation is listed, and must still open and delete).

    An id outside the turn's rules is looked up as it is when the store can hold it (at most 200 characters, no NUL
    or lone surrogate: `services.conversations` checks that before its SQL); not found, it is a 404 as any other.

    Raises:
        InvalidInputError: naming `conversation_id`: the account slug or the id's length breaks the rules (the
            store refuses what it cannot hold itself, with the same field).
    """
    try:
        return validate_identifiers(session_id=conversation_id, account=account)[0]
    except InvalidInputError as exc:
        if exc.field == 'session_id' and 0 < len(conversation_id) <= SESSION_ID_MAX_CHARS:
            return conversation_id  # maybe stored by an earlier version: the store checks what it can hold
        raise InvalidInputError(_in_http_words(exc), field='conversation_id') from exc


def _in_http_words(exc: InvalidInputError) -> str:
    """The error's message with the conversation called what the HTTP API calls it (`simple_chat`'s words are
    "session id")."""
    message = str(exc)
    return message.replace('the session id', 'the conversation id', 1) if exc.field == 'session_id' else message


def require_json(request: Request) -> None:
    """Refuse a body not declared JSON (a FastAPI dependency of the JSON turn route, which ran the body's
    validation on nothing and answered 422, "Input should be a valid dictionary", for a JSON body sent as text).

    A `charset` other than UTF-8 is refused too: JSON is UTF-8 (RFC 8259) and is read as such, so a body declared
    `charset=latin-1` was read as UTF-8 all the same, and one in UTF-16 was taken on one route and not on the others.

    Raises:
        ApiError: 415 unless the Content-Type is application/json (in UTF-8, when it names a charset).
    """
    media_type, *parameters = request.headers.get('content-type', '').split(';')
    if media_type.strip().lower() != 'application/json':
        raise ApiError(415, 'unsupported_media_type', 'send the body as Content-Type: application/json')
    for parameter in parameters:
        name, _, value = parameter.partition('=')
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == 'charset' and charset not in ('utf-8', 'utf8'):
            raise ApiError(
                415,
                'unsupported_media_type',
                f'charset={charset} is not served: JSON is UTF-8; send the body in UTF-8 (or name no charset)',
                field='Content-Type',
            )


async def require_utf8_json(request: Request) -> None:
    """`require_json`, and the body UTF-8 JSON text with no key twice in an object (a FastAPI dependency of the JSON
    turn route, run once FastAPI has read the body): FastAPI's parser took UTF-16 and UTF-32 (with or without a byte
    order mark) and a UTF-8 byte order mark, which the streamed routes refuse, and kept the last of a repeated key.

    Raises:
        ApiError: 415 unless the Content-Type is application/json (in UTF-8, when it names a charset).
        InvalidInputError: the body is not UTF-8 JSON text, and why (field `body`); an object of it has a key twice
            (`field`: where the key is).
    """
    require_json(request)
    body = await request.body()
    reason = _not_utf8_json(body)
    if reason is not None:
        raise InvalidInputError(f'body: {reason}', field='body')
    if request.scope.get(_KEYS_CHECKED):
        return  # checked with the parse, in a worker thread (`parse_json_off_loop`)
    try:
        loads_with_unique_keys(body)  # FastAPI's parser keeps the last of a key given twice
    except InvalidInputError:
        raise
    except (ValueError, RecursionError):
        pass  # not JSON: FastAPI's validation of the body says why


OFF_LOOP_BODY_BYTES = 64 * 1024
"""A chat body larger than this is parsed in a worker thread (`read_run_input`, `parse_json_off_loop`)."""

_KEYS_CHECKED = 'agentrt.json_keys_checked'
"""Set in a request's scope once its body was parsed with the duplicate-key check (`parse_json_off_loop`)."""


async def parse_json_off_loop(request: Request) -> None:
    """Parse a JSON route's large body in a worker thread, with the duplicate-key check, before FastAPI would parse
    it on the event loop (it reads `Request.json()`, whose cache this fills).

    A 4 MB body of 240,000 tiny objects held the event loop 2-5 s (FastAPI's parse, then the duplicate-key check's
    parse), every other request of the process waiting, before the route refused it (QA). In a thread, the check's
    Python hook gives the loop the GIL back every few milliseconds. A body that is not UTF-8 JSON is left to the
    route's own checks, which say why.

    Raises:
        InvalidInputError: an object of the body has a key twice (`field`: where the key is).
    """
    try:
        require_json(request)
    except ApiError:
        return  # the route's own check refuses it (415), after FastAPI, which parses no body not declared JSON
    body = await request.body()
    if len(body) <= OFF_LOOP_BODY_BYTES or _not_utf8_json(body) is not None:
        return
    try:
        parsed = await off_loop(functools.partial(loads_with_unique_keys, body.decode()))
    except InvalidInputError:
        raise
    except (ValueError, RecursionError):
        return  # not JSON: FastAPI's validation of the body says why
    request._json = parsed  # Starlette's cache of `Request.json()`, which FastAPI reads a body parameter from
    request.scope[_KEYS_CHECKED] = True


async def read_run_input(
    request: Request,
    build: Callable[[bytes], T],
    *,
    tags: frozenset[str] = frozenset(),
    tag_field: str = '',
    tag_default: str = '',
) -> T:
    """`parse_run_input` of the request's body; a large body's in a worker thread.

    Every object of the body is parsed by Python code (the duplicate-key check's hook): a client's copy of the
    history in 140,000 tiny objects (3.9 MB) held the server's event loop 416 ms, every other request with it (QA).
    In a thread, the loop gets the GIL back every few milliseconds.
    """
    body = await request.body()
    parse = functools.partial(
        parse_run_input, request, body, build, tags=tags, tag_field=tag_field, tag_default=tag_default
    )
    if len(body) <= OFF_LOOP_BODY_BYTES:
        return parse()
    return await off_loop(parse)


def parse_run_input(
    request: Request,
    body: bytes,
    build: Callable[[bytes], T],
    *,
    tags: frozenset[str] = frozenset(),
    tag_field: str = '',
    tag_default: str = '',
) -> T:
    """A chat protocol's request body (`build` is the adapter's `build_run_input`), or the error naming the field.

    The field errors do not echo the values sent (they can be huge, or hold what should not come back). `tags` are
    the values of the body's own discriminator (Vercel's `trigger`, `tag_field`), which pydantic puts first in a
    location; a body object without it is read as `tag_default` (what the OpenAPI schema publishes as its default:
    it was a 422, "Unable to extract tag using discriminator 'trigger'").

    Only the body's last message is read: the conversation's history is the server's, and a client that keeps its
    own copy (the AI SDK's `useChat`) sends all of it with every turn. Validating that copy cost CPU on the event
    loop growing with the conversation, and refused every later turn once it held a part this server cannot read.

    Raises:
        ApiError: 415 unless the body is declared JSON (also the adapters' guard against cross-site form posts).
        InvalidInputError: the body does not validate; `field` is the first bad field's location in the body as it
            was sent (that of the first string or key with a lone surrogate escape, when that is why the body is not
            JSON to pydantic); or an object of the body has a key twice (`field`: where the key is).
    """
    require_json(request)
    read = _last_message_only(body, {tag_field: tag_default} if tag_field else {})
    try:
        return build(read.body)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        if first['type'] == 'json_invalid':
            encoding = _not_utf8_json(read.body)
            if encoding is not None:  # the parser's words ("expected value at line 1 column 1") do not say so
                raise InvalidInputError(f'body: {encoding}', field='body') from exc
        surrogate = lone_surrogate_in_body(read.body) if first['type'] == 'json_invalid' else None
        if surrogate is not None:  # the parser's words ("unexpected end of hex escape") do not say so
            where = read.as_sent(list(surrogate.location))
            raise InvalidInputError(f'{where}: {surrogate.message()}', field=where) from exc
        if tag_field and first['type'] in ('union_tag_invalid', 'union_tag_not_found') and not first['loc']:
            raise InvalidInputError(f'{tag_field}: must be {tag_default!r} (or left out)', field=tag_field) from exc
        location = list(first['loc'])
        if location and location[0] in tags:
            location = location[1:]
        where = read.as_sent(location)
        raise InvalidInputError(f'{where}: {validation_message(first)}', field=where) from exc


_BYTE_ORDER_MARKS = (b'\xef\xbb\xbf', b'\xff\xfe', b'\xfe\xff')


def _not_utf8_json(body: bytes) -> str | None:
    """Why `body` is not even UTF-8 JSON text (a byte order mark, UTF-16, bytes that are not UTF-8), or None."""
    if body.startswith(_BYTE_ORDER_MARKS):
        return 'it starts with a byte order mark; send UTF-8 JSON without one'
    problem = not_utf8(body, advice='send the body as UTF-8 text')  # not the URL's advice: percent-encoding
    if problem is not None:
        return f'it is not UTF-8 text: {problem}'
    nul = body.find(b'\x00')
    if nul >= 0:  # valid UTF-8, never JSON text (a control character is escaped there): UTF-16 or UTF-32 without a BOM
        return f'it has a NUL byte at byte {nul}, which JSON text never has (UTF-16?); send UTF-8 JSON'
    return None


@dataclass(frozen=True, slots=True)
class _ReadBody:
    """A protocol body as it is validated (its last message only), and what it takes to name a field as sent."""

    body: bytes
    skipped: int
    """How many messages before the last were left out."""
    data: Any = None
    """The body parsed (after the cut); None when it is not JSON to Python's parser."""

    def as_sent(self, location: list[str | int]) -> str:
        """A validation error's location as a field of the body as sent: the union members pydantic names
        (`TextUIPart`, AG-UI's `user` or `str`) left out, and `messages.0` is `messages.<skipped>`."""
        location = _in_body(location, self.data) if self.data is not None else location
        if self.skipped and location[:2] == ['messages', 0]:
            location = ['messages', self.skipped, *location[2:]]
        return '.'.join(str(part) for part in location) or 'body'


def _in_body(location: list[str | int], data: Any) -> list[str | int]:
    """The parts of `location` that are keys or indexes of `data` (the last one kept when it names a field missing
    from an object); the others are pydantic's names for a member of a union, which the client never sent."""
    kept: list[str | int] = []
    node = data
    for number, part in enumerate(location):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif number == len(location) - 1 and isinstance(node, dict) and isinstance(part, str) and part[:1].islower():
            pass  # a required field that is missing: its name is the field
        else:
            continue
        kept.append(part)
    return kept


MAX_TURN_BODY_VALUES = 20_000
"""The most JSON values (objects, arrays, strings, numbers, ...) a chat body may hold besides its earlier messages."""


def _values_within(node: Any, cap: int) -> bool:
    """Whether `node` (parsed JSON) holds at most `cap` values, itself included; stops counting past `cap`."""
    pending, seen = [node], 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > cap:
            return False
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return True


def _check_values(data: dict[str, Any], skipped: int) -> None:
    """Refuse a body whose part the adapter validates (its last message and the other fields) holds more than
    `MAX_TURN_BODY_VALUES` values: pydantic validates it in one call that holds the GIL, so a 3.9 MB last message of
    150,000 empty text parts held the event loop 5 s even from a worker thread (QA).

    Raises:
        InvalidInputError: too many values, naming the last message when it alone has too many, else the body.
    """
    if _values_within(data, MAX_TURN_BODY_VALUES):
        return
    messages = data.get('messages')
    last = messages[-1] if isinstance(messages, list) and messages else None
    where = f'messages.{skipped}' if last is not None and not _values_within(last, MAX_TURN_BODY_VALUES) else 'body'
    raise InvalidInputError(
        f'{where}: more than {MAX_TURN_BODY_VALUES:,} JSON values (objects, arrays, strings, numbers) in what a turn '
        'reads of its body (the last message and the other fields); send fewer parts',
        field=where,
    )


def _last_message_only(body: bytes, defaults: dict[str, str]) -> _ReadBody:
    """The body with its `messages` cut to the last one and the `defaults` of fields it lacks, and how many messages
    were left out (0: the body as it came).

    A body that is not a JSON object with a list of several messages is passed on as it is, for the adapter's own
    validation to name what is wrong with it.

    Raises:
        InvalidInputError: a key twice in an object of the body; too many values in what the turn reads of it.
    """
    try:
        # UTF-8 only, as the adapters read it (json.loads(bytes) takes UTF-16 too); a key twice in an object refused
        data = loads_with_unique_keys(body.decode())
    except InvalidInputError:
        raise
    except (ValueError, RecursionError):  # not UTF-8, not JSON (ValueErrors both), or nested past the parser
        return _ReadBody(body, 0)
    if not isinstance(data, dict):
        return _ReadBody(body, 0, data)
    missing = {name: value for name, value in defaults.items() if name not in data}
    messages = data.get('messages')
    skipped = len(messages) - 1 if isinstance(messages, list) and len(messages) >= 2 else 0
    if isinstance(messages, list) and skipped:
        data['messages'] = messages[-1:]
    _check_values(data, skipped)
    if not missing and not skipped:
        return _ReadBody(body, 0, data)
    data = {**missing, **data}
    return _ReadBody(json.dumps(data).encode(), skipped, data)
