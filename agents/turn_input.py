"""Checking a chat turn's input at the boundary, before any database work, model request or billing.

The rules (README, "Input is checked first", in "Conversations that last"): a session id is 1-200 characters of
letters, digits and `. _ : @ -`, starting with a letter or digit (it goes into 200-character columns and into URLs);
an account or agent slug is 1-64 characters of letters, digits and `. _ -`, starting with a letter or digit.
Identifiers are refused, never altered: changing one would address another conversation or tenant. The message is
text of at most `AGENTRT_MESSAGE_MAX_CHARS` characters, not blank; a NUL or a lone surrogate in it (which PostgreSQL
cannot store) is replaced by U+FFFD, as the store does with a model's or a tool's text, so the model sees what is
saved.
"""

from __future__ import annotations

import inspect
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic_ai import Agent, TemplateStr
from pydantic_ai.messages import InstructionPart
from pydantic_ai.models import Model
from pydantic_ai.toolsets import AbstractToolset
from pydantic_ai.usage import UsageLimits

from agentrt.db.errors import InvalidInputError, check_seconds
from agentrt.db.settings import Settings
from agentrt.services.pg_text import describe_char, preview, storable_text
from agentrt.tools.dependencies import SessionDependencies

SESSION_ID_MAX_CHARS = 200
"""`conversations.conversation_id` and `llm_requests.chat_session_id` are `varchar(200)`."""
SLUG_MAX_CHARS = 64
"""`accounts.slug` and `agent_instances.slug` are `varchar(64)`."""
MAX_STREAM_DELAY_S = 2.0
"""`stream_delay`, the demo model's pause between words, at most (`agentrt chat --delay` alike)."""

SESSION_ID = re.compile(r'[A-Za-z0-9][A-Za-z0-9._:@-]*')
"""A conversation (session) id, matched whole: the rule the store, the CLI, the API's OpenAPI and the web UI share."""
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
    account_id: int | None = None
    """The id the account must have, when the caller knows it (an HTTP turn: the account of its API key, which a
    server trusts for a while after checking it). A slug names an account only until it is deleted and another one
    takes the slug: the turn is then refused (`UnknownTenantError`), not run as the new account's."""


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
    checked_session = _identifier(session_id, 'session_id', 'session id', SESSION_ID, SESSION_ID_MAX_CHARS)
    checked_account = _identifier(account, 'account', 'account slug', _SLUG, SLUG_MAX_CHARS)
    if agent_instance is None:
        return checked_session, checked_account, None
    checked_agent = _identifier(agent_instance, 'agent_instance', 'agent slug', _SLUG, SLUG_MAX_CHARS)
    return checked_session, checked_account, checked_agent


def validate_protocol_id(value: object, *, field: str, name: str) -> str:
    """Check an id a chat protocol carries besides the conversation's (AG-UI's `runId`) by the session id's rule.

    Such an id is echoed back in the stream (AG-UI's `RUN_STARTED` and `RUN_FINISHED`): unchecked, it came back at any
    length the body allowed, control characters included.

    Args:
        value: the id as the request carries it.
        field: the request's name for it, for the error (`runId`).
        name: what it is, for the message (`run id`).

    Raises:
        InvalidInputError: naming `field`: not text, empty, longer than 200 characters, or with a character other
            than letters, digits and `. _ : @ -` (or not starting with a letter or digit).
    """
    return _identifier(value, field, name, SESSION_ID, SESSION_ID_MAX_CHARS)


def validate_message(message: object, *, max_chars: int) -> str:
    """Check a chat message and return it with NUL and lone surrogates replaced by U+FFFD.

    Raises:
        InvalidInputError: the message is not text, is longer than `max_chars` characters, or is blank.
    """
    if not isinstance(message, str):
        raise InvalidInputError(f'the chat message must be text, not {type(message).__name__}', field='message')
    if len(message) > max_chars:
        raise message_too_long(len(message), max_chars=max_chars)
    if not message.strip():
        raise InvalidInputError('the chat message is empty', field='message')
    if not any(map(_shows, message)):
        # Only zero-width or direction marks, controls, NULs or lone surrogates (each saved as U+FFFD): no question a
        # model could read, yet a whole turn, billed by a real provider (QA). The first character that shows ends the
        # walk: a message's first, as a rule.
        raise InvalidInputError(
            'the chat message has no visible character (only spaces, controls, zero-width or direction marks, NUL, '
            'U+FFFD or lone surrogates)',
            field='message',
        )
    return storable_text(message)


