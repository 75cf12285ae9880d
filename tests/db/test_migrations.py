"""Migrations: the database is at head, and every migration can be applied and reverted on a fresh database."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from agentrt.db.engine import build_engine, get_engine
from agentrt.db.migrate import alembic_config, current_revision, head_revision, upgrade, upgrade_if_behind
from agentrt.db.settings import Settings


async def test_test_database_is_at_head() -> None:
    assert await current_revision(get_engine()) == head_revision()
    assert await upgrade_if_behind(get_engine()) is False


async def test_upgrade_downgrade_upgrade_on_a_fresh_database(database: Settings) -> None:
    name = f'migrations_{uuid.uuid4().hex[:8]}'
    admin = get_engine().execution_options(isolation_level='AUTOCOMMIT')
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE {name}'))
    engine = build_engine(get_engine().url.set(database=name), database)
    try:
        assert await current_revision(engine) is None
        assert await upgrade_if_behind(engine) is True
        assert await current_revision(engine) == head_revision()
        await _downgrade_to_base(engine)
        assert await current_revision(engine) is None
        await upgrade(engine)
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS {name}'))


async def _downgrade_to_base(engine) -> None:
    from alembic import command

    def run(connection) -> None:
        config = alembic_config()
        config.attributes['connection'] = connection
        command.downgrade(config, 'base')

    async with engine.connect() as conn:
        await conn.run_sync(run)
