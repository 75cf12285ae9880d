"""The OpenTelemetry trace id of each model request, so a ledger row links to its trace.

Revision ID: 0010_ledger_trace_id
Revises: 0008_ledger_error_status_code
Create Date: 2026-12-10
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010_ledger_trace_id'
down_revision: str | None = '0009_budgets'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('llm_requests', sa.Column('trace_id', sa.String(length=32), nullable=True))


def downgrade() -> None:
    op.drop_column('llm_requests', 'trace_id')
