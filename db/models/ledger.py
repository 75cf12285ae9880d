"""The LLM ledger: one row per model request (billing and audit) and its stored prompt and response."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Text,
    Uuid,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from agentrt.db.models.base import Base

REQUEST_STATUSES = ('complete', 'error', 'cancelled', 'refused')
"""`refused`: a budget refused the request before it was sent (cost 0; not a model request in costs)."""
CONTENT_KINDS = ('prompt', 'response', 'error')


class LLMRequestRow(Base):
    """One model request. `id` is minted before the request is sent, so a retried write never bills twice.

    There is deliberately no foreign key to accounts or agent instances: a billing row must outlive
    (and never be refused because of) the tenant rows it names, so identity is copied in.
    """

    __tablename__ = 'llm_requests'
    __table_args__ = (
        CheckConstraint(f'status IN {REQUEST_STATUSES!r}', name='status'),
        Index('ix_llm_requests_started_at', 'started_at'),
        Index('ix_llm_requests_account_id_started_at', 'account_id', 'started_at'),
        # Usage roll-ups catch up on rows by when they were written (migration 0005).
        Index('ix_llm_requests_recorded_at', 'recorded_at'),
        Index('ix_llm_requests_account_id_recorded_at', 'account_id', 'recorded_at'),
        Index('ix_llm_requests_chat_session_id', 'chat_session_id'),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    run_id: Mapped[str | None] = mapped_column(String(64))
    run_step: Mapped[int | None] = mapped_column(Integer)
    conversation_id: Mapped[str | None] = mapped_column(String(200))
    chat_session_id: Mapped[str | None] = mapped_column(String(200))
    account_id: Mapped[int | None] = mapped_column(BigInteger)
    account_slug: Mapped[str | None] = mapped_column(String(64))
    agent_instance_id: Mapped[int | None] = mapped_column(BigInteger)
    agent_instance_slug: Mapped[str | None] = mapped_column(String(64))
    agent_type: Mapped[str | None] = mapped_column(String(64))
    agent_name: Mapped[str | None] = mapped_column(String(200))
    provider: Mapped[str | None] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    response_model: Mapped[str | None] = mapped_column(String(200))
    streamed: Mapped[bool] = mapped_column(Boolean, nullable=False)
    input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    total_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    usage_reported: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    # Unconstrained NUMERIC keeps genai-prices' Decimal exactly; NULL means the model is unpriced.
    input_cost: Mapped[Decimal | None] = mapped_column(Numeric)
    output_cost: Mapped[Decimal | None] = mapped_column(Numeric)
    total_cost: Mapped[Decimal | None] = mapped_column(Numeric)
    # A request cut off or failed without a complete answer: what the output it received can cost at most (its UTF-8
    # size as tokens, at the output rate), charged to its budget hold beside the input's share (migration 0015).
    output_bound_usd: Mapped[Decimal | None] = mapped_column(Numeric)
    price_source: Mapped[str | None] = mapped_column(String(200))
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False)
    time_to_first_token_ms: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    success: Mapped[bool] = mapped_column(Boolean, nullable=False)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    error_type: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str | None] = mapped_column(Text)
    # The HTTP status a failed request was answered with (429, 500...); NULL without an HTTP answer (migration 0008).
    error_status_code: Mapped[int | None] = mapped_column(Integer)
    provider_response_id: Mapped[str | None] = mapped_column(String(200))
    # The OpenTelemetry trace of the request (32 hex digits): the link from `agentrt audit show` to a tracing backend;
    # NULL when no trace was being recorded (migration 0010).
    trace_id: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class LLMRequestContentRow(Base):
    """The full prompt, response or error of one ledger row, secrets redacted, written after that row commits."""

    __tablename__ = 'llm_request_contents'
    __table_args__ = (
        PrimaryKeyConstraint('request_id', 'kind'),
        CheckConstraint(f'kind IN {CONTENT_KINDS!r}', name='kind'),
    )

    request_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey('llm_requests.id', ondelete='CASCADE'))
    kind: Mapped[str] = mapped_column(String(16))
    body: Mapped[str] = mapped_column(Text, nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    truncated: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    redactions: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)
