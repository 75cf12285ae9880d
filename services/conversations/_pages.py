"""A conversation read a page at a time, newest page first: the latest messages, then the ones before a position.

A position is an entry id (the first message of the page shown last): entries are never renumbered, so a
conversation that goes on while someone pages back through it keeps every position, and each page reads only its own
messages (a walk from the position back), whatever the conversation's length.

A page starts where a turn starts (the user's message) when one is in reach, so that a model's tool calls and their
results stay on one page; a turn longer than a page is cut before one of the model's responses instead (each tool
result is on the page of the response that called it), never before a request holding tool results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, UserPromptPart

from agentrt.db.errors import InvalidInputError
from agentrt.services.conversations._arguments import MAX_LIMIT, check_conversation_id, check_entry_id, check_limit
from agentrt.services.conversations._off_loop import off_loop
from agentrt.services.conversations._primitives import read_on_driver
from agentrt.services.conversations._statements import BEFORE_ON_DRIVER
from agentrt.services.conversations._store import PostgresConversationStore
from agentrt.services.conversations._stored import StoredTail, stored_tail


@dataclass(frozen=True)
class MessagePage:
    """One page of a conversation's messages (`load_page`)."""

    revision: str | None
    """The conversation's stored revision when the page was read."""
    messages: list[ModelMessage]
    """Oldest first."""
    entry_ids: list[str]
    """The entry of each of `messages`."""
    earlier: str | None
    """The position to pass as `before` for the page before this one; None when this page starts the conversation."""
    title: str | None = None
    """The conversation's stored title (None until one is made)."""


class UnknownPositionError(LookupError):
    """`before` is not a message of the conversation's history: not an entry of the account (its conversation was
    deleted, or it never was one), another conversation's, or one its history no longer holds (a `branch()`)."""


async def load_page(
    store: PostgresConversationStore, conversation_id: str, *, limit: int | None, before: str | None = None
) -> MessagePage | None:
    """The latest messages of a conversation, or those before the entry `before`: at most `limit` (all without).

    A page reaching into a turn starts at that turn's next user message; see the module's docstring for a turn longer
    than `limit` (its page may then hold `limit + 1` messages, so that a tool result is never split from its call).
    The messages are validated in a worker thread (`_off_loop`): a whole conversation can be megabytes.

    Args:
        store: the account's conversation store.
        conversation_id: the conversation.
        limit: at most this many messages (a whole number from 1); None: all of them.
        before: an entry id a previous page gave (`MessagePage.earlier`): the messages before it. None: the latest.

    Returns:
        None when the account has no such conversation.

    Raises:
        UnknownPositionError: `before` is not a message of the conversation's history.
        InvalidInputError: `conversation_id` or `before` is not an id the store can hold, or `limit` is not a whole
            number from 1 to 2**31 - 2.
    """
    check_conversation_id(conversation_id)
    check_entry_id(before, 'before')
    check_limit(limit)
    if limit is not None and not 0 < limit < MAX_LIMIT:
        raise InvalidInputError(f'the limit must be from 1 to {MAX_LIMIT - 1:,}, not {limit:,}', field='limit')
    read = MAX_LIMIT if limit is None else limit + 1  # one more: what a page cut inside a turn may need
    if before is None:
        tail = await store.read_tail(conversation_id, cap_chars=MAX_LIMIT, max_messages=read, in_thread=True)
    else:
        tail = await _read_before(store, conversation_id, before, read)
    if tail is None:
        return None
    start = page_start(tail.messages, limit, reached_first=tail.reached_first)
    earlier = start > 0 or not tail.reached_first
    return MessagePage(
        revision=tail.record.revision,
        messages=tail.messages[start:],
        entry_ids=tail.entry_ids[start:],
        earlier=tail.entry_ids[start] if earlier and start < len(tail.entry_ids) else None,
        title=tail.title,
    )


def page_start(messages: Sequence[ModelMessage], limit: int | None, *, reached_first: bool) -> int:
    """Where a page of at most `limit` of the last `messages` starts (`messages` read with one more than `limit`).

    The first turn's start in reach; else the first of the model's responses; else (the last `limit` messages hold
    only requests: tool results) the one message before them when it is a response or a turn's start; else the
    window as it is (a history that does not alternate requests and responses).
    """
    if limit is None or (len(messages) <= limit and reached_first):
        return 0
    window = range(max(0, len(messages) - limit), len(messages))
    for n in window:
        if starts_turn(messages[n]):
            return n
    for n in window:
        if isinstance(messages[n], ModelResponse):
            return n
    before = window.start - 1
    if before >= 0 and (isinstance(messages[before], ModelResponse) or starts_turn(messages[before])):
        return before
    return window.start


def starts_turn(message: ModelMessage) -> bool:
    """Whether `message` is a user's message: the start of a turn."""
    return isinstance(message, ModelRequest) and any(isinstance(part, UserPromptPart) for part in message.parts)


async def _read_before(
    store: PostgresConversationStore, conversation_id: str, before: str, max_messages: int
) -> StoredTail | None:
    params = {
        'account_id': store.account_id,
        'conversation_id': conversation_id,
        'before': before,
        'max_messages': max_messages,
    }
    rows = await read_on_driver(store.account_id, BEFORE_ON_DRIVER, params)
    if not rows:
        return None
    if not rows[0][7]:
        raise UnknownPositionError(before)
    return await off_loop(stored_tail, rows, 0)
