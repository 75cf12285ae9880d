"""What a held request was charged beyond its ledger row's cost, so a window built from the ledger charges it too.

The settlement charges a held request more than its `total_cost` in some cases (the input's share of a failed or
cancelled request, the whole hold of one whose usage never came, the output a cut stream received), but only into the
window row it settled against. A window's row built from the ledger later (its first admission, or after `budget
set` changed the period) summed `total_cost` alone and left those amounts out. The settlement now also records each
such amount here (`services/budgets/_settle.py`), in the statement that inserts the ledger row, and the builders add
them (`_reserve.py`, `_admin.py`). Rows settled before this revision have none: a window rebuilt over them sums what
it did before.

Revision ID: 0018_budget_charges
Revises: 0017_claim_holders
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0018_budget_charges'
down_revision: str | None = '0017_claim_holders'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TENANT = "(SELECT nullif(current_setting('app.account_id', true), '')::bigint)"
"""The request role's account, as migration 0012's policies read it."""


def upgrade() -> None:
    op.create_table(
        'budget_charges',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('account_id', sa.BigInteger(), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('extra_usd', sa.Numeric(), nullable=False),
        sa.CheckConstraint('extra_usd > 0', name='ck_budget_charges_extra_positive'),
        sa.ForeignKeyConstraint(
            ['id'], ['llm_requests.id'], name='fk_budget_charges_id_llm_requests', ondelete='CASCADE'
        ),
        sa.PrimaryKeyConstraint('id', name='pk_budget_charges'),
    )
    op.create_index('ix_budget_charges_account_id_started_at', 'budget_charges', ['account_id', 'started_at'])
    # As migration 0012 for the other budget tables: the ledger writer inserts (its settlement), the request role
    # reads its own account's (an admission building its window), the operator everything.
    op.execute('GRANT INSERT ON budget_charges TO agentrt_ledger')
    op.execute('GRANT SELECT ON budget_charges TO agentrt_app, agentrt_jobs')
    op.execute('GRANT ALL ON budget_charges TO agentrt_admin')
    op.execute('ALTER TABLE budget_charges ENABLE ROW LEVEL SECURITY')
    op.execute('ALTER TABLE budget_charges FORCE ROW LEVEL SECURITY')
    op.execute(
        'CREATE POLICY cross_account ON budget_charges TO agentrt_auth, agentrt_ledger, agentrt_jobs, agentrt_admin '
        'USING (true) WITH CHECK (true)'
    )
    op.execute(
        f'CREATE POLICY tenant ON budget_charges TO agentrt_app USING (account_id = {_TENANT}) '
        f'WITH CHECK (account_id = {_TENANT})'
    )


def downgrade() -> None:
    op.drop_table('budget_charges')
