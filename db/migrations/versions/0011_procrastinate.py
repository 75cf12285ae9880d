"""procrastinate's tables, types and functions: the durable queue of background jobs (`AGENTRT_BACKGROUND=queue`).

The schema of procrastinate 3.10.0 (shipped beside the migrations, so migrating needs no queue extra installed) is
run as it is, in the migration's transaction. It is created whatever the background mode: switching to the queue
later needs no migration.

Revision ID: 0011_procrastinate
Revises: 0010_ledger_trace_id
Create Date: 2026-12-01
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alembic import op
from sqlalchemy.util import await_only

revision: str = '0011_procrastinate'
down_revision: str | None = '0010_ledger_trace_id'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = Path(__file__).resolve().parents[1] / 'sql' / 'procrastinate_3_10_0.sql'

# Every object the schema creates is named procrastinate_*: its tables (with their indexes and triggers), then its
# functions, then its types.
_DROP = """
DO $$
DECLARE item record;
BEGIN
    DROP TABLE IF EXISTS procrastinate_periodic_defers, procrastinate_events, procrastinate_jobs,
        procrastinate_workers CASCADE;
    FOR item IN SELECT p.oid::regprocedure AS signature FROM pg_proc AS p
                JOIN pg_namespace AS n ON n.oid = p.pronamespace
                WHERE n.nspname = current_schema() AND p.proname LIKE 'procrastinate\\_%' LOOP
        EXECUTE 'DROP FUNCTION ' || item.signature || ' CASCADE';
    END LOOP;
    FOR item IN SELECT t.typname FROM pg_type AS t JOIN pg_namespace AS n ON n.oid = t.typnamespace
                WHERE n.nspname = current_schema() AND t.typname LIKE 'procrastinate\\_%' AND t.typtype IN ('e', 'c')
    LOOP
        EXECUTE format('DROP TYPE %I CASCADE', item.typname);
    END LOOP;
END;
$$;
"""


def _run_script(sql: str) -> None:
    # Many statements and dollar-quoted bodies: sent as one simple-protocol query on the migration's connection
    # (inside its transaction), as psql would; SQLAlchemy's text() would read `:name` inside them as parameters.
    driver: Any = op.get_bind().connection.driver_connection
    await_only(driver.execute(sql))


def upgrade() -> None:
    _run_script(SCHEMA.read_text(encoding='utf-8'))


def downgrade() -> None:
    _run_script(_DROP)
