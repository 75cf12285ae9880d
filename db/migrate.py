"""Alembic migrations applied programmatically: `upgrade_if_behind()` and the revision it is at."""

from __future__ import annotations

import logging

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from agentrt.db.errors import AgentRuntimeError, ConfigError, MigrationError
from agentrt.db.failures import causes, privilege_error, raised_inside, unavailable_error
from agentrt.db.loop_lock import LockPerLoop
from agentrt.db.schema_version import MIGRATIONS_DIR as MIGRATIONS_DIR  # also this module's: tests repoint it

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


def _cause(exc: BaseException) -> str:
    """The migration's own error: PostgreSQL's (class, message, SQLSTATE), without SQLAlchemy's SQL echo and link."""
    # The innermost error with a SQLSTATE: the driver's own class (DivisionByZeroError), not SQLAlchemy's wrapper.
    server_error = next((e for e in reversed(list(causes(exc))) if getattr(e, 'sqlstate', None)), None)
    error = server_error or getattr(exc, 'orig', None) or exc
    text = ' '.join(str(error).split())[:500] or type(error).__name__
    code = f' (SQLSTATE {server_error.sqlstate})' if server_error is not None else ''  # type: ignore[attr-defined]
    return f'{type(error).__name__}: {text}{code}'


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
    return await upgrade(engine) != head
