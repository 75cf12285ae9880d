"""Budgets: per-account limits, their windows, holds of requests in flight, settlements; `refused` ledger rows.

Revision ID: 0009_budgets
Revises: 0008_ledger_error_status_code
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009_budgets'
down_revision: str | None = '0008_ledger_error_status_code'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'account_budgets',
        sa.Column('account_id', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('limit_usd', sa.Numeric(), nullable=False),
        sa.Column('period', sa.String(16), nullable=False),
        sa.Column('window_seconds', sa.BigInteger(), nullable=True),
        sa.Column('window_anchor', sa.DateTime(timezone=True), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("period IN ('month', 'week', 'day', 'window')", name='ck_account_budgets_period'),
        sa.CheckConstraint('limit_usd >= 0', name='ck_account_budgets_limit_usd'),
        sa.CheckConstraint(
            "(period = 'window') = (window_seconds IS NOT NULL AND window_anchor IS NOT NULL)",
            name='ck_account_budgets_window',
        ),
        sa.CheckConstraint('window_seconds IS NULL OR window_seconds >= 60', name='ck_account_budgets_window_seconds'),
        sa.ForeignKeyConstraint(
            ['account_id'], ['accounts.id'], name='fk_account_budgets_account_id_accounts', ondelete='CASCADE'
        ),
        sa.PrimaryKeyConstraint('account_id', name='pk_account_budgets'),
    )
    op.create_table(
        'budget_periods',
        sa.Column('account_id', sa.BigInteger(), nullable=False),
        sa.Column('period_start', sa.DateTime(timezone=True), nullable=False),
        sa.Column('period_end', sa.DateTime(timezone=True), nullable=False),
        sa.Column('spent_usd', sa.Numeric(), server_default='0', nullable=False),
        sa.Column('reserved_usd', sa.Numeric(), server_default='0', nullable=False),
        sa.Column('spent_tokens', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('last_reserved_usd', sa.Numeric(), nullable=True),
        sa.Column('refused_requests', sa.Integer(), server_default='0', nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint('reserved_usd >= 0', name='ck_budget_periods_reserved_usd'),
        sa.CheckConstraint('period_end > period_start', name='ck_budget_periods_period_end'),
        sa.ForeignKeyConstraint(
            ['account_id'],
            ['account_budgets.account_id'],
            name='fk_budget_periods_account_id_account_budgets',
            ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('account_id', 'period_start', name='pk_budget_periods'),
    )
    op.create_table(
        'budget_reservations',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('account_id', sa.BigInteger(), nullable=False),
        sa.Column('period_start', sa.DateTime(timezone=True), nullable=False),
        sa.Column('amount_usd', sa.Numeric(), nullable=False),
        sa.Column('input_usd', sa.Numeric(), nullable=False),
        sa.Column('holder_host', sa.String(255), nullable=False),
        sa.Column('holder_pid', sa.Integer(), nullable=False),
        sa.Column('holder_started', sa.Float(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            'amount_usd >= 0 AND input_usd >= 0 AND input_usd <= amount_usd', name='ck_budget_reservations_amounts'
        ),
        sa.ForeignKeyConstraint(
            ['account_id', 'period_start'],
            ['budget_periods.account_id', 'budget_periods.period_start'],
            name='fk_budget_reservations_account_id_budget_periods',
            ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('id', name='pk_budget_reservations'),
    )
    op.create_table(
        'budget_settlements',
        sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column('account_id', sa.BigInteger(), nullable=False),
        sa.Column('period_start', sa.DateTime(timezone=True), nullable=False),
        sa.Column('held_usd', sa.Numeric(), nullable=False),
        sa.Column('spent_usd', sa.Numeric(), nullable=False),
        sa.Column('tokens', sa.BigInteger(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ['account_id', 'period_start'],
            ['budget_periods.account_id', 'budget_periods.period_start'],
            name='fk_budget_settlements_account_id_budget_periods',
            ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('id', name='pk_budget_settlements'),
    )
    op.create_index(
        'ix_budget_settlements_account_id_period_start', 'budget_settlements', ['account_id', 'period_start']
    )
    # A request a budget refused is a ledger row too (cost 0), so the audit shows the refusal.
    op.drop_constraint('ck_llm_requests_status', 'llm_requests', type_='check')
    op.create_check_constraint(
        'ck_llm_requests_status', 'llm_requests', "status IN ('complete', 'error', 'cancelled', 'refused')"
    )


def downgrade() -> None:
    op.execute("DELETE FROM llm_requests WHERE status = 'refused'")
    op.drop_constraint('ck_llm_requests_status', 'llm_requests', type_='check')
    op.create_check_constraint('ck_llm_requests_status', 'llm_requests', "status IN ('complete', 'error', 'cancelled')")
    op.drop_table('budget_settlements')
    op.drop_table('budget_reservations')
    op.drop_table('budget_periods')
    op.drop_table('account_budgets')
