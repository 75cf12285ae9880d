"""Alembic migrations applied programmatically: `upgrade_if_behind()` and the revision it is at."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from agentrt.db.errors import AgentRuntimeError, ConfigError, DatabaseUnavailableError, MigrationError
from agentrt.db.failures import causes, raised_inside, sqlstate_of, unavailable_error
from agentrt.db.loop_lock import LockPerLoop
from agentrt.db.schema_version import MIGRATIONS_DIR as MIGRATIONS_DIR  # also this module's: tests repoint it
from agentrt.db.setup_failures import privilege_error

logger = logging.getLogger('agentrt.db')

MIGRATION_LOCK_KEY = 0x61677274
"""The transaction-level advisory lock migrations take (`migrations/env.py`): several processes migrating one database
(each `init_database()`, `agentrt db upgrade`) migrate one after another."""


def alembic_config() -> Config:
    """An Alembic config pointing at the packaged migrations (no alembic.ini needed)."""
    config = Config()
    config.set_main_option('script_location', str(MIGRATIONS_DIR))
    return config


def head_revision() -> str | None:
    """The newest migration shipped with this version of the runtime."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def known_revisions() -> frozenset[str]:
    """Every migration shipped with this version of the runtime."""
    return frozenset(script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions())


def ahead_of_this_version(revision: str | None) -> bool:
    """Whether a database at `revision` was migrated by a newer version of the runtime (a revision it does not ship)."""
    return revision is not None and revision not in known_revisions()


