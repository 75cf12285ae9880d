"""Listing an account's conversations with their titles, summaries and usage, newest first, a page at a time.

A page walk follows a keyset cursor, the order key of the last row listed. Only an order key that never changes makes
the walk stable: ordered by creation (`created`, the default), each conversation that exists when the walk begins
and still exists is listed once. Ordered by the last update (`updated`), a turn moves its conversation to the front,
ahead of the cursor: a conversation updated between two pages is not listed by the rest of the walk (a new walk lists
it first), so that order is for a first page of what is recent, not for reading them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.models import ConversationRow

MAX_CONVERSATIONS_PAGE = 100

ConversationOrder = Literal['created', 'updated']
"""`created`: newest first, by when a conversation began (a stable walk); `updated`: most recently updated first."""


@dataclass(frozen=True)
class ConversationSummary:
    """One conversation as listed: what it is about and what it has used, without its messages."""

    conversation_id: str
    title: str | None
    summary: str | None
    created_at: datetime
    updated_at: datetime
    requests: int
    tool_calls: int
    input_tokens: int
    output_tokens: int
    unmeasured_requests: int = 0
    """Requests whose provider reported no usage (or none the ledger took): the token counts leave them out."""


async def list_conversations(
    *,
    session: AsyncSession,
    account_id: int,
    limit: int = 50,
    after: tuple[datetime, str] | None = None,
    order: ConversationOrder = 'created',
) -> list[ConversationSummary]:
    """An account's conversations, newest first (see the module's docstring for which order a walk can rely on).

    Args:
        session: the session to read with.
        account_id: the account; no other account's conversation is ever listed.
        limit: at most this many (capped at `MAX_CONVERSATIONS_PAGE`).
        after: a keyset cursor, the `(created_at, conversation_id)` of the last one already listed (`updated_at` with
            `order='updated'`).
        order: `created` (newest first by when each began) or `updated` (most recently updated first).
    """
    row = ConversationRow
    moment = row.created_at if order == 'created' else row.updated_at
    query = (
        select(row.conversation_id, row.title, row.summary, row.created_at, row.updated_at, row.record['usage'])
        .where(row.account_id == account_id)
        .order_by(moment.desc(), row.conversation_id.desc())
        .limit(min(max(limit, 1), MAX_CONVERSATIONS_PAGE))
    )
    if after is not None:
        query = query.where(tuple_(moment, row.conversation_id) < tuple_(*after))
    return [
        ConversationSummary(conversation_id, title, summary, created, updated, **_usage(usage))
        for conversation_id, title, summary, created, updated, usage in (await session.execute(query))
    ]


def _usage(usage: Any) -> dict[str, int]:
    """The counters shown in a listing, from the record's stored `RunUsage` (absent counters are 0)."""
    stored = usage if isinstance(usage, dict) else {}
    # `unmeasured_requests` too: without it a conversation of unmeasured requests read as a measured zero (QA).
    names = ('requests', 'tool_calls', 'input_tokens', 'output_tokens', 'unmeasured_requests')
    return {name: int(stored.get(name) or 0) for name in names}
