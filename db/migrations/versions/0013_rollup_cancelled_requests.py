"""Cancelled requests counted apart from failed ones in the daily usage rollup.

Until now `failed_requests` counted every unsuccessful request, those the caller cancelled (a stopped stream, a
cancelled turn) included. The new `cancelled_requests` holds those, and `failed_requests` keeps the failures only.

Backfill: a bucket's rows are the ledger rows marked counted (`usage_rolled_up_requests`) with its day, account,
agent and model, so the cancelled ones among them are moved from `failed_requests` to `cancelled_requests`, exactly.
A ledger row deleted after it was rolled up takes its mark with it (ON DELETE CASCADE): what it was is unknown, so it
stays counted as failed (never below zero). The table keeps its row-level security and grants (table-wide, so they
cover the column); the migrating role owns the table and is a member of the roles the policies name.

Downgrade adds the cancelled requests back into `failed_requests`, then drops the column.

Revision ID: 0013_rollup_cancelled_requests
Revises: 0012_row_level_security
Create Date: 2026-12-14
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013_rollup_cancelled_requests'
down_revision: str | None = '0012_row_level_security'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The bucket key is the roll-up's (services/ledger/_rollups.py): the request's UTC day, account, agent, model.
_BACKFILL = """
UPDATE usage_daily_rollups AS u
SET cancelled_requests = least(c.cancelled, u.failed_requests),
    failed_requests = u.failed_requests - least(c.cancelled, u.failed_requests)
FROM (
    SELECT (r.started_at AT TIME ZONE 'UTC')::date AS day, r.account_id, r.agent_instance_id, r.model,
           count(*) AS cancelled
    FROM llm_requests AS r JOIN usage_rolled_up_requests AS m ON m.request_id = r.id
    WHERE r.status = 'cancelled'
    GROUP BY 1, 2, 3, 4
) AS c
WHERE u.day = c.day
  AND u.account_id IS NOT DISTINCT FROM c.account_id
  AND u.agent_instance_id IS NOT DISTINCT FROM c.agent_instance_id
  AND u.model = c.model
"""


def upgrade() -> None:
    op.add_column(
        'usage_daily_rollups',
        sa.Column('cancelled_requests', sa.BigInteger(), nullable=False, server_default=sa.text('0')),
    )
    op.execute(_BACKFILL)
    op.alter_column('usage_daily_rollups', 'cancelled_requests', server_default=None)  # like the other counters


def downgrade() -> None:
    op.execute('UPDATE usage_daily_rollups SET failed_requests = failed_requests + cancelled_requests')
    op.drop_column('usage_daily_rollups', 'cancelled_requests')