def _ahead_message(revision: str | None) -> str:
    return (
        f'the database schema is at {revision}, a revision this version of agentrt does not know (its newest is '
        f'{head_revision()}): a newer agentrt migrated it'
    )


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or None before the first migration.

    Raises:
        ConfigError: the login role may not read `alembic_version` (it neither owns the tables nor is a member of the
            runtime's roles): the message says what to grant, where it was an internal error quoting the SQL.
    """
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_current_revision)
    except DBAPIError as exc:
        # Every command and server start reads the revision first, as the login role itself.
        if (refused := privilege_error(exc, as_login_role=True, login=engine.url.username)) is not None:
            raise refused from exc
        raise


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(engine: AsyncEngine, revision: str = 'head') -> str | None:
    """Apply migrations up to `revision`, in one transaction under an advisory lock (one process at a time).

    Returns:
        The revision the database was at when this upgrade got the lock (None: empty), which is where it migrated
        from: another process's upgrade that held the lock meanwhile may have done it all already (then it is
        `revision`), where a read before the lock said the revision that one migrated from.

    Raises:
        MigrationError: a migration failed (with its own error); nothing was applied.
        DatabaseUnavailableError: the server could not be reached.
        ConfigError: `revision` names no migration, or the database is ahead of this version (a newer runtime
            migrated it): nothing was applied.
    """
    if not revision.strip():  # Alembic's answer was an AssertionError, reported as a failed migration
        raise ConfigError("no revision to migrate to: name one (e.g. 'head', the default)")
    before = await current_revision(engine)
    if ahead_of_this_version(before):
        # Alembic's own words were "Can't locate revision identified by '0014_...'", and `db status` said "behind".
        raise ConfigError(
            f'{_ahead_message(before)}; nothing was migrated. Run a version of agentrt that knows {before} (upgrade '
            'the package), or point DATABASE_URL / AGENTRT_DATA_DIR at another database'
        )
    try:
        async with _one_at_a_time(), engine.connect() as conn:
            return await conn.run_sync(_upgrade, revision, before)
    except AgentRuntimeError:
        raise
    except CommandError as exc:
        raise ConfigError(f'cannot migrate to {revision!r}: {exc}') from exc
    except AssertionError as exc:
        if not raised_inside(exc, 'alembic.script'):
            raise
        # Alembic's revision map asserts on some targets it cannot resolve (`head+1`): it was "AssertionError",
        # reported as a failed migration (exit 5); it is a name that resolves to no migration, as `+1` says.
        raise ConfigError(f'cannot migrate to {revision!r}: it names no migration after {before or "empty"}') from exc
    except Exception as exc:
        if (unavailable := unavailable_error(exc)) is not None:
            if _lock_timed_out(exc):
                raise DatabaseUnavailableError(await _lock_wait_message(engine, exc, before, revision)) from exc
            if _statement_timed_out(exc):
                raise DatabaseUnavailableError(await _statement_timeout_message(engine, before, revision)) from exc
            raise unavailable from exc
        raise MigrationError(
            f'migrating the schema from {before or "empty"} to {revision} failed: {_cause(exc)}. '
            f'Nothing was applied: the schema is still at {before or "empty"}'
        ) from exc


# One upgrade at a time per event loop. Alembic keeps the running migration in module globals (`alembic.context`,
# `alembic.op`), and two upgrades on one loop (two databases migrated with `asyncio.gather`) interleave at every
# statement: the second's context replaced the first's, which failed on the other's connection ("another operation
# is in progress") or lost its script (`KeyError: 'script'`). The advisory lock orders processes; this orders the
# upgrades of one process.
_one_at_a_time = LockPerLoop()


def _lock_timed_out(exc: BaseException) -> bool:
    """Whether a statement of the migration gave up waiting for a lock (`lock_timeout`, SQLSTATE 55P03)."""
    return any(sqlstate_of(error) == '55P03' for error in causes(exc))


def _statement_timed_out(exc: BaseException) -> bool:
    """Whether a statement of the migration ran longer than `statement_timeout` (SQLSTATE 57014, not an operator's
    cancel, which has the same code)."""
    return any(sqlstate_of(error) == '57014' and 'statement timeout' in str(error) for error in causes(exc))


async def _statement_timeout_message(engine: AsyncEngine, before: str | None, revision: str) -> str:
    """A migration's statement that ran out of `statement_timeout`: said as the migration's, with what helps (it said
    "the operation did not complete; retry once the database is less busy", and the same migration fails again)."""
    try:
        async with asyncio.timeout(5), engine.connect() as conn:
            limit = (await conn.execute(text("SELECT current_setting('statement_timeout')"))).scalar_one()
    except Exception:  # the limit is a courtesy: the failure itself is what is reported
        limit = 'DB_STATEMENT_TIMEOUT_MS'
    return (
        f'migrating the schema from {before or "empty"} to {revision} took longer than a statement may ({limit}, '
        f'DB_STATEMENT_TIMEOUT_MS) and was cancelled: nothing was applied: the schema is still at {before or "empty"}. '
        'A migration of a large table can take that long: raise DB_STATEMENT_TIMEOUT_MS for it (0: no limit, e.g. '
        '`DB_STATEMENT_TIMEOUT_MS=0 agentrt db upgrade`), then run the command again'
    )


# Who holds locks on the database's own tables (not their indexes; not the catalogs: any session's reads take those
# briefly), longest transaction first.
_LOCK_HOLDERS = text(
    """
    SELECT l.pid, coalesce(a.application_name, '') AS application, coalesce(a.state, '') AS state,
           extract(epoch FROM clock_timestamp() - a.xact_start) AS seconds,
           array_agg(DISTINCT c.relname::text ORDER BY c.relname::text) AS tables
    FROM pg_locks AS l
    JOIN pg_class AS c ON c.oid = l.relation
    LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
    WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid()
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND c.relkind IN ('r', 'p') AND c.relnamespace <> 'pg_catalog'::regnamespace
    GROUP BY l.pid, a.application_name, a.state, a.xact_start
    ORDER BY a.xact_start NULLS LAST
    LIMIT 5
    """
)


async def _lock_wait_message(engine: AsyncEngine, exc: BaseException, before: str | None, revision: str) -> str:
    """What a migration that waited `lock_timeout` for a table's lock, and gave up, says to a person: how long it
    waited, the sessions holding locks on the tables (the one it waited for among them: the tables its failed
    statement names first), and what to do. It said only "PostgreSQL stopped waiting for a lock that another session
    holds ... retry once that session has finished", with no word of the migration, the wait or the session."""
    start = (
        f'migrating the schema from {before or "empty"} to {revision} waited for a lock on a table that another '
        'session holds'
    )
    nothing = f'nothing was applied: the schema is still at {before or "empty"}'
    todo = (
        "end or finish that session's transaction, or raise DB_LOCK_TIMEOUT_MS for the migration; then run the "
        'command again (or `agentrt db upgrade`)'
    )
    try:
        async with asyncio.timeout(5), engine.connect() as conn:
            # A connection of the engine gets the `lock_timeout` the migration had (env.py restores it).
            waited = (await conn.execute(text("SELECT current_setting('lock_timeout')"))).scalar_one()
            rows = (await conn.execute(_LOCK_HOLDERS)).all()
    except Exception:  # the diagnosis is a courtesy: the failure itself is what is reported
        return f'{start}, and gave up (DB_LOCK_TIMEOUT_MS): {nothing}; find it in pg_locks and pg_stat_activity: {todo}'
    statement = str(getattr(exc, 'statement', '') or '')
    named = [row for row in rows if any(re.search(rf'\b{re.escape(t)}\b', statement) for t in row.tables)]
    holders = '; '.join(_holder(row) for row in (named or rows)[:3])
    after = f'{start}, and gave up after {waited}'
    if not holders:  # the session ended meanwhile
        return f'{after} (DB_LOCK_TIMEOUT_MS): {nothing}; no session holds one now: run the command again'
    return f'{after} (DB_LOCK_TIMEOUT_MS): {nothing}; held by {holders}: {todo}'


def session_label(pid: int, application: str) -> str:
    """A PostgreSQL session as a message names it: `pid N (application)`, the name left out when it has none."""
    return f'pid {pid} ({application})' if application else f'pid {pid}'


