"""`agentrt db ...`: status, upgrade and seed."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import typer

from agentrt.agents.cli.support import console, run

if TYPE_CHECKING:
    from agentrt.db.status import JobQueueState

db_app = typer.Typer(help='Database: status, migrations and demo data.', no_args_is_help=True)


@db_app.command('status')
def status() -> None:
    """Show the server, the migration revision, the pool settings and row counts."""
    run(_status)


async def _status() -> None:
    from rich.table import Table
    from sqlalchemy.exc import ProgrammingError

    from agentrt.agents.observability import trace_export
    from agentrt.db.engine import (
        close_database,
        configured_timeouts,
        current_settings,
        get_engine,
        init_database,
        server_info,
        timeouts_in_force,
    )
    from agentrt.db.errors import ConfigError
    from agentrt.db.migrate import ahead_of_this_version, current_revision, head_revision, running_upgrade
    from agentrt.db.session import Unscoped, get_db_session
    from agentrt.db.settings import get_settings
    from agentrt.db.status import job_queue_state, roles_exist, server_version, session_timeouts, table_counts

    await init_database(migrate=False)
    try:
        info = server_info()
        settings = current_settings()
        async with get_db_session(account=Unscoped.OWNER) as session:
            version = await server_version(session=session)
            in_force = await timeouts_in_force(session)
            roles = await roles_exist(session=session)
        head = head_revision()
        try:
            revision, readable = await current_revision(get_engine()), True
        except (ProgrammingError, ConfigError):  # a login role without the runtime's roles: the session below says so
            revision, readable = None, False
        # The operator's role sees every row; before migration 0012 made it and granted it this database's tables, the
        # login role counts (the roles are the cluster's: another database's migration may have made them already).
        migrated = roles and (not readable or (revision is not None and revision >= ROW_LEVEL_SECURITY_REVISION))
        async with get_db_session(account=Unscoped.ADMIN if migrated else Unscoped.OWNER) as session:
            counts = await table_counts(session=session)
        # The queue's tables are procrastinate's, not under the runtime's roles: the login role's, as the queue's.
        queue: JobQueueState | str | None
        try:
            async with get_db_session(account=Unscoped.OWNER) as session:
                queue = await job_queue_state(session=session, alive_within_s=settings.jobs_stalled_seconds)
        except ConfigError as exc:
            # A member of the runtime's roles that does not own the tables (another role migrated them) read the rest;
            # the error's advice, to grant it the roles it has, would mislead: say what was refused instead.
            queue = f'not readable by the login role ({_denied(str(exc))}): its tables belong to the role that migrated'
        session_defaults = await session_timeouts(get_engine())
        # After the revision: an upgrade found running had not committed when the revision was read.
        upgrading = await running_upgrade(get_engine())
    finally:
        await close_database()
    kind = f'embedded (data in {info["data_dir"]})' if info['embedded'] else 'external (DATABASE_URL)'
    table = Table(title='agentrt database', show_header=False, title_justify='left')
    table.add_column(style='bold')
    table.add_column(overflow='fold')
    table.add_row('server', info['url'])
    table.add_row('kind', kind)
    table.add_row('PostgreSQL', version)
    behind = '' if revision == head else f' (behind: head is {head}; run `agentrt db upgrade`)'
    if ahead_of_this_version(revision):  # `db upgrade` cannot help: it does not know the revision
        behind = f' (ahead: this version of agentrt knows up to {head}; a newer agentrt migrated it)'
    if upgrading is not None:
        # It said "behind ... run `agentrt db upgrade`" while one ran, and a second one only waits for the first (QA).
        behind = (
            f' (an upgrade is running now, {upgrading}: the schema is at this revision until it commits; wait for it '
            'rather than starting another `agentrt db upgrade`, which would only wait for it)'
        )
    table.add_row('migration', f'{revision or "none"}{behind}')
    table.add_row(
        'pool',
        f'size {settings.pool_size}, max overflow {settings.max_overflow}, timeout {settings.pool_timeout:g}s, '
        f'pre-ping {settings.pool_pre_ping}, recycle '
        f'{"never" if settings.pool_recycle < 0 else f"{settings.pool_recycle}s"}',  # -1: never (it said -1s)
    )
    # The settings in force say `pgbouncer` once `auto` detected it; the environment's say what was asked for.
    table.add_row('pooler', _pooler_line(settings.pooled, get_settings().pooler))
    table.add_row('timeouts', _timeouts_line(configured_timeouts(settings), in_force, settings.connect_timeout))
    if settings.pooled:
        # Statements outside a transaction (autocommit: the budget admission) get the role's or server's defaults.
        table.add_row('outside transactions', _in_force_line(session_defaults))
    table.add_row('tracing', trace_export().describe())
    table.add_row('background', _background_line(settings.background, settings.queue_database_url))
    table.add_row('job queue', _queue_line(queue, settings.background == 'queue', settings.jobs_stalled_seconds))
    for name, count in counts.items():
        table.add_row(f'rows: {name}', 'missing (not migrated)' if count is None else str(count))
    console.print(table)


ROW_LEVEL_SECURITY_REVISION = '0012_row_level_security'
"""The migration that made the operator's role and granted it the tables (revisions sort by their number)."""


