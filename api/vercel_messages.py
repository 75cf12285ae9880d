"""A page of a conversation's messages as AI SDK UI messages, each with an id that names its stored message.

pydantic-ai's `VercelAIAdapter.dump_messages` ids a message by its run and its index in the list it was given
(`<run_id>-<index>`). Given a page, that index counts from the page's first message, so the same message had
another id on every page that held it (the latest 600 messages, read again after one more turn: every id changed),
and two pages that each held part of one long turn gave two of its messages the same id (`<run_id>-0` on both). A
client that merges pages, or a read before and after a turn, by id (the AI SDK keys its messages by id) showed
messages twice or replaced one with another. The stored entry's id is the message's own: the same on every page,
in every read, and never another message's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse
from pydantic_ai.ui.vercel_ai import VercelAIAdapter

from agentrt.services.conversations import MessagePage

PIECE_MESSAGES = 64
"""Messages dumped together (`vercel_messages`): few enough that their UI messages are small beside the page."""

MessageIdFunction = Callable[[ModelRequest | ModelResponse, Literal['system', 'user', 'assistant'], int], str]


def entry_message_ids(page: MessagePage) -> MessageIdFunction:
    """A `generate_message_id` for `dump_messages(page.messages)`: the entry id of the message a UI message comes
    from; a request dumped as several UI messages (its system-voice and user parts apart) adds `-1`, `-2`... to the
    second and later ones."""
    entries = {id(message): entry for message, entry in zip(page.messages, page.entry_ids, strict=True)}
    dumped: dict[str, int] = {}

    def message_id(message: ModelRequest | ModelResponse, role: str, index: int) -> str:
        entry = entries[id(message)]
        count = dumped.get(entry, 0)
        dumped[entry] = count + 1
        return entry if count == 0 else f'{entry}-{count}'

    return message_id


def vercel_messages(page: MessagePage) -> Iterator[dict[str, Any]]:
    """The page's messages as AI SDK UI messages (JSON values), each id its stored entry's (module docstring).

    Made a piece of about `PIECE_MESSAGES` messages at a time (`independent_pieces`), and each one as it is read: a
    caller that encodes each before the next never holds the UI messages of a whole conversation (in a worker thread,
    the garbage collector's full collections of them held the event loop too).
    """
    message_id = entry_message_ids(page)
    for piece in independent_pieces(page.messages, PIECE_MESSAGES):
        for message in VercelAIAdapter.dump_messages(page.messages[piece], generate_message_id=message_id):
            yield message.model_dump(mode='json', by_alias=True, exclude_none=True)


def independent_pieces(messages: Sequence[ModelMessage], size: int) -> Iterator[slice]:
    """Consecutive slices of `messages`, each of at least `size` messages (but the last), that share no tool call id.

    `dump_messages` gives each tool call the result of its id found in the list it was given (the last one), and
    depends on nothing else beyond the message: a piece that holds every message naming its tool call ids is dumped
    alone as it is within the whole list.
    """
    last: dict[str, int] = {}
    for n, message in enumerate(messages):
        for call_id in _call_ids(message):
            last[call_id] = n
    start, reach = 0, 0
    for n, message in enumerate(messages):
        for call_id in _call_ids(message):
            reach = max(reach, last[call_id])
        if n + 1 - start >= size and reach <= n:
            yield slice(start, n + 1)
            start = n + 1
    if start < len(messages):
        yield slice(start, len(messages))


def _call_ids(message: ModelMessage) -> Iterator[str]:
    for part in message.parts:
        call_id = getattr(part, 'tool_call_id', None)  # calls, results, retries, built-in tools' calls and results
        if isinstance(call_id, str):
            yield call_id
