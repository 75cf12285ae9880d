"""`SendableText`: what a turn sends to its model holds no NUL and no lone surrogate, as the store saves it.

A tool's result, the caller's `instructions=`, a retry prompt quoting a model's arguments, or a model's own answer
resent in the next request can hold a lone surrogate (`"\\ud800"` in JSON, half of a UTF-16 pair) or a NUL (binary
data read as text). UTF-8 cannot encode the first, so the request failed as it was built, with a raw
`UnicodeEncodeError` or pydantic's serialization error (QA); the second reached the model as it was while the store
saved U+FFFD. Both are replaced with U+FFFD (`agentrt.services.pg_text.storable`) before each model request: the
model sees what is saved.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel
from pydantic_ai import RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models import ModelRequestContext
from pydantic_core import to_jsonable_python

from agentrt.services.pg_text import is_storable, is_storable_value, storable, storable_text


@dataclass
class SendableText(AbstractCapability[Any]):
    """Replace NUL and lone surrogates with U+FFFD in what each model request sends (a turn's first capability).

    The messages are mended in place, in the run's history (so the turn saves what was sent), each once: a run's
    history only grows, and the capability remembers how many messages it has checked. Text in strings, lists and
    dicts is mended, and a tool's result that is (or holds) a pydantic model, a dataclass or a set is replaced by its
    JSON data (what pydantic-ai would send) when that needs mending.
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
        for name in ('content', 'args'):  # a part's text or result; a tool call's arguments
            value = getattr(part, name, None)
            if value is None:
                continue
            objects, clean = _scan(value)
            if objects and getattr(part, 'part_kind', None) == 'tool-return':
                # A pydantic model, a dataclass or a set of the tool's: as the JSON pydantic-ai would send, to be read
                # (pydantic-ai's serialisation failed on a lone surrogate in it, and sent a NUL as it was).
                value = _as_json_data(value)
                if value is None or is_storable_value(value):
                    continue
                clean = False
            if not clean:
                setattr(part, name, storable(value))


def _scan(value: Any) -> tuple[bool, bool]:
    """In one walk of `value`: whether it holds a pydantic model, a dataclass or a set (pydantic-ai's own content, a
    file or an image, is sent as it is), and whether its text holds no NUL and no lone surrogate (as
    `is_storable_value` says)."""
    if isinstance(value, str):
        return False, is_storable(value)
    if isinstance(value, int | float | bool):
        return False, True
    if isinstance(value, dict | list | tuple):
        objects, clean = False, True
        for item in itertools.chain(value.keys(), value.values()) if isinstance(value, dict) else value:
            item_objects, item_clean = _scan(item)
            objects, clean = objects or item_objects, clean and item_clean
            if objects and not clean:
                break
        return objects, clean
    if type(value).__module__.startswith('pydantic_ai'):
        return False, True
    return isinstance(value, BaseModel | set | frozenset) or dataclasses.is_dataclass(value), True


def _as_json_data(value: Any) -> Any:
    """`value` as JSON data (dicts, lists, strings, numbers), as pydantic serialises it; None when it cannot be."""
    try:
        return to_jsonable_python(value)
    except Exception:  # pydantic-ai's own serialisation says why, as it did before
        return None
