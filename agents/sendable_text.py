"""`SendableText`: what a turn sends to its model holds no NUL and no lone surrogate, as the store saves it.

A tool's result, the caller's `instructions=`, a retry prompt quoting a model's arguments, or a model's own answer
resent in the next request (its text, a tool call's arguments, name or id) can hold a lone surrogate (`"\\ud800"` in
JSON, half of a UTF-16 pair) or a NUL (binary data read as text). UTF-8 cannot encode the first, so the request failed
as it was built, with a raw `UnicodeEncodeError` or pydantic's serialization error (QA); the second reached the model
as it was while the store saved U+FFFD. Both are replaced with U+FFFD (`agentrt.services.pg_text.storable`) before
each model request: the model sees what is saved. A retry's rejected input is cut short on the way
(`agentrt.agents.retry_inputs`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

from pydantic import TypeAdapter
from pydantic_ai import RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models import ModelRequestContext
from pydantic_core import to_jsonable_python

from agentrt.agents.retry_inputs import shorten_retry
from agentrt.services.ledger import is_as_loaded
from agentrt.services.pg_text import is_storable, is_storable_value, storable, storable_text

_ANY = TypeAdapter[Any](Any)


@dataclass
class SendableText(AbstractCapability[Any]):
    """Replace NUL and lone surrogates with U+FFFD in what each model request sends (a turn's first capability).

    The messages are mended in place, in the run's history (so the turn saves what was sent), each once: a run's
    history only grows, and the capability remembers how many messages it has checked. Messages the turn loaded from
    the store as they are (`is_as_loaded`) are not read: they hold neither. Text in strings, lists and
    dicts is mended, and a tool's result that is (or holds) a pydantic model, a dataclass or a set is replaced by its
    JSON data (what pydantic-ai would send) when that needs mending. A tool's result that pydantic-ai cannot send at
    all is a `TypeError` naming the tool.
    """

    _checked: int = 0
    """How many of the run's messages were checked (and mended) by an earlier request of the run."""

    async def for_run(self, ctx: RunContext[Any]) -> SendableText:
        """A copy per run: its own count of checked messages."""
        return replace(self, _checked=0)

    async def before_model_request(
        self, ctx: RunContext[Any], request_context: ModelRequestContext
    ) -> ModelRequestContext:
        """Mend the messages added since the last request, and the request's instructions."""
        messages = request_context.messages
        start = self._checked if self._checked <= len(messages) else 0  # a history that shrank: check it all
        for message in messages[start:]:
            # The history a turn loaded came out of JSONB (no NUL, no lone surrogate): read once more on every turn
            # of a long conversation, it was the capability's main cost (a few ms a turn at a full window).
            if not is_as_loaded(message):
                _mend_message(message)
        self._checked = len(messages)
        parameters = request_context.model_request_parameters
        parts = getattr(parameters, 'instruction_parts', None)
        if parts and not all(is_storable_value(part.content) for part in parts):
            mended = [replace(part, content=storable_text(part.content)) for part in parts]
            request_context.model_request_parameters = replace(parameters, instruction_parts=mended)
        return request_context


def _mend_message(message: ModelMessage) -> None:
    instructions = getattr(message, 'instructions', None)
    if isinstance(instructions, str) and not is_storable_value(instructions):
        message.instructions = storable_text(instructions)  # type: ignore[union-attr]  # a request's
    for part in message.parts:
        shorten_retry(part)  # first: a rejected megabyte is cut, not scanned
        for name in ('tool_name', 'tool_call_id'):  # a model's own names for a call, resent with its result
            text = getattr(part, name, None)
            if isinstance(text, str) and not is_storable(text):
                setattr(part, name, storable_text(text))
        for name in ('content', 'args'):  # a part's text or result; a tool call's arguments
            value = getattr(part, name, None)
            if value is None:
                continue
            try:
                objects, clean = _scan(value)
            except _Deep:
                if getattr(part, 'part_kind', None) == 'tool-return':
                    # pydantic serialises 255 levels at most: "Maximum serialization depth exceeded" came raw from
                    # wherever the result was first measured or sent (an internal error; QA); named here instead.
                    _check_serialisable(part)
                objects, clean = False, False
            except RecursionError:  # nested past Python's recursion (a model's hostile arguments): copied mended
                objects, clean = False, False
            if objects and getattr(part, 'part_kind', None) == 'tool-return':
                # A pydantic model, a dataclass, a set or another object of the tool's: as the JSON pydantic-ai would
                # send, to be read (pydantic-ai's serialisation failed on a lone surrogate in it, and sent a NUL as
                # it was).
                value, mended = _as_json_data(value)
                if value is None:
                    _check_serialisable(part)
                    continue
                if clean and not mended and is_storable_value(value):
                    continue
                clean = False
            if not clean:
                setattr(part, name, storable(value))


class _Deep(Exception):
    """A value nested deeper than `DEEP` levels."""


DEEP = 200
"""Nesting past which a tool's result is checked for what pydantic can serialise (255 levels)."""


def _scan(value: Any, depth: int = 0) -> tuple[bool, bool]:
    """In one walk of `value`: whether it holds an object other than JSON data (a pydantic model, a dataclass, a set,
    bytes, a datetime; pydantic-ai's own content, a file or an image, is sent as it is), and whether its text holds no
    NUL and no lone surrogate (as `is_storable_value` says). Raises `_Deep` past `DEEP` levels."""
    if isinstance(value, str):
        return False, is_storable(value)
    if isinstance(value, bytes | bytearray):
        # Sent as base64 (pydantic-ai's serialisation of a tool's result), and saved so: the store's dump read bytes
        # as UTF-8, and the turn's save failed on bytes that are not (`b'\xff'`) with pydantic's bare error.
        return True, False
    if isinstance(value, int | float | bool):
        return False, True
    if isinstance(value, dict | list | tuple):
        if depth > DEEP:
            raise _Deep
        objects, clean = False, True
        for item in itertools.chain(value.keys(), value.values()) if isinstance(value, dict) else value:
            item_objects, item_clean = _scan(item, depth + 1)
            objects, clean = objects or item_objects, clean and item_clean
            if objects and not clean:
                break
        return objects, clean
    if value is None or type(value).__module__.startswith('pydantic_ai'):
        return False, True
    return True, True  # a pydantic model, a dataclass, a set, bytes, a datetime...: pydantic serialises it


def _as_json_data(value: Any) -> tuple[Any, bool]:
    """`value` as JSON data (dicts, lists, strings, numbers), as pydantic serialises it, and whether its keys had to be
    mended for that; None when it cannot be."""
    try:
        return to_jsonable_python(value, bytes_mode='base64'), False  # bytes as pydantic-ai sends them
    except UnicodeEncodeError:
        # A lone surrogate in a dict's key, anywhere (a model's dict field too): pydantic's JSON keys must encode, its
        # values need not. Dumped as Python objects first (keys as they are), mended, then made JSON data (QA).
        try:
            return to_jsonable_python(storable(_ANY.dump_python(value, mode='python')), bytes_mode='base64'), True
        except Exception:
            return None, False
    except Exception:  # pydantic-ai's own serialisation has the last word (`_check_serialisable`)
        return None, False


def _check_serialisable(part: Any) -> None:
    """Raise a `TypeError` naming the tool when pydantic-ai cannot serialise its result for the model either.

    An object pydantic does not know (an exception, a socket, a class of the tool's own with no pydantic schema)
    failed the turn with pydantic's bare `PydanticSerializationError`, from wherever the result was first measured or
    sent, naming neither the tool nor what to return instead (QA).
    """
    try:
        part.model_response_str()
    except Exception as exc:
        if 'depth exceeded' in str(exc):  # "return text, numbers, lists, ..." said nothing to a list's tool (QA)
            advice = f'it is nested deeper than the 255 levels pydantic serialises ({exc}); flatten it'
        else:
            advice = f'{exc}; return text, numbers, lists, dicts, pydantic models or dataclasses'
        raise TypeError(
            f'tool {part.tool_name!r} returned a value of type {type(part.content).__name__} that cannot be sent to '
            f'the model as JSON: {advice}'
        ) from exc
