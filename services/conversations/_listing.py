"""Listing an account's conversations with their titles, summaries and usage, newest first, a page at a time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.models import ConversationRow

MAX_CONVERSATIONS_PAGE = 100


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


async def list_conversations(
    *, session: AsyncSession, account_id: int, limit: int = 50, after: tuple[datetime, str] | None = None
) -> list[ConversationSummary]:
    """An account's conversations, most recently updated first.

    Args:
        session: the session to read with.
        account_id: the account; no other account's conversation is ever listed.
        limit: at most this many (capped at `MAX_CONVERSATIONS_PAGE`).
        after: a keyset cursor, the `(updated_at, conversation_id)` of the last one already listed.
    """
    row = ConversationRow
    query = (
        select(row.conversation_id, row.title, row.summary, row.created_at, row.updated_at, row.record['usage'])
        .where(row.account_id == account_id)
        .order_by(row.updated_at.desc(), row.conversation_id.desc())
        .limit(min(max(limit, 1), MAX_CONVERSATIONS_PAGE))
    )
    if after is not None:
        query = query.where(tuple_(row.updated_at, row.conversation_id) < tuple_(*after))
    return [
        ConversationSummary(conversation_id, title, summary, created, updated, **_usage(usage))
        for conversation_id, title, summary, created, updated, usage in (await session.execute(query))
    ]


def _usage(usage: Any) -> dict[str, int]:
    """The counters shown in a listing, from the record's stored `RunUsage` (absent counters are 0)."""
    stored = usage if isinstance(usage, dict) else {}
    names = ('requests', 'tool_calls', 'input_tokens', 'output_tokens')
    return {name: int(stored.get(name) or 0) for name in names}
