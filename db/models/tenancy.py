"""Tenants: accounts and the agent instances configured for them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Identity, String, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from agentrt.db.models.base import Base, CreatedAtMixin


class Account(CreatedAtMixin, Base):
    """A tenant. Every row that belongs to someone carries an `account_id`."""

    __tablename__ = 'accounts'

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)  # as migration 0001 made it
    slug: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)


class AgentInstance(CreatedAtMixin, Base):
    """One configured agent of an account (type plus free-form JSON config)."""

    __tablename__ = 'agent_instances'
    __table_args__ = (UniqueConstraint('account_id', 'slug'),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)  # as migration 0001 made it
    account_id: Mapped[int] = mapped_column(ForeignKey('accounts.id', ondelete='CASCADE'), nullable=False, index=True)
    slug: Mapped[str] = mapped_column(String(64), nullable=False)
    agent_type: Mapped[str] = mapped_column(String(64), nullable=False)
    config: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default='{}')
