"""Conversations in PostgreSQL: pydantic-ai's `ConversationStore` backend, turns, titles and summaries.

`PostgresConversationStore` holds one account's conversations; `load_recent_conversation` (or `load_conversation`
for the whole history) / `append_turn` (or `save_turn`) wrap a chat turn, inside a `TurnClaim` (one turn at a time
per conversation; a race between two turns raises `ConcurrentTurnError`);
`fit_history` is the history processor that bounds what a request sends; `refresh_title_and_summary` is the
post-turn task that keeps a title and a short summary on the conversation row (`summary_due` says when a turn
should run it, `summary_source` hands it the text); `list_conversations` pages through
an account's conversations; `load_page` reads one's messages a page at a time, newest first (`off_loop` runs a
large read's CPU work in a worker thread). The modules with a
leading underscore are internals.
"""

from agentrt.services.conversations._claims import CANCELLED_TAKE_WAIT_S, TurnClaim, claims_released, conversation_claim
from agentrt.services.conversations._context import (
    FitMemo,
    RecentConversation,
    SinceSummary,
    estimate_tokens,
    fit_history,
    load_recent_conversation,
    summary_due,
)
from agentrt.services.conversations._listing import (
    MAX_CONVERSATIONS_PAGE,
    ConversationOrder,
    ConversationSummary,
    list_conversations,
)
from agentrt.services.conversations._off_loop import off_loop, off_loop_taking
from agentrt.services.conversations._pages import MessagePage, UnknownPositionError, load_page, starts_turn
from agentrt.services.conversations._store import PostgresConversationStore
from agentrt.services.conversations._stored import StoredTail
from agentrt.services.conversations._titles import (
    SUMMARY_MAX_CHARS,
    TITLE_MAX_CHARS,
    Exchange,
    RawExchange,
    SummarySource,
    exchanges,
    first_exchange,
    make_summary,
    make_title,
    message_exchanges,
    refresh_title_and_summary,
    summary_source,
)
from agentrt.services.conversations._turns import (
    ConcurrentTurnError,
    SavedTurn,
    TurnStage,
    append_turn,
    load_conversation,
    save_turn,
)

__all__ = [
    'CANCELLED_TAKE_WAIT_S',
    'MAX_CONVERSATIONS_PAGE',
    'SUMMARY_MAX_CHARS',
    'TITLE_MAX_CHARS',
    'ConcurrentTurnError',
    'ConversationOrder',
    'ConversationSummary',
    'Exchange',
    'FitMemo',
    'MessagePage',
    'PostgresConversationStore',
    'RawExchange',
    'RecentConversation',
    'SavedTurn',
    'SinceSummary',
    'StoredTail',
    'SummarySource',
    'TurnClaim',
    'TurnStage',
    'UnknownPositionError',
    'append_turn',
    'claims_released',
    'conversation_claim',
    'estimate_tokens',
    'exchanges',
    'first_exchange',
    'fit_history',
    'list_conversations',
    'load_conversation',
    'load_page',
    'load_recent_conversation',
    'make_summary',
    'make_title',
    'message_exchanges',
    'off_loop',
    'off_loop_taking',
    'refresh_title_and_summary',
    'save_turn',
    'starts_turn',
    'summary_due',
    'summary_source',
]
