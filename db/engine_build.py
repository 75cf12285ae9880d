"""Building an engine for a URL: its pool, connection arguments and timeouts (`build_engine`), the check that it
connects (`check_connection`), PgBouncer's detection at connect (`connect_engine`) and the engine migrations run on
(`migration_engine`).

Split from `agentrt.db.engine`, which holds the process's one runtime (start, accessors, shut-down) and re-exports
these names.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import URL, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext import asyncio as sqlalchemy_asyncio
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from agentrt.db.database_url import asyncpg_connect_args, parse_database_url
from agentrt.db.errors import ConfigError, DatabaseUnavailableError
from agentrt.db.failures import (
    connection_problem,
    given_up,
    pooler_refusal,
    refused_startup_parameter,
    unavailable_error,
)
from agentrt.db.pool_close import track_idle_connections
from agentrt.db.pool_health import PoolHealth
from agentrt.db.settings import Settings
from agentrt.db.setup_failures import login_error, pooler_error, setting_error
from agentrt.db.transaction_setup import PreludeConnection, TransactionSetup, client_wait, install_prelude

logger = logging.getLogger('agentrt.db')


async def connect_engine(url: URL, settings: Settings, setting: str = 'DATABASE_URL') -> tuple[AsyncEngine, Settings]:
    """`build_engine` and `check_connection`; with `DB_POOLER=auto`, switch to the pooler mode when PgBouncer is
    found between the runtime and the server, and return the settings in force. `setting` names the variable `url`
    came from, for a refused login's advice.

    PgBouncer shows itself two ways: it refuses the timeouts sent as startup parameters (its default), or it drops
    them (`ignore_startup_parameters`), so the server reports other timeouts than the ones sent. Either way the
    runtime would run with no timeouts at all; in the pooler mode they are set per transaction.

    Raises:
        ConfigError: a pooler is detected with `DB_POOLER=none`.
        DatabaseUnavailableError: as `check_connection`.
    """
    probe = settings
    if settings.pooler == 'auto' and not any(configured_timeouts(settings).values()):
        # No timeout to send at connect (both 0: none), so nothing PgBouncer could refuse or drop: it went undetected,
        # prepared statements on, and the first concurrent turns failed with "prepared statement ... already exists".
        # The check's connection sends one all the same (the longest there is); the runtime's connections do not.
        probe = settings.model_copy(update={'statement_timeout_ms': _PROBE_TIMEOUT_MS})
    engine = build_engine(url, probe)
    try:
        # The migration URL is the direct connection beside the pooler: not named as it.
        pooled = settings.pooled and setting == 'DATABASE_URL'
        in_force = await check_connection(engine, url, settings.connect_timeout, setting, pooled=pooled)
    except ConfigError as exc:
        await engine.dispose()
        parameter = refused_startup_parameter(exc)
        if parameter is None or settings.pooler != 'auto':
            raise
        return await _pooled(url, settings, f'it refused the startup parameter {parameter}', setting)
    except BaseException:
        await engine.dispose()
        raise
    dropped = [name for name, ms in configured_timeouts(probe).items() if ms and in_force.get(name) != ms]
    if dropped and not settings.pooled:
        await engine.dispose()
        reason = f'the server does not have the {" and ".join(dropped)} sent at connect (a pooler dropped them)'
        if settings.pooler == 'none':
            raise ConfigError(
                f'{reason}: with DB_POOLER=none the runtime would run without them; set DB_POOLER=pgbouncer (or '
                'auto) to set them per transaction'
            )
        return await _pooled(url, settings, reason, setting)
    if probe is not settings:
        await engine.dispose()
        engine = build_engine(url, settings)
    return engine, settings


_PROBE_TIMEOUT_MS = 2_147_483_647
"""The `statement_timeout` the detection's connection sends when the settings send none (PostgreSQL's maximum)."""


async def _pooled(url: URL, settings: Settings, reason: str, setting: str) -> tuple[AsyncEngine, Settings]:
    logger.warning(
        'a pooler (PgBouncer) is in front of %s: %s; pooler mode on (DB_POOLER=pgbouncer says so, and silences this)',
        describe_server(url),
        reason,
    )
    settings = settings.model_copy(update={'pooler': 'pgbouncer'})
    engine = build_engine(url, settings)
    try:
        await check_connection(engine, url, settings.connect_timeout, setting, pooled=setting == 'DATABASE_URL')
    except BaseException:
        await engine.dispose()
        raise
    return engine, settings


def configured_timeouts(settings: Settings) -> dict[str, int]:
    """The session timeouts the settings ask for, in milliseconds (0: none), by PostgreSQL setting name."""
    return {'statement_timeout': settings.statement_timeout_ms, 'lock_timeout': settings.lock_timeout_ms}


@asynccontextmanager
async def migration_engine(engine: AsyncEngine | None, settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The engine migrations run on: a small one on `DATABASE_MIGRATION_URL` (a direct connection when `DATABASE_URL`
    points at a pooler), closed when the block ends, else `engine` (None: there must be a `DATABASE_MIGRATION_URL`)."""
    if settings.migration_database_url is None:
        if engine is None:
            raise ValueError('no engine to migrate on: give one, or set DATABASE_MIGRATION_URL')
        yield engine
        return
    url = parse_database_url(settings.migration_database_url)
    direct, _ = await connect_engine(
        url, settings.model_copy(update={'pool_size': 1, 'max_overflow': 0}), 'DATABASE_MIGRATION_URL'
    )
    try:
        yield direct
    finally:
        await direct.dispose()


