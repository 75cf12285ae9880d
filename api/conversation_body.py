"""The JSON body of `GET /api/v1/conversations/{id}`, made in a worker thread a message at a time.

A whole conversation of several hundred turns is megabytes: dumped on the event loop, and encoded there by FastAPI
in one call, it held every other request of the process for up to a second. `messages_body` makes the same bytes
FastAPI made from the `ConversationMessages` the route returned, but each message is dumped (and encoded) by a call
of its own, so the worker thread running it gives the GIL back to the loop between two messages.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import TypeAdapter

from agentrt.api.schemas import ConversationMessages
from agentrt.api.vercel_messages import iter_vercel_messages
from agentrt.services.conversations import MessagePage
from agentrt.services.message_json import message_adapter

_body_adapter: TypeAdapter[ConversationMessages] = TypeAdapter(ConversationMessages)
_value_adapter: TypeAdapter[Any] = TypeAdapter(Any)
_MESSAGES = b'"messages":[]'


def messages_body(
    page: MessagePage,
    *,
    conversation_id: str,
    format: Literal['vercel', 'pydantic'],
    earlier_cursor: str | None,
) -> bytes:
    """The response body for `page`: byte for byte what FastAPI encodes for the `ConversationMessages` of it.

    Args:
        page: the messages read.
        conversation_id: the conversation.
        format: `vercel` (AI SDK UI messages, each id its stored entry's) or `pydantic` (pydantic-ai's messages).
        earlier_cursor: the position of the page before (`encode_message_cursor`), None when there is none.
    """
    if format == 'vercel':
        items = [_value_adapter.dump_json(message) for message in iter_vercel_messages(page)]
    else:
        items = [message_adapter.dump_json(m) for m in page.messages]
    envelope = ConversationMessages(
        conversation_id=conversation_id,
        revision=page.revision,
        title=page.title,
        format=format,
        messages=[],
        earlier=page.earlier is not None,
        earlier_cursor=earlier_cursor,
    )
    # FastAPI's encoding (`serialize_json`: the response model's `dump_json`, by alias) with no messages; the list
    # goes where its `[]` is. Only the strings before it could hold those bytes, and a string's quotes are escaped.
    head, found, tail = _body_adapter.dump_json(envelope, by_alias=True).partition(_MESSAGES)
    assert found, 'ConversationMessages is encoded with its messages'
    return b''.join((head, b'"messages":[', b','.join(items), b']', tail))
