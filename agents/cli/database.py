"""`agentrt db ...`: status, upgrade and seed."""

from __future__ import annotations

import typer

from agentrt.agents.cli.support import console, run

db_app = typer.Typer(help='Database: status, migrations and demo data.', no_args_is_help=True)


@db_app.command('status')
def status() -> None:
    """Show the server, the migration revision, the pool settings and row counts."""
    run(_status)


async def _status() -> None:
    from rich.table import Table

    from agentrt.agents.observability import trace_export
    from agentrt.db.engine import close_database, current_settings, get_engine, init_database, server_info
    from agentrt.db.migrate import current_revision, head_revision
    from agentrt.db.session import get_db_session
    from agentrt.db.status import server_version, table_counts

    await init_database(migrate=False)
    try:
        info = server_info()
        settings = current_settings()
        async with get_db_session() as session:
            version = await server_version(session=session)
            counts = await table_counts(session=session)
        revision, head = await current_revision(get_engine()), head_revision()
    finally:
        await close_database()
    kind = f'embedded (data in {info["data_dir"]})' if info['embedded'] else 'external (DATABASE_URL)'
    table = Table(title='agentrt database', show_header=False, title_justify='left')
    table.add_column(style='bold')
    table.add_column()
    table.add_row('server', info['url'])
    table.add_row('kind', kind)
    table.add_row('PostgreSQL', version)
    behind = '' if revision == head else f' (behind: head is {head}; run `agentrt db upgrade`)'
    table.add_row('migration', f'{revision or "none"}{behind}')
    table.add_row(
        'pool',
        f'size {settings.pool_size}, max overflow {settings.max_overflow}, timeout {settings.pool_timeout:g}s, '
        f'pre-ping {settings.pool_pre_ping}, recycle {settings.pool_recycle}s',
    )
    table.add_row(
        'timeouts',
        f'statement {settings.statement_timeout_ms} ms, lock {settings.lock_timeout_ms} ms, '
        f'connect {settings.connect_timeout:g}s',
    )
    table.add_row('tracing', trace_export().describe())
    for name, count in counts.items():
        table.add_row(f'rows: {name}', 'missing (not migrated)' if count is None else f'{count:,}')
    console.print(table)


@db_app.command('upgrade')
def upgrade_cmd(revision: str = typer.Argument('head', help='Target revision.')) -> None:
    """Apply the schema migrations."""
    run(_upgrade, revision)


async def _upgrade(revision: str) -> None:
    from agentrt.db.engine import close_database, get_engine, init_database
    from agentrt.db.migrate import current_revision, upgrade

    await init_database(migrate=False)
    try:
        before = await current_revision(get_engine())
        await upgrade(get_engine(), revision)
        after = await current_revision(get_engine())
    finally:
        await close_database()
    console.print(f'schema: {before or "empty"} -> {after}' if before != after else f'schema already at {after}')


@db_app.command('seed')
def seed() -> None:
    """Create the demo accounts, agents and directories (deterministic and idempotent)."""
    run(_seed)


async def _seed() -> None:
    from agentrt.db.engine import close_database, init_database
    from agentrt.db.session import get_db_session
    from agentrt.services.demo_data import seed_demo_data

    await init_database()
    try:
        async with get_db_session() as session:
            report = await seed_demo_data(session=session)
    finally:
        await close_database()
    console.print(
        f'seeded: {report.inserted_entries:,} new directory entries; totals: {report.accounts} accounts, '
        f'{report.agent_instances} agent instances, {report.directory_entries:,} directory entries'
    )
