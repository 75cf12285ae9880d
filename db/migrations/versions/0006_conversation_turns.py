"""One turn at a time per conversation: the lease a running turn holds (`conversation_turns`).

Revision ID: 0006_conversation_turns
Revises: 0005_ledger_recorded_at_index
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006_conversation_turns'
down_revision: str | None = '0005_ledger_recorded_at_index'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'conversation_turns',
        sa.Column('account_id', sa.BigInteger(), nullable=False),
        sa.Column('conversation_id', sa.String(200), nullable=False),
        sa.Column('claim_id', sa.String(64), nullable=False),
        sa.Column('claimed_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ['account_id'], ['accounts.id'], name='fk_conversation_turns_account_id_accounts', ondelete='CASCADE'
        ),
        sa.PrimaryKeyConstraint('account_id', 'conversation_id', name='pk_conversation_turns'),
    )


def downgrade() -> None:
    op.drop_table('conversation_turns')
