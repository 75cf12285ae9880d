"""Index ledger rows by when they were written, for usage roll-ups that catch up on late rows.

Revision ID: 0005_ledger_recorded_at_index
Revises: 0004_background
Create Date: 2026-11-22
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0005_ledger_recorded_at_index'
down_revision: str | None = '0004_background'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_llm_requests_recorded_at', 'llm_requests', ['recorded_at'])
    op.create_index('ix_llm_requests_account_id_recorded_at', 'llm_requests', ['account_id', 'recorded_at'])


def downgrade() -> None:
    op.drop_index('ix_llm_requests_account_id_recorded_at', table_name='llm_requests')
    op.drop_index('ix_llm_requests_recorded_at', table_name='llm_requests')
