"""Background post-turn work: conversation title and summary columns, and the daily usage rollup.

Revision ID: 0004_background
Revises: 0003_llm_ledger
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004_background'
down_revision: str | None = '0003_llm_ledger'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('conversations', sa.Column('title', sa.String(200), nullable=True))
    op.add_column('conversations', sa.Column('summary', sa.Text(), nullable=True))
    # The head entry the summary was written from: a retried or late task can tell it has nothing to do.
    op.add_column('conversations', sa.Column('summary_head_id', sa.String(64), nullable=True))
    op.add_column('conversations', sa.Column('summarised_at', sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        'usage_daily_rollups',
        sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('account_id', sa.BigInteger(), nullable=True),
        sa.Column('agent_instance_id', sa.BigInteger(), nullable=True),
        sa.Column('model', sa.String(200), nullable=False),
        sa.Column('account_slug', sa.String(64), nullable=True),
        sa.Column('agent_instance_slug', sa.String(64), nullable=True),
        sa.Column('agent_name', sa.String(200), nullable=True),
        *(
            sa.Column(name, sa.BigInteger(), nullable=False)
            for name in (
                'requests',
                'failed_requests',
                'unpriced_requests',
                'input_tokens',
                'output_tokens',
                'cache_read_tokens',
                'cache_write_tokens',
                'reasoning_tokens',
                'total_tokens',
            )
        ),
        *(sa.Column(name, sa.Numeric(), nullable=False) for name in ('input_cost', 'output_cost', 'total_cost')),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint('id', name='pk_usage_daily_rollups'),
        sa.UniqueConstraint(
            'day',
            'account_id',
            'agent_instance_id',
            'model',
            name='uq_usage_daily_rollups_day_account_id_agent_instance_id_model',
            postgresql_nulls_not_distinct=True,
        ),
    )
    op.create_index('ix_usage_daily_rollups_account_id_day', 'usage_daily_rollups', ['account_id', 'day'])
    op.create_table(
        'usage_rolled_up_requests',
        sa.Column('request_id', sa.Uuid(), nullable=False),
        sa.Column('rolled_up_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint('request_id', name='pk_usage_rolled_up_requests'),
        sa.ForeignKeyConstraint(
            ['request_id'],
            ['llm_requests.id'],
            name='fk_usage_rolled_up_requests_request_id_llm_requests',
            ondelete='CASCADE',
        ),
    )


def downgrade() -> None:
    op.drop_table('usage_rolled_up_requests')
    op.drop_table('usage_daily_rollups')
    for column in ('summarised_at', 'summary_head_id', 'summary', 'title'):
        op.drop_column('conversations', column)
