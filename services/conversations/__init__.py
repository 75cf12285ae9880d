"""Conversations in PostgreSQL: pydantic-ai's `ConversationStore` backend, turns, titles and summaries.

`PostgresConversationStore` holds one account's conversations; `load_conversation` / `save_turn` wrap a chat turn
(a race between two turns raises `ConcurrentTurnError`); `list_conversations` pages through an account's list;
`refresh_title_and_summary` is the post-turn task that keeps a title and a short summary on the conversation row.
The modules with a leading underscore are internals.
"""

from agentrt.services.conversations._listing import MAX_CONVERSATIONS_PAGE, ConversationSummary, list_conversations
from agentrt.services.conversations._store import PostgresConversationStore
from agentrt.services.conversations._titles import (
    SUMMARY_MAX_CHARS,
    TITLE_MAX_CHARS,
    Exchange,
    exchanges,
    first_exchange,
    make_summary,
    make_title,
    refresh_title_and_summary,
)
from agentrt.services.conversations._turns import ConcurrentTurnError, load_conversation, save_turn

__all__ = [
    'MAX_CONVERSATIONS_PAGE',
    'SUMMARY_MAX_CHARS',
    'TITLE_MAX_CHARS',
    'ConcurrentTurnError',
    'ConversationSummary',
    'Exchange',
    'PostgresConversationStore',
    'exchanges',
    'first_exchange',
    'list_conversations',
    'load_conversation',
    'make_summary',
    'make_title',
    'refresh_title_and_summary',
    'save_turn',
]