def build_engine(url: URL, settings: Settings) -> AsyncEngine:
    """Create an async engine with the pool, per-connection timeouts and the disconnect handling from `settings`; the
    client waits for each answer at most the statement timeout plus a margin (`client_wait`).

    In the pooler mode (`DB_POOLER=pgbouncer`) the statement caches are off and the timeouts ride on every
    transaction's BEGIN (`SET LOCAL`'s `set_config(..., true)`) instead of being startup parameters: PgBouncer
    refuses those or drops them, and a session setting would stay on a server connection other clients share.
    """
    server_settings = {'application_name': 'agentrt'}
    timeouts = configured_timeouts(settings)
    if not settings.pooled:
        server_settings.update({name: str(ms) for name, ms in timeouts.items() if ms})
    connect_args: dict[str, Any] = {
        'timeout': settings.connect_timeout,
        # The longest the client waits for an answer (a transaction with a statement timeout of its own waits that
        # plus the margin instead: `PreludeConnection.begin_as`): a frozen server cannot cancel its own statements.
        'command_timeout': client_wait(timeouts['statement_timeout']),
        'server_settings': server_settings,
        'connection_class': PreludeConnection,  # sends a transaction's prelude with its BEGIN (transaction_setup.py)
    }
    url, url_args = asyncpg_connect_args(url)
    connect_args.update(url_args)
    server_settings.update(url_args.pop('server_settings', {}))
    connect_args['server_settings'] = server_settings
    if not settings.statement_cache or settings.pooled:
        # PgBouncer in transaction mode hands each transaction to any server connection, where a statement
        # prepared on another one does not exist (field notes: 85 of 200 transactions failed without this).
        connect_args['statement_cache_size'] = 0
        url = url.update_query_dict({'prepared_statement_cache_size': '0'})
    # Looked up on the module at each call: tracing (agents/observability.py) wraps it there to instrument new engines.
    engine = sqlalchemy_asyncio.create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_pre_ping=False,  # PoolHealth pings, when and as often as needed
        pool_recycle=settings.pool_recycle,
        connect_args=connect_args,
        # A statement's parameters are what users wrote (messages, prompts, tool arguments): an error's text goes to
        # logs, CLI error lines and tracebacks, where the redaction catches only secret shapes.
        hide_parameters=True,
    )
    PoolHealth(
        engine,
        ping_idle_after=settings.pool_pre_ping_idle if settings.pool_pre_ping else None,
        bounded_ping=not settings.pooled,
    )
    per_transaction = TransactionSetup(
        lock_timeout_ms=timeouts['lock_timeout'] or None, statement_timeout_ms=timeouts['statement_timeout'] or None
    )
    install_prelude(engine, defaults=per_transaction if settings.pooled else None)
    track_idle_connections(engine)  # closed together at the runtime's end (`close_database`)
    return engine


