"""A page of a conversation's messages as AI SDK UI messages, each with an id that names its stored message.

pydantic-ai's `VercelAIAdapter.dump_messages` ids a message by its run and its index in the list it was given
(`<run_id>-<index>`). Given a page, that index counts from the page's first message, so the same message had
another id on every page that held it (the latest 600 messages, read again after one more turn: every id changed),
and two pages that each held part of one long turn gave two of its messages the same id (`<run_id>-0` on both). A
client that merges pages, or a read before and after a turn, by id (the AI SDK keys its messages by id) showed
messages twice or replaced one with another. The stored entry's id is the message's own: the same on every page,
in every read, and never another message's.

An answer that ended before the model was done (its response's `finish_reason` `length`, `content_filter`...) says so
in its UI message's `metadata`, as `finishReason` in the AI SDK's words (those of the stream's `finish` event:
`length`, `content-filter`...): `dump_messages` carries only the timestamp there, and a reader of the stored
conversation (the web UI after a reload) showed a truncated answer as a whole one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse
from pydantic_ai.ui.vercel_ai import VercelAIAdapter

from agentrt.services.conversations import MessagePage, starts_turn

MessageIdFunction = Callable[[ModelRequest | ModelResponse, Literal['system', 'user', 'assistant'], int], str]

FINISH_REASON_KEY = 'finishReason'
"""The key of a UI message's `metadata` that names why its response ended, when not in the normal way."""
_CUT_SHORT: dict[str, str] = {'length': 'length', 'content_filter': 'content-filter', 'error': 'error'}
"""pydantic-ai's finish reasons of an answer the model did not end itself, in the AI SDK's words (its stream's
`finish` event's, pydantic-ai's `_FINISH_REASON_MAP`); `stop` and `tool_call` are a response's normal ends."""


def entry_message_ids(
    page: MessagePage, named: dict[str, ModelRequest | ModelResponse] | None = None
) -> MessageIdFunction:
    """A `generate_message_id` for `dump_messages(page.messages)`: the entry id of the message a UI message comes
    from; a request dumped as several UI messages (its system-voice and user parts apart) adds `-1`, `-2`... to the
    second and later ones. Each id given is noted in `named`, with the message it names."""
    entries = {id(message): entry for message, entry in zip(page.messages, page.entry_ids, strict=True)}
    dumped: dict[str, int] = {}

    def message_id(message: ModelRequest | ModelResponse, role: str, index: int) -> str:
        entry = entries[id(message)]
        count = dumped.get(entry, 0)
        dumped[entry] = count + 1
        given = entry if count == 0 else f'{entry}-{count}'
        if named is not None:
            named[given] = message
        return given

    return message_id


def vercel_messages(page: MessagePage) -> list[dict[str, Any]]:
    """The page's messages as AI SDK UI messages (JSON values), each id its stored entry's (module docstring), each
    turn dumped on its own (`turns`)."""
    return list(iter_vercel_messages(page))


def iter_vercel_messages(page: MessagePage) -> Iterator[dict[str, Any]]:
    """`vercel_messages` one at a time, as they are read: a caller that encodes each before the next never holds
    the UI messages of more than one turn (a whole conversation's, in a worker thread, made the garbage collector's
    full collections there longer, and they hold the event loop too)."""
    named: dict[str, ModelRequest | ModelResponse] = {}
    message_id = entry_message_ids(page, named)
    for turn in turns(page.messages):
        for message in VercelAIAdapter.dump_messages(turn, generate_message_id=message_id):
            dumped = message.model_dump(mode='json', by_alias=True, exclude_none=True)
            source = named.pop(message.id, None)
            if isinstance(source, ModelResponse) and (reason := _CUT_SHORT.get(source.finish_reason or '')):
                # Not over a key of the application's own metadata, which `dump_messages` put there.
                dumped.setdefault('metadata', {}).setdefault(FINISH_REASON_KEY, reason)
            yield dumped


def turns(messages: list[ModelMessage]) -> list[list[ModelMessage]]:
    """`messages` cut before each user's message (`starts_turn`, where the pages of `limit` are cut too).

    `dump_messages` gives a tool call the result with its id anywhere in the list it is given. A tool call id is
    unique within a turn but not across a conversation: the demo model names its calls after the turn's number
    among the prompts it is sent (`t17-search`), which repeats once the context window leaves older turns out, and
    a provider may number its calls per response. Dumped whole, a 60-turn conversation showed an earlier call with
    a later turn's result; dumped a turn at a time, as the pages of `limit` already were, each call has its own.
    """
    cut: list[list[ModelMessage]] = []
    for message in messages:
        if not cut or starts_turn(message):
            cut.append([])
        cut[-1].append(message)
    return cut