def _background_line(mode: str, queue_url: str | None) -> str:
    if mode == 'inline':
        return 'inline (AGENTRT_BACKGROUND): in the process that ran the turn (titles, summaries, usage rollups)'
    from agentrt.db.database_url import mask_url

    where = f'; queue connection {mask_url(queue_url)} (AGENTRT_QUEUE_DATABASE_URL)' if queue_url else ''
    return f'queue (AGENTRT_BACKGROUND): durable jobs run by `agentrt worker`{where}'


def _denied(message: str) -> str:
    """PostgreSQL's own "permission denied for table ..." that a `ConfigError` quotes, in parentheses."""
    found = re.search(r'\((permission denied [^)]*)\)', message)
    return found.group(1) if found else message


def _queue_line(queue: JobQueueState | str | None, used: bool, alive_within_s: float) -> str:
    if isinstance(queue, str):  # what kept it from being read
        return queue
    if queue is None:
        return 'missing (not migrated: `agentrt db upgrade`)'
    jobs = f'{queue.waiting:,} waiting, {queue.running:,} running, {queue.failed:,} failed'
    if queue.stalled:  # taken by a worker that is gone: a live worker's stalled-job check runs them again
        jobs += f', {queue.stalled:,} stalled (their worker is gone; a live worker runs them again)'
    if not used:  # no worker is expected; jobs left from a time in queue mode still wait for one
        left = '; `agentrt worker --burst` runs the waiting ones' if queue.waiting else ''
        return f'not used (AGENTRT_BACKGROUND=inline): {jobs}{left}'
    if not queue.workers_alive:
        return f'{jobs}; no worker alive (none sent a heartbeat in the last {alive_within_s:g}s)'
    return f'{jobs}; {queue.workers_alive} worker{"s" if queue.workers_alive != 1 else ""} alive'


def _pooler_line(pooled: bool, configured: str) -> str:
    if not pooled:
        return f'none (DB_POOLER={configured}: direct connections, timeouts set at connect)'
    how = 'detected' if configured != 'pgbouncer' else 'DB_POOLER=pgbouncer'
    return f'pgbouncer, transaction mode ({how}): statement caches off, timeouts set per transaction'


def _timeouts_line(configured: dict[str, int], in_force: dict[str, int], connect_timeout: float) -> str:
    parts = []
    for name, ms in configured.items():
        actual = in_force.get(name)
        label = name.removesuffix('_timeout')
        shown = f'{label} {_ms(ms)}'
        if actual != ms:
            shown += f' (in force: {_ms(actual)}; not what was configured)'
        parts.append(shown)
    return ', '.join(parts) + f', connect {connect_timeout:g}s (read back from the server)'


def _in_force_line(in_force: dict[str, int]) -> str:
    shown = (
        f'{name.removesuffix("_timeout")} {_ms(in_force.get(name))}' for name in ('statement_timeout', 'lock_timeout')
    )
    return ', '.join(shown) + (" (the role's defaults: ALTER ROLE ... SET statement_timeout = ...)")


def _ms(value: int | None) -> str:
    if value is None:
        return 'unknown'
    return 'none' if value == 0 else f'{value} ms'


@db_app.command('upgrade')
def upgrade_cmd(revision: str = typer.Argument('head', help='Target revision.')) -> None:
    """Apply the schema migrations."""
    run(_upgrade, revision)


async def _upgrade(revision: str) -> None:
    from agentrt.db.engine import close_database, get_engine, init_database, migration_engine
    from agentrt.db.migrate import current_revision, upgrade
    from agentrt.db.settings import get_settings

    settings = get_settings()
    if settings.migration_database_url is not None:
        # Only DATABASE_MIGRATION_URL (a direct connection beside a pooler's DATABASE_URL): the pooler is not used
        # here, and a migration job run before it was up failed on "cannot connect" to it.
        engine = None
    else:
        await init_database(migrate=False)
        engine = get_engine()
    try:
        async with migration_engine(engine, settings) as migrating:
            # The revision under the migration lock: a `db upgrade` that waited for another one's finds nothing to do.
            before = await upgrade(migrating, revision)
            after = await current_revision(migrating)
    finally:
        await close_database()
    if before != after:
        console.print(f'schema: {before or "empty"} -> {after}')
    elif revision not in ('head', 'heads') and not (after or '').startswith(revision):  # an earlier one: a no-op
        console.print(f'schema at {after}, already past {revision}: nothing to do (db upgrade never downgrades)')
    else:
        console.print(f'schema already at {after}')


@db_app.command('seed')
def seed() -> None:
    """Create the demo accounts, agents and directories (deterministic and idempotent)."""
    run(_seed)


async def _seed() -> None:
    from agentrt.db.engine import close_database, init_database
    from agentrt.db.session import Unscoped, get_db_session
    from agentrt.services.demo_data import seed_demo_data

    await init_database()
    try:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            report = await seed_demo_data(session=session)
    finally:
        await close_database()
    console.print(
        f'seeded: {report.inserted_entries:,} new directory entries; totals: {report.accounts} accounts, '
        f'{report.agent_instances} agent instances, {report.directory_entries:,} directory entries'
    )
