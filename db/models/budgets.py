"""Per-account spend limits: the budget, its windows (spent and held), the holds of requests in flight, and the
settlements not yet folded into their window.

A model request is admitted by one conditional `UPDATE` of its account's window row (spent + reserved + estimate
<= limit) that also inserts a reservation row, keyed by the ledger request id. The ledger writer settles it in the
transaction that inserts the ledger row: it deletes the reservation and appends a settlement row (what was held,
what it cost), never touching the window row, so a writer's commit never holds the row admissions queue on. The next
admission of the window (or the sweeper) folds settlements into the window row. See `agentrt.services.budgets`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Uuid,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from agentrt.db.models.base import Base, CreatedAtMixin

BUDGET_PERIODS = ('month', 'week', 'day', 'window')
"""Calendar months, ISO weeks (from Monday) and days in UTC, or a custom window of `window_seconds` from an anchor."""


class AccountBudget(CreatedAtMixin, Base):
    """An account's spend limit in USD per period. An account without a row has no limit."""

    __tablename__ = 'account_budgets'
    __table_args__ = (
        CheckConstraint(f'period IN {BUDGET_PERIODS!r}', name='period'),
        CheckConstraint('limit_usd >= 0', name='limit_usd'),
        CheckConstraint(
            "(period = 'window') = (window_seconds IS NOT NULL AND window_anchor IS NOT NULL)", name='window'
        ),
        CheckConstraint('window_seconds IS NULL OR window_seconds >= 60', name='window_seconds'),
    )

    account_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey('accounts.id', ondelete='CASCADE'), primary_key=True, autoincrement=False
    )
    limit_usd: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    period: Mapped[str] = mapped_column(String(16), nullable=False)
    window_seconds: Mapped[int | None] = mapped_column(BigInteger)
    window_anchor: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class BudgetPeriod(Base):
    """One window of an account's budget: what was spent in it and what requests in flight hold.

    Created by the first reservation of the window (or its first unpriced request counted, which holds nothing), with
    `spent_usd` summed from the ledger rows of the window
    (so a budget set mid-month counts the month so far). `reserved_usd` is the sum of the window's reservations;
    settlements not folded yet (`BudgetSettlement`) still count in it, and their cost not yet in `spent_usd`.
    """

    __tablename__ = 'budget_periods'
    __table_args__ = (
        PrimaryKeyConstraint('account_id', 'period_start'),
        CheckConstraint('reserved_usd >= 0', name='reserved_usd'),
        CheckConstraint('period_end > period_start', name='period_end'),
    )

    account_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey('account_budgets.account_id', ondelete='CASCADE'), nullable=False
    )
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    period_end: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    spent_usd: Mapped[Decimal] = mapped_column(Numeric, nullable=False, server_default='0')
    reserved_usd: Mapped[Decimal] = mapped_column(Numeric, nullable=False, server_default='0')
    spent_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default='0')
    # The amount of the latest reservation: lets the one reserving UPDATE return what it held (NULL: refused).
    last_reserved_usd: Mapped[Decimal | None] = mapped_column(Numeric)
    refused_requests: Mapped[int] = mapped_column(Integer, nullable=False, server_default='0')
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class BudgetReservation(Base):
    """What one model request in flight holds of its account's window, until the ledger row settles it.

    `id` is the ledger request id. The holder (host, process id and start time) lets a sweeper release the holds of
    a process that died; `expires_at` bounds any other hold. A row lives only while its request is in flight.
    """

    __tablename__ = 'budget_reservations'
    __table_args__ = (
        ForeignKeyConstraint(
            ['account_id', 'period_start'],
            ['budget_periods.account_id', 'budget_periods.period_start'],
            ondelete='CASCADE',
        ),
        CheckConstraint('amount_usd >= 0 AND input_usd >= 0 AND input_usd <= amount_usd', name='amounts'),
        # No other index: the table holds only the requests in flight (scanned whole by the rare sweeper), and each
        # index would be written twice per model request, inside the admission that holds the account's row.
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    account_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    amount_usd: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    # The input's share: what a failed or cancelled request whose usage was never reported is charged.
    input_usd: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    holder_host: Mapped[str] = mapped_column(String(255), nullable=False)
    holder_pid: Mapped[int] = mapped_column(Integer, nullable=False)
    holder_started: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class BudgetSettlement(Base):
    """What the ledger rows of one writer's transaction settled in one window: held amounts released, costs spent.

    Appended by the ledger writer; folded into the window row (and deleted) by the window's next admission or the
    sweeper, in one statement, so each counts once.
    """

    __tablename__ = 'budget_settlements'
    __table_args__ = (
        ForeignKeyConstraint(
            ['account_id', 'period_start'],
            ['budget_periods.account_id', 'budget_periods.period_start'],
            ondelete='CASCADE',
        ),
        Index('ix_budget_settlements_account_id_period_start', 'account_id', 'period_start'),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    held_usd: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    spent_usd: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class BudgetCharge(Base):
    """What a held request was charged beyond its ledger row's `total_cost` (the input's share of a failed or
    cancelled request, the whole hold of one whose usage never came, the output a cut stream received).

    Written by the settlement, in the statement that inserts the ledger row, for such rows only; read when a window's
    row is built from the ledger (its first admission, or after `budget set` changed the period), so a rebuilt window
    charges what the settled one did: summing `total_cost` alone left these amounts out.
    """

    __tablename__ = 'budget_charges'
    __table_args__ = (
        ForeignKeyConstraint(['id'], ['llm_requests.id'], ondelete='CASCADE'),
        CheckConstraint('extra_usd > 0', name='extra_positive'),
        Index('ix_budget_charges_account_id_started_at', 'account_id', 'started_at'),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    """The ledger row's id."""
    account_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    """The ledger row's: the window it falls in."""
    extra_usd: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    """The charge less the row's `total_cost` (0 when it has none)."""