async def check_connection(
    engine: AsyncEngine, url: URL, connect_timeout: float, setting: str = 'DATABASE_URL', *, pooled: bool = False
) -> dict[str, int]:
    """Read the timeouts in force in a transaction, failing within the connect timeout with the host and port: the
    `connect_timeout` of `url` when it sets one, else `connect_timeout` seconds (`DB_CONNECT_TIMEOUT`). A refused
    login's advice, and a timeout's message, name `setting`, the variable `url` came from.

    Returns:
        `statement_timeout` and `lock_timeout` in milliseconds (0: none), as the server applies them.

    Raises:
        DatabaseUnavailableError: naming the server that could not be reached and why (with what to do when it is
            an SSL problem).
        ConfigError: the server refused the login (a wrong password, an unknown role or database) or a server setting
            of the URL's `options`, or it is behind a pooler and the pooler mode is off (`DB_POOLER`).
    """
    # `(PgBouncer)` in the pooler mode, as a running process says it (`engine.server_address`): a pooler that is down
    # read as PostgreSQL refusing connections.
    where = describe_server(url) + (' (PgBouncer)' if pooled else '')
    # The URL's `connect_timeout` is the wait asyncpg is given (`build_engine`): bounded by DB_CONNECT_TIMEOUT instead,
    # `?connect_timeout=30` gave up after 11 s, and `?connect_timeout=1` after 1 s said "within 10s".
    seconds, source = effective_connect_timeout(url, connect_timeout, setting)
    try:
        async with asyncio.timeout(seconds + 1):
            async with engine.connect() as conn:
                return await timeouts_in_force(conn)
    except TimeoutError as exc:
        raise DatabaseUnavailableError(f'PostgreSQL at {where} did not answer within {seconds:g}s ({source})') from exc
    except Exception as exc:
        if (pooler := pooler_error(exc)) is not None:
            raise pooler from exc
        if (refused_by_pooler := pooler_refusal(exc)) is not None:
            # PgBouncer full (`max_client_conn`) or refusing clients while its logins fail: what to raise, as a running
            # process says it; at start-up it was only PgBouncer's own words, with no advice (QA).
            raise DatabaseUnavailableError(f'cannot connect to PostgreSQL at {where}: {refused_by_pooler}') from exc
        if (gave_up := given_up(exc)) is not None:
            # Connected: the server gave up on the check's statement (a DB_STATEMENT_TIMEOUT_MS of a few ms), which
            # was "cannot connect to PostgreSQL at ...: canceling statement due to statement timeout".
            raise DatabaseUnavailableError(f'{gave_up} (PostgreSQL at {where}, as the connection was checked)') from exc
        if unavailable_error(exc) is None and not isinstance(exc, DBAPIError | ssl.SSLError):
            raise
        if (refused := login_error(exc, where, setting) or setting_error(exc, where, setting)) is not None:
            raise refused from exc
        raise DatabaseUnavailableError(f'cannot connect to PostgreSQL at {where}: {connection_problem(exc)}') from exc


def effective_connect_timeout(url: URL, default: float, setting: str = 'DATABASE_URL') -> tuple[float, str]:
    """How long a connection to `url` is waited for, in seconds, and the setting that says so: the URL's own
    `connect_timeout` (`connect_timeout of DATABASE_URL`, `setting` naming the variable), which overrides
    `DB_CONNECT_TIMEOUT` (`default`)."""
    seconds = asyncpg_connect_args(url)[1].get('timeout')  # checked (1-600) when the settings were read
    if seconds is None:
        return default, 'DB_CONNECT_TIMEOUT'
    return float(seconds), f'connect_timeout of {setting}'


_TIMEOUTS_IN_FORCE = text(
    "SELECT name, setting::bigint FROM pg_settings WHERE name IN ('statement_timeout', 'lock_timeout')"
)


async def timeouts_in_force(conn: AsyncConnection | AsyncSession) -> dict[str, int]:
    """`statement_timeout` and `lock_timeout` in milliseconds as the server applies them in this transaction."""
    rows = (await conn.execute(_TIMEOUTS_IN_FORCE)).all()
    return {str(name): int(ms) for name, ms in rows}


def describe_server(url: URL) -> str:
    """`host:port/database` (or the socket directory) for messages; never includes a password. The `host` and `port`
    parameters first, as the dialect connects to them: `postgresql://...@127.0.0.1:5432/db?host=/nonexistent` was
    "at 127.0.0.1:5432/db: no server is listening on its Unix socket", naming an address never tried (qa170)."""
    hosts = url.query.get('host')
    if not hosts:
        return f'{url.host or "localhost"}:{url.port or 5432}/{url.database}'
    ports = url.query.get('port')
    if isinstance(hosts, tuple):  # `?host=a:5432&host=b:5432`: each with its port (a tuple was printed; QA)
        return f'{",".join(hosts)}/{url.database}'
    if hosts.count(':') == 1:  # `?host=db1:6432`, with its port
        return f'{hosts}/{url.database}'
    port = (ports[0] if isinstance(ports, tuple) else ports) or url.port or 5432
    return f'{hosts}:{port}/{url.database}'
