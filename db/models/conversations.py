"""Conversation history for pydantic-ai's `ConversationStore`: records (one per conversation) and entries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, PrimaryKeyConstraint, String, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base, CreatedAtMixin


class ConversationRow(CreatedAtMixin, Base):
    """A conversation's record: head entry, revision for compare-and-swap, and the full record as JSON."""

    __tablename__ = 'conversations'
    __table_args__ = (
        PrimaryKeyConstraint('account_id', 'conversation_id'),
        Index('ix_conversations_account_scope_updated', 'account_id', 'scope', 'updated_at'),
    )

    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey('accounts.id', ondelete='CASCADE'))
    conversation_id: Mapped[str] = mapped_column(String(200))
    scope: Mapped[str | None] = mapped_column(String(200))
    head_id: Mapped[str | None] = mapped_column(String(64))
    revision: Mapped[str] = mapped_column(String(64), nullable=False)
    record: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class ConversationEntryRow(CreatedAtMixin, Base):
    """One message of a conversation, linked to its parent entry (entries are shared by forks)."""

    __tablename__ = 'conversation_entries'
    __table_args__ = (Index('ix_conversation_entries_account_id', 'account_id'),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey('accounts.id', ondelete='CASCADE'), nullable=False)
    parent_id: Mapped[str | None] = mapped_column(String(64), ForeignKey('conversation_entries.id'))
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    message: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