def _shows(char: str) -> bool:
    """Whether `char` shows as a mark on the page: not white space, a control, a format character (zero-width and
    direction marks, tags), a lone surrogate, nor another character that renders as nothing."""
    return char not in _BLANK_SHAPES and unicodedata.category(char) not in _INVISIBLE_CATEGORIES


_INVISIBLE_CATEGORIES = frozenset(('Cc', 'Cf', 'Cs', 'Zs', 'Zl', 'Zp'))
"""Controls (NUL, ESC, DEL, C1), format characters (U+200B, U+202E, U+FEFF, tags), surrogates, separators."""
_BLANK_SHAPES = frozenset(
    map(
        chr,
        (
            0xFFFD,  # what a NUL or a lone surrogate is saved as
            0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0,  # grapheme joiner, fillers, braille blank
            *range(0x180B, 0x1810),  # Mongolian variation selectors and vowel separator
            *range(0xFE00, 0xFE10),  # variation selectors
            *range(0xE0100, 0xE01F0),  # variation selectors supplement
        ),
    )
)  # fmt: skip
"""Characters of other categories that render as nothing (Unicode's Default_Ignorable, the blank ones)."""


def message_too_long(length: int, *, max_chars: int) -> InvalidInputError:
    """The error for a chat message of `length` characters, over `max_chars` (also the line editor's, which stops
    taking in a line at the limit)."""
    return InvalidInputError(
        f'the chat message is {length:,} characters long; the limit is {max_chars:,} (AGENTRT_MESSAGE_MAX_CHARS)',
        field='message',
    )


def validate_run_arguments(
    *,
    model: object,
    usage_limits: object,
    toolsets: object,
    instructions: object,
    agent: object,
    on_tool_event: object = None,
    stream_delay: object = 0.0,
) -> None:
    """Check the types of `simple_chat`'s and `simple_chat_stream`'s other arguments, before anything runs.

    A wrong type would otherwise fail deep inside the run (an `AttributeError` of pydantic-ai's), after the turn
    claimed its conversation; a NaN or infinite `stream_delay` would make the demo model's stream wait for ever.

    Raises:
        InvalidInputError: naming the first argument of the wrong type or value.
    """
    validate_agent_arguments(model=model, toolsets=toolsets, instructions=instructions)
    if usage_limits is not None and not isinstance(usage_limits, UsageLimits):
        raise InvalidInputError.wrong_type('usage_limits', 'a pydantic-ai UsageLimits or None', usage_limits)
    if agent is not None and not isinstance(agent, Agent):
        raise InvalidInputError.wrong_type('agent', 'a pydantic-ai Agent (create_simple_chat_agent()) or None', agent)
    if agent is not None and not _takes_session_dependencies(agent.deps_type):
        raise InvalidInputError(
            f"the agent's deps_type is {agent.deps_type.__name__}, but a turn runs it with SessionDependencies "
            '(agentrt.tools.dependencies), so its tools would not get theirs: build it with '
            'deps_type=SessionDependencies (or a class of which SessionDependencies is one)',
            field='agent',
        )
    if agent is not None and agent.output_type is not str:
        # A turn stores, prints and returns the answer as text (`ChatResult.output`, the session title, the HTTP
        # turn): a structured output would reach them as a model object, after the turn ran and was billed.
        raise InvalidInputError(
            f"the agent's output_type is {_type_name(agent.output_type)}, but a turn answers in text: build it "
            'with output_type=str (the default); structured output is not supported',
            field='agent',
        )
    if on_tool_event is not None and not callable(on_tool_event):
        raise InvalidInputError.wrong_type('on_tool_event', 'a function or None', on_tool_event)
    call = type(on_tool_event).__call__ if on_tool_event is not None else None  # an object's own async __call__ too
    if inspect.iscoroutinefunction(on_tool_event) or inspect.iscoroutinefunction(call):
        # Called as a plain function: its coroutine was never awaited, the callback never ran, with only Python's
        # RuntimeWarning to say so (QA).
        raise InvalidInputError(
            'on_tool_event must be a plain function, not an async one (it is called as each tool call starts and '
            'ends, and is not awaited); to do async work, hand the event to a task or a queue from it',
            field='on_tool_event',
        )
    check_seconds(stream_delay, 'stream_delay')
    if stream_delay > MAX_STREAM_DELAY_S:  # type: ignore[operator]  # a number: checked above
        # A pause between the demo model's words: 1e308 passed as finite and the stream waited for ever (QA).
        raise InvalidInputError(
            f"stream_delay is a pause between the demo model's words, at most {MAX_STREAM_DELAY_S:g} s, "
            f'not {stream_delay!r}',
            field='stream_delay',
        )


