"""The ledger rows the daily usage rollup has not counted yet, queued by the statement that writes them.

The roll-ups found uncounted rows by when they were recorded: the post-turn one looked back an hour, `agentrt costs`
seven days, the queue's reconcile two. A row none of them reached in time (a turn of one's own agent with
`ledger_capability()`, which has no post-turn roll-up; a turn whose roll-up was dropped at a process's end; an app
host whose clock ran an hour ahead of the database's) was never counted, and the rollup's reports left it out
without a word. Now a trigger on `llm_requests` queues every new row here in the transaction that writes it, whoever
writes it, and a roll-up takes what is queued (`services/ledger/_rollups.py`): no lookback, no clock compared.
`usage_rolled_up_requests` stays what makes a row counted once. Rows written before this revision and never counted
are queued by the upgrade.

Revision ID: 0019_usage_pending_requests
Revises: 0018_budget_charges
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0019_usage_pending_requests'
down_revision: str | None = '0018_budget_charges'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TENANT = "(SELECT nullif(current_setting('app.account_id', true), '')::bigint)"
"""The request role's account, as migration 0012's policies read it."""

# One statement-level trigger (a transition table of the statement's new rows): a batch of the ledger's writer is
# one insert here, not one per row. Runs as the role that wrote the ledger rows (its grant below).
_QUEUE_FUNCTION = """
CREATE FUNCTION agentrt_queue_usage_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_pending_requests (request_id, account_id, recorded_at)
    SELECT id, account_id, recorded_at FROM new_requests;
    RETURN NULL;
END
$$
"""
_QUEUE_TRIGGER = """
CREATE TRIGGER queue_usage_rollup AFTER INSERT ON llm_requests
REFERENCING NEW TABLE AS new_requests FOR EACH STATEMENT EXECUTE FUNCTION agentrt_queue_usage_rollup()
"""


def upgrade() -> None:
    # The queue's key, index and foreign key are made after its backfill, which runs with the ledger write-locked
    # (the trigger's lock, until the commit: no ledger row is written or deleted meanwhile, none is missed). Made
    # before, each backfilled row cost a key check and a foreign-key check locking its ledger row: 1M rows, 875k not
    # counted, 8.6-10.8 s; made after (one index build each, the foreign key checked by one join), 2.2-2.7 s.
    op.create_table(
        'usage_pending_requests',
        sa.Column('request_id', sa.Uuid(), nullable=False),
        sa.Column('account_id', sa.BigInteger(), nullable=True),
        sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    )
    # The function's tables as the migration sees them, whatever search path the writing session has.
    op.execute(_QUEUE_FUNCTION)
    op.execute('ALTER FUNCTION agentrt_queue_usage_rollup() SET search_path FROM CURRENT')
    op.execute(_QUEUE_TRIGGER)
    op.execute("""
        INSERT INTO usage_pending_requests (request_id, account_id, recorded_at)
        SELECT r.id, r.account_id, r.recorded_at FROM llm_requests AS r
        WHERE NOT EXISTS (SELECT 1 FROM usage_rolled_up_requests AS u WHERE u.request_id = r.id)
    """)
    op.create_primary_key('pk_usage_pending_requests', 'usage_pending_requests', ['request_id'])
    # An account's roll-up walks its own rows in key order (an index on the key alone walked every other account's:
    # 11.7 s for an account's last, nearly empty batch beside 1.47M rows of another's, QA).
    op.create_index(
        'ix_usage_pending_requests_account_id_request_id', 'usage_pending_requests', ['account_id', 'request_id']
    )
    op.create_foreign_key(
        'fk_usage_pending_requests_request_id_llm_requests',
        'usage_pending_requests',
        'llm_requests',
        ['request_id'],
        ['id'],
        ondelete='CASCADE',
    )
    # Whoever inserts ledger rows queues them (the trigger runs as that role); the roll-ups (jobs) take them; the
    # request role reads its own account's (a `source=rollup` read checks there is nothing left to count).
    op.execute('GRANT INSERT ON usage_pending_requests TO agentrt_ledger')
    op.execute('GRANT SELECT ON usage_pending_requests TO agentrt_app')
    # UPDATE: the roll-up locks what it takes (FOR UPDATE needs it).
    op.execute('GRANT SELECT, INSERT, UPDATE, DELETE ON usage_pending_requests TO agentrt_jobs')
    op.execute('GRANT ALL ON usage_pending_requests TO agentrt_admin')
    op.execute('ALTER TABLE usage_pending_requests ENABLE ROW LEVEL SECURITY')
    op.execute('ALTER TABLE usage_pending_requests FORCE ROW LEVEL SECURITY')
    op.execute(
        'CREATE POLICY cross_account ON usage_pending_requests TO agentrt_auth, agentrt_ledger, agentrt_jobs, '
        'agentrt_admin USING (true) WITH CHECK (true)'
    )
    op.execute(
        f'CREATE POLICY tenant ON usage_pending_requests TO agentrt_app USING (account_id = {_TENANT}) '
        f'WITH CHECK (account_id = {_TENANT})'
    )


def downgrade() -> None:
    op.execute('DROP TRIGGER IF EXISTS queue_usage_rollup ON llm_requests')
    op.execute('DROP FUNCTION IF EXISTS agentrt_queue_usage_rollup()')
    op.drop_table('usage_pending_requests')
