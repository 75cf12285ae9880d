"""The HTTP status a failed model request was answered with, as a column of its own.

Revision ID: 0008_ledger_error_status_code
Revises: 0007_api_keys
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008_ledger_error_status_code'
down_revision: str | None = '0007_api_keys'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('llm_requests', sa.Column('error_status_code', sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column('llm_requests', 'error_status_code')
