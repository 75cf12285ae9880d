"""The job queue's tables for `agentrt_jobs`, so a login role that does not own them can run the queue mode.

The queue (procrastinate, `AGENTRT_BACKGROUND=queue`) connects as the login role of its URL and takes no role of the
runtime's: it runs procrastinate's functions, which read and write its tables with the caller's rights. A login role
that did not own them (the tables migrated by another role; README "Tenant isolation") had no right on them, and every
turn's post-turn jobs failed with procrastinate's "Database error.". Granted to `agentrt_jobs` here, they reach every
login role that is a member of it, as the runtime's roles require (a membership that inherits: the default).

Revision ID: 0016_queue_grants
Revises: 0015_ledger_output_bound
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0016_queue_grants'
down_revision: str | None = '0015_ledger_output_bound'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = 'procrastinate_jobs, procrastinate_events, procrastinate_workers, procrastinate_periodic_defers'
SEQUENCES = (
    'procrastinate_jobs_id_seq, procrastinate_events_id_seq, procrastinate_workers_id_seq, '
    'procrastinate_periodic_defers_id_seq'
)


def upgrade() -> None:
    op.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLES} TO agentrt_jobs')
    op.execute(f'GRANT USAGE, SELECT ON SEQUENCE {SEQUENCES} TO agentrt_jobs')


def downgrade() -> None:
    op.execute(f'REVOKE USAGE, SELECT ON SEQUENCE {SEQUENCES} FROM agentrt_jobs')
    op.execute(f'REVOKE SELECT, INSERT, UPDATE, DELETE ON {TABLES} FROM agentrt_jobs')
