"""What the output a cut-off or failed model request received can cost at most, for its budget's settlement.

A stream cut off (its caller gone, the connection dropped) before its provider reported usage was settled at its
input's share of the hold: the output it had streamed, which the provider bills, was free against the budget. The
ledger writer now records what that output can cost at most (its UTF-8 size as tokens, at the output rate) and the
settlement charges it beside the input's share (README "Budgets").

Revision ID: 0015_ledger_output_bound
Revises: 0014_conversations_created_index
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0015_ledger_output_bound'
down_revision: str | None = '0014_conversations_created_index'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('llm_requests', sa.Column('output_bound_usd', sa.Numeric(), nullable=True))
    # The ledger writer's insert returns it to its settlement (migration 0012 grants the writer the settling figures
    # column by column); the other roles' grants are on the whole table.
    op.execute('GRANT SELECT (output_bound_usd) ON llm_requests TO agentrt_ledger')


def downgrade() -> None:
    op.drop_column('llm_requests', 'output_bound_usd')
