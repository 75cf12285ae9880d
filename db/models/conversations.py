"""Conversation history for pydantic-ai's `ConversationStore`: records (one per conversation) and entries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from agentrt.db.models.base import Base, CreatedAtMixin


class ConversationEntryRow(CreatedAtMixin, Base):
    """One message of a conversation, linked to its parent entry (entries are shared by forks).

    Entries have no conversation id: a fork's history points into another conversation's entries.
    The parent must belong to the same account, which the composite foreign key enforces.
    """

    __tablename__ = 'conversation_entries'
    __table_args__ = (
        # The target of the same-account foreign keys below; also serves every `account_id = :a` lookup.
        UniqueConstraint('account_id', 'id', name='uq_conversation_entries_account_id_id'),
        ForeignKeyConstraint(
            ['account_id', 'parent_id'],
            ['conversation_entries.account_id', 'conversation_entries.id'],
            name='fk_conversation_entries_parent',
        ),
        # Without it, every deleted entry makes PostgreSQL scan the table for children (the FK check).
        Index('ix_conversation_entries_account_id_parent_id', 'account_id', 'parent_id'),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey('accounts.id', ondelete='CASCADE'), nullable=False)
    parent_id: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    message: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)


class ConversationRow(CreatedAtMixin, Base):
    """A conversation's record: the full record as JSON, plus the columns queries and compare-and-swap need."""

    __tablename__ = 'conversations'
    __table_args__ = (
        PrimaryKeyConstraint('account_id', 'conversation_id'),
        # Deferred: the record is swapped before the entries it points at are inserted (see the store).
        ForeignKeyConstraint(
            ['account_id', 'head_id'],
            ['conversation_entries.account_id', 'conversation_entries.id'],
            name='fk_conversations_head',
            deferrable=True,
            initially='DEFERRED',
        ),
        Index('ix_conversations_account_scope_updated', 'account_id', 'scope', 'updated_at'),
        Index('ix_conversations_account_updated', 'account_id', 'updated_at'),
        # The listing's default order, newest first by when each began (migration 0014).
        Index('ix_conversations_account_created', 'account_id', 'created_at', 'conversation_id'),
        Index('ix_conversations_account_head', 'account_id', 'head_id'),
        # A delete's prune finds the records with a branch tip in the deleted history by it (migration 0020).
        Index('ix_conversations_branches', text("(record -> 'branches')"), postgresql_using='gin'),
    )

    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey('accounts.id', ondelete='CASCADE'))
    conversation_id: Mapped[str] = mapped_column(String(200))
    scope: Mapped[str | None] = mapped_column(String(200))
    head_id: Mapped[str | None] = mapped_column(String(64))
    revision: Mapped[str] = mapped_column(String(64), nullable=False)
    record: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)
    # Kept up to date by background post-turn work (migration 0004_background).
    title: Mapped[str | None] = mapped_column(String(200))
    summary: Mapped[str | None] = mapped_column(Text)
    summary_head_id: Mapped[str | None] = mapped_column(String(64))
    summarised_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ConversationTurnRow(Base):
    """The turn running on a conversation now: a lease one turn holds from before it loads until it ends.

    No foreign key to `conversations`: the first turn of a conversation claims it before its record exists.
    A crashed process's claim expires at `expires_at` (a running turn renews it); see
    `services/conversations/_claims.py`.
    """

    __tablename__ = 'conversation_turns'
    __table_args__ = (PrimaryKeyConstraint('account_id', 'conversation_id'),)

    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey('accounts.id', ondelete='CASCADE'))
    conversation_id: Mapped[str] = mapped_column(String(200))
    claim_id: Mapped[str] = mapped_column(String(64), nullable=False)
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # The process holding the claim (migration 0017): a turn on the same host takes over a dead holder's claim at once.
    holder_host: Mapped[str | None] = mapped_column(String(255))
    holder_pid: Mapped[int | None] = mapped_column(Integer)
    holder_started: Mapped[float | None] = mapped_column(Float)