def _holder(row: Any) -> str:
    what = session_label(row.pid, row.application)
    if row.state:
        what += f', {row.state}'
    if row.seconds is not None:
        what += f' for {float(row.seconds):.0f} s'
    return f'{what}, on {", ".join(row.tables)} (SELECT pg_terminate_backend({row.pid}) ends it)'


def _cause(exc: BaseException) -> str:
    """The migration's own error: PostgreSQL's (class, message, SQLSTATE), without SQLAlchemy's SQL echo and link."""
    # The innermost error with a SQLSTATE: the driver's own class (DivisionByZeroError), not SQLAlchemy's wrapper.
    server_error = next((e for e in reversed(list(causes(exc))) if getattr(e, 'sqlstate', None)), None)
    error = server_error or getattr(exc, 'orig', None) or exc
    text = ' '.join(str(error).split())[:500] or type(error).__name__
    code = f' (SQLSTATE {server_error.sqlstate})' if server_error is not None else ''  # type: ignore[attr-defined]
    return f'{type(error).__name__}: {text}{code}'


@dataclass(frozen=True)
class MigrationLockHolder:
    """The PostgreSQL session holding the migration lock: an upgrade running now (`agentrt db upgrade`, or a process's
    `init_database()` migrating).

    Attributes:
        pid: its PostgreSQL backend (pg_locks knows no client's pid): `ps` shows a postgres process under it, not the
            agentrt one (QA).
        application: its `application_name` ('' when it has none).
        since: when its transaction, the upgrade's, began (None: pg_stat_activity hides it from this role).
        seconds: how long ago that was.
    """

    pid: int
    application: str
    since: datetime | None
    seconds: float | None

    def __str__(self) -> str:
        """`its PostgreSQL session: pid N (agentrt), since 2026-12-07 12:00:01 UTC (14 s ago)`."""
        said = f'its PostgreSQL session: {session_label(self.pid, self.application)}'
        if self.since is not None and self.seconds is not None:
            said += f', since {self.since.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC ({self.seconds:.0f} s ago)'
        return said


# The session holding the migration lock (a bigint advisory key: its high half is `classid`, its low half `objid`).
_MIGRATION_LOCK_HOLDER = text(
    "SELECT l.pid, coalesce(a.application_name, '') AS application, a.xact_start AS since,"
    ' extract(epoch FROM clock_timestamp() - a.xact_start) AS seconds'
    ' FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid'
    " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = :objid AND l.objsubid = 1"
    ' AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())'
)


def migration_lock_holder(connection: Connection) -> MigrationLockHolder | None:
    """The session holding the migration lock on `connection`'s database (an upgrade running now), or None."""
    row = connection.execute(_MIGRATION_LOCK_HOLDER, {'objid': MIGRATION_LOCK_KEY & 0xFFFFFFFF}).first()
    if row is None:
        return None
    seconds = None if row.seconds is None else float(row.seconds)
    return MigrationLockHolder(pid=row.pid, application=row.application, since=row.since, seconds=seconds)


async def running_upgrade(engine: AsyncEngine) -> MigrationLockHolder | None:
    """The session of an upgrade running now on `engine`'s database (`agentrt db status` says so), or None."""
    async with engine.connect() as conn:
        return await conn.run_sync(migration_lock_holder)


REVISION_AT_LOCK = 'agentrt_revision_at_lock'
"""The config attribute `migrations/env.py` sets to the revision it finds once it holds the migration lock."""


def _upgrade(connection: Connection, revision: str, before: str | None) -> str | None:
    config = alembic_config()
    config.attributes['connection'] = connection
    command.upgrade(config, revision)
    found: str | None = config.attributes.get(REVISION_AT_LOCK, before)  # `before`: an env.py that does not say
    return found


async def upgrade_if_behind(engine: AsyncEngine) -> bool:
    """Upgrade the schema when it is behind the packaged head; return True if it did."""
    current, head = await current_revision(engine), head_revision()
    if current == head:
        return False
    if ahead_of_this_version(current):
        # A rolling upgrade: processes of the older version start on the newer schema, as they do with
        # AGENTRT_AUTO_MIGRATE=false (`revision_behind`), rather than each failing on a revision it cannot migrate from.
        logger.warning('%s; not migrated: this process runs on it as it is', _ahead_message(current))
        return False
    logger.info('database schema at %s, upgrading to %s', current or 'empty', head)
    # False when another process's migration, which this one waited for, had brought it to head meanwhile.
    if await upgrade(engine) != head:
        return True
    # Said, or the "upgrading to ..." line above stood for a migration this process never ran (QA: several processes
    # starting at once on a fresh data directory each said it, and one of them migrated).
    logger.info('database schema at %s: another process upgraded it meanwhile; nothing migrated here', head)
    return False
