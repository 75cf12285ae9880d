"""The JSON text a message is known by, so it is dumped once: the text a chat turn loaded it from
(`remember_message_json`), or the ledger's own dump of it, valid while nothing pydantic-ai changes on the message has
changed (`dumped_message_json`, which the conversation store saves instead of dumping the message again).

Split from `_contents.py` (the run's bodies), which notes and reads these texts.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from pydantic_ai.messages import ModelMessage, ModelRequest

MessageState = tuple[Any, ...]
"""What pydantic-ai may change on a message after its text was dumped (`message_state`): its parts, then fields."""
_known_json: dict[int, tuple[weakref.ref[ModelMessage], int, str, MessageState | None]] = {}
"""Known JSON texts by message identity (messages are unhashable dataclasses); an entry leaves with its message. The
last item is set when the text is exactly `dump_json` of the message as it was then (`dumped_message_json`)."""


def remember_message_json(messages: Iterable[ModelMessage], texts: Iterable[str]) -> None:
    """Note the JSON each of `messages` is known by (their stored text, `TypeAdapter(ModelMessage).dump_json` of
    them), so a run that sends them stores that text instead of dumping them again. Kept while a message lives, and
    used only while it keeps its number of parts; call it from the event loop."""
    for message, text in zip(messages, texts, strict=True):
        remember(message, text, None)


def remember(message: ModelMessage, text: str, state: MessageState | None) -> None:
    key = id(message)
    gone = _forget(key)
    _known_json[key] = (weakref.ref(message, gone), len(message.parts), text, state)


def _forget(key: int) -> Callable[[Any], None]:
    def forget(_: Any) -> None:
        _known_json.pop(key, None)

    return forget


def known_json(message: ModelMessage) -> str | None:
    """The stored text `remember_message_json` noted for a message (not a text the ledger dumped itself: a later run
    that sends the message again dumps it again, as before)."""
    entry = _known_json.get(id(message))
    if entry is None or entry[3] is not None or entry[0]() is not message or entry[1] != len(message.parts):
        return None
    return entry[2]


def is_as_loaded(message: ModelMessage) -> bool:
    """Whether a message is one a chat turn loaded from the store (`remember_message_json`), with its number of parts:
    its text came out of a JSONB column, which holds no NUL and no lone surrogate."""
    return known_json(message) is not None


def message_state(message: ModelMessage) -> MessageState | None:
    """What a message's JSON depends on that pydantic-ai changes after the ledger dumped it: its parts (by identity),
    then its run stamps, timestamp and state (a request's instructions; a response's `model_id`, `workspace_ref`,
    usage, finish reason and provider details, by value where they are mutable). None for a message whose text is not
    shared: one with metadata (a dict pydantic-ai may update in place)."""
    if message.metadata is not None:
        return None
    # Both kinds: the parts first (`dumped_message_json` compares them by identity, the rest by value).
    stamped = (tuple(message.parts), message.timestamp, message.run_id, message.conversation_id, message.state)
    if isinstance(message, ModelRequest):
        return (*stamped, message.instructions)
    usage, details = message.usage, message.provider_details
    return (
        *stamped,
        message.model_id,
        message.workspace_ref,
        message.finish_reason,
        message.provider_response_id,
        message.history_digest,
        None if message.failed_attempts is None else tuple(message.failed_attempts),
        usage,
        _usage_values(usage),
        None if details is None else dict(details),
    )


def _usage_values(usage: Any) -> tuple[Any, ...]:
    """A response's usage by value (`RequestUsage` compares by identity and pydantic-ai fills its cost in place)."""
    return (usage.input_tokens, usage.output_tokens, usage.cost, dict(usage.details))


def dumped_message_json(message: ModelMessage) -> str | None:
    """`TypeAdapter(ModelMessage).dump_json(message)` (decoded), if the ledger dumped this message (a request when it
    was sent, a response once pydantic-ai had stamped it) and nothing of it has changed since: the conversation store
    saves that text instead of dumping it again.

    None when it is not known: a message with metadata, one pydantic-ai changed (parts replaced or added, run stamps,
    instructions, state, usage), one dumped with a fallback for a value pydantic cannot serialise, or one the ledger
    did not dump (lone surrogates, no ledger). Call it from the event loop.
    """
    entry = _known_json.get(id(message))
    if entry is None or (state := entry[3]) is None or entry[0]() is not message:
        return None
    parts = message.parts
    then = state[0]
    if len(parts) != len(then) or not all(part is was for part, was in zip(parts, then, strict=True)):
        return None
    now = message_state(message)
    return entry[2] if now is not None and now[1:] == state[1:] else None
