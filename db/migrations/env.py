"""Alembic environment: runs migrations on the runtime's async engine, one process at a time."""

from __future__ import annotations

import asyncio
import logging

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from agentrt.db.migrate import MIGRATION_LOCK_KEY, REVISION_AT_LOCK, migration_lock_holder
from agentrt.db.models import Base
from agentrt.db.transaction_setup import waiting_without_end

logger = logging.getLogger('agentrt.db')


def _run(connection: Connection) -> None:
    connection.execute(_CLIENT_CHECK)  # first: the wait for the migration lock below is a statement too
    # A transaction-scoped lock: released by the COMMIT, or by the ROLLBACK of a failed migration. (A session lock
    # needed an unlock that failed in the aborted transaction and hid the migration's own error, and it outlived
    # a rollback behind PgBouncer.)
    # Waiting for another process's migration takes as long as that migration does (a backfill of a large ledger):
    # no timeout for the wait (DB_LOCK_TIMEOUT_MS, 10 s, failed it "stopped waiting for a lock"), then the
    # connection's own again for the migration's statements (a DDL lock queued behind live traffic stays bounded).
    saved = connection.execute(
        text(
            "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), "
            "set_config('lock_timeout', '0', true), set_config('statement_timeout', '0', true)"
        )
    ).one()
    _take_migration_lock(connection)
    connection.execute(
        text("SELECT set_config('lock_timeout', :lock, true), set_config('statement_timeout', :statement, true)"),
        {'lock': saved[0], 'statement': saved[1]},
    )
    context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
    # Read under the lock: a process that waited for another's migration finds the schema where that one left it.
    context.config.attributes[REVISION_AT_LOCK] = context.get_context().get_current_revision()
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()


# The backend of a migrator killed mid-statement (`kill -9` of `agentrt db upgrade`) went on running it, holding the
# migration lock and the ledger's write lock, until it next wrote to its client: 22 s of a ledger's backfill (QA).
# Polling the socket every second (`client_connection_check_interval`, PostgreSQL 14+, transaction-local) ends it
# within about a second, waiting for a lock included. A server without the setting (before 14), or a platform that
# cannot poll for it (a non-zero value refused there), migrates as before.
_CLIENT_CHECK = text(
    """
    DO $$
    BEGIN
        PERFORM set_config('client_connection_check_interval', '1s', true);
    EXCEPTION WHEN undefined_object OR invalid_parameter_value THEN NULL;
    END
    $$
    """
)


def _take_migration_lock(connection: Connection) -> None:
    """Take the migration lock; while another process holds it, say so first: the wait lasts as long as that
    migration does, and a command waited in silence after its "upgrading to ..." line."""
    key = {'key': MIGRATION_LOCK_KEY}
    if connection.execute(text('SELECT pg_try_advisory_xact_lock(:key)'), key).scalar_one():
        return
    holder = migration_lock_holder(connection)
    who = f' ({holder})' if holder else ''
    logger.warning('another process is migrating this database%s: waiting for it to finish', who)
    with waiting_without_end(connection):  # the client's wait too: its statement timeout is lifted for this one
        connection.execute(text('SELECT pg_advisory_xact_lock(:key)'), key)


async def _run_async(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.run_sync(_run)


connectable = context.config.attributes.get('connection')
if connectable is not None:
    _run(connectable)
else:
    engine = context.config.attributes['engine']
    asyncio.run(_run_async(engine))