def validate_agent_arguments(*, model: object, toolsets: object, instructions: object) -> None:
    """Check the types of the arguments `create_simple_chat_agent` shares with a turn: `model`, `toolsets` (None:
    none) and `instructions` (None: none), naming the first item of a sequence that is wrong.

    Raises:
        InvalidInputError: naming the argument (or its item, `toolsets[1]`) of the wrong type.
    """
    if model is not None and not isinstance(model, str | Model):
        raise InvalidInputError.wrong_type('model', 'a model name, a pydantic-ai Model or None', model)
    if toolsets is not None:
        # A sequence, as pydantic-ai's own `toolsets=` takes: one toolset alone is refused, and the message says so.
        expected = 'a sequence of pydantic-ai toolsets, or None'
        _check_items(toolsets, 'toolsets', 'a pydantic-ai toolset', expected, _is_toolset)
    if instructions is not None and not _instruction(instructions):
        instruction = 'text or a function of the run context'
        _check_items(
            instructions, 'instructions', instruction, f'{instruction}, a sequence of them, or None', _instruction
        )


def _is_toolset(item: object) -> bool:
    return isinstance(item, AbstractToolset)


def _check_items(value: object, field: str, item: str, expected: str, check: Callable[[object], bool]) -> None:
    """Refuse `value` unless it is a sequence (not text) whose every item passes `check`, naming the first that
    does not (`toolsets[1] must be a pydantic-ai toolset, not str`): `not list` said nothing of what was wrong.
    `expected` says what the argument may be, for a value that is no sequence."""
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise InvalidInputError.wrong_type(field, expected, value)
    for index, element in enumerate(value):
        if not check(element):
            raise InvalidInputError(
                f'{field}[{index}] must be {item}, not {type(element).__name__}', field=f'{field}.{index}'
            )


def _takes_session_dependencies(deps_type: object) -> bool:
    """Whether a turn's `SessionDependencies` is a `deps_type` (its class, a base or protocol of it, `object`, or no
    deps at all: tools that never read them); a generic alias or other form cannot be checked, and is let through."""
    if deps_type is type(None) or not isinstance(deps_type, type):
        return True
    try:
        return issubclass(SessionDependencies, deps_type)
    except TypeError:  # a protocol with data members (`RunIdentity`) cannot be checked by issubclass
        return True


def _type_name(value: object) -> str:
    """A class's name, or the text of another output spec (a list, a `ToolOutput`...)."""
    return value.__name__ if isinstance(value, type) else repr(value)


def _instruction(value: object) -> bool:
    """What pydantic-ai takes as one instruction (`AgentInstruction`)."""
    return isinstance(value, str | TemplateStr | InstructionPart) or callable(value)


def _identifier(value: object, field: str, name: str, pattern: re.Pattern[str], max_chars: int) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f'the {name} must be text, not {type(value).__name__}', field=field)
    if not value:
        raise InvalidInputError(f'the {name} is empty', field=field)
    if len(value) > max_chars:
        raise InvalidInputError(f'the {name} is {len(value):,} characters long; the limit is {max_chars}', field=field)
    if pattern.fullmatch(value) is None:
        position, char = _first_bad(value, pattern)
        allowed = _SESSION_ID_CHARS if pattern is SESSION_ID else _SLUG_CHARS
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
