"""Migrations: the database is at head, and every migration can be applied and reverted on a fresh database."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from agentrt.db import migrate
from agentrt.db.engine import build_engine, get_engine
from agentrt.db.errors import MigrationError
from agentrt.db.migrate import (
    MIGRATIONS_DIR,
    alembic_config,
    current_revision,
    head_revision,
    upgrade,
    upgrade_if_behind,
)
from agentrt.db.settings import Settings
from tests.agents.cli.helpers import invoke


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


async def test_a_failed_migration_shows_its_own_error_and_applies_nothing(
    database: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrations = tmp_path / 'migrations'
    shutil.copytree(MIGRATIONS_DIR, migrations, ignore=shutil.ignore_patterns('__pycache__'))
    (migrations / 'versions' / '9999_broken.py').write_text(
        f"revision = '9999_broken'\ndown_revision = {head_revision()!r}\nbranch_labels = None\ndepends_on = None\n"
        'from alembic import op\n\n\ndef upgrade():\n    op.execute("SELECT 1 / 0")\n\n\ndef downgrade():\n    pass\n'
    )
    monkeypatch.setattr(migrate, 'MIGRATIONS_DIR', migrations)
    name = f'migrations_{uuid.uuid4().hex[:8]}'
    admin = get_engine().execution_options(isolation_level='AUTOCOMMIT')
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE {name}'))
    engine = build_engine(get_engine().url.set(database=name), database)
    try:
        for _ in range(2):  # and again: the lock was released with the failed transaction
            with pytest.raises(MigrationError) as raised:
                await asyncio.wait_for(upgrade(engine), 30)
            message = str(raised.value)
            assert 'DivisionByZeroError: division by zero' in message
            assert 'current transaction is aborted' not in message and 'advisory' not in message
            assert 'Nothing was applied: the schema is still at empty' in message
            assert await current_revision(engine) is None
        url = engine.url.render_as_string(hide_password=False)
        result = await invoke('db', 'upgrade', env={'DATABASE_URL': url})
        assert result.exit_code == 5
        assert [line for line in result.stderr.splitlines() if line.startswith('error:')] == [f'error: {message}']
    finally:
        await engine.dispose()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE {name} WITH (FORCE)'))
