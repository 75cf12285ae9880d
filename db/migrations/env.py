"""Alembic environment: runs migrations on the runtime's async engine, one process at a time."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from agentrt.db.models import Base

# Any fixed number: concurrent `init_database()` calls in several processes migrate one after another.
MIGRATION_LOCK_KEY = 0x61677274


def _run(connection: Connection) -> None:
    # A transaction-scoped lock: released by the COMMIT, or by the ROLLBACK of a failed migration. (A session lock
    # needed an unlock that failed in the aborted transaction and hid the migration's own error, and it outlived
    # a rollback behind PgBouncer.)
    connection.execute(text('SELECT pg_advisory_xact_lock(:key)'), {'key': MIGRATION_LOCK_KEY})
    context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()


async def _run_async(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.run_sync(_run)


connectable = context.config.attributes.get('connection')
if connectable is not None:
    _run(connectable)
else:
    engine = context.config.attributes['engine']
    asyncio.run(_run_async(engine))
