"""Daily usage per account, agent and model, rolled up from the LLM ledger, and which ledger rows it holds."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import BigInteger, Date, DateTime, ForeignKey, Index, Numeric, String, UniqueConstraint, Uuid, func
from sqlalchemy.orm import Mapped, mapped_column

from agentrt.db.models.base import Base


class UsageDailyRollup(Base):
    """Totals of the ledger's requests for one UTC day, account, agent instance, agent name and model.

    Account and agent instance are copied ids, NULL when the ledger row had none (like the ledger, no foreign
    key: totals outlive the tenant rows they name). The agent's name is part of the key: two agents on one
    instance, or agents without one, are reported apart, as the ledger reports them (migration 0021). NULLs
    count as one key (`NULLS NOT DISTINCT`, PostgreSQL 15+), so the upsert has a single row to hit. Costs sum
    the priced requests; `unpriced_requests` says how many had no price.
    """

    __tablename__ = 'usage_daily_rollups'
    __table_args__ = (
        # Named: the convention's name (72 characters) would pass PostgreSQL's 63.
        UniqueConstraint(
            'day',
            'account_id',
            'agent_instance_id',
            'agent_name',
            'model',
            name='uq_usage_daily_rollups_bucket',
            postgresql_nulls_not_distinct=True,
        ),
        Index('ix_usage_daily_rollups_account_id_day', 'account_id', 'day'),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    day: Mapped[date] = mapped_column(Date, nullable=False)
    account_id: Mapped[int | None] = mapped_column(BigInteger)
    agent_instance_id: Mapped[int | None] = mapped_column(BigInteger)
    agent_name: Mapped[str | None] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    # Labels copied from the ledger (the greatest seen in the bucket), for reports that outlive the tenant rows.
    account_slug: Mapped[str | None] = mapped_column(String(64))
    agent_instance_slug: Mapped[str | None] = mapped_column(String(64))
    requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    failed_requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    """Requests that failed; the cancelled ones are in `cancelled_requests` (migration 0013)."""
    cancelled_requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    unpriced_requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    output_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    total_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    input_cost: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    output_cost: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    total_cost: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class UsageRolledUpRequest(Base):
    """A ledger row already counted in `usage_daily_rollups`: what makes a retried roll-up count nothing twice."""

    __tablename__ = 'usage_rolled_up_requests'

    request_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey('llm_requests.id', ondelete='CASCADE'), primary_key=True
    )
    rolled_up_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class UsagePendingRequest(Base):
    """A ledger row the rollup has not counted yet: queued by a trigger on `llm_requests` in the transaction that
    writes it (migration 0019), taken off by the roll-up that counts it (`services/ledger/_rollups.py`).

    What lets a roll-up find every uncounted row without looking back over the ledger by time.
    """

    __tablename__ = 'usage_pending_requests'
    __table_args__ = (Index('ix_usage_pending_requests_account_id_request_id', 'account_id', 'request_id'),)

    request_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey('llm_requests.id', ondelete='CASCADE'), primary_key=True
    )
    account_id: Mapped[int | None] = mapped_column(BigInteger)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
