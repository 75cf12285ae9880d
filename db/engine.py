"""The process-wide engine and pool: `init_database()`, `close_database()`, `pool_status()`."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from agentrt.db.embedded import EmbeddedServer, release_embedded, start_embedded
from agentrt.db.errors import DatabaseNotInitializedError, DatabaseUnavailableError
from agentrt.db.settings import Settings, get_settings, mask_url, parse_database_url

logger = logging.getLogger('agentrt.db')


@dataclass
class _Runtime:
    settings: Settings
    url: URL
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    embedded: EmbeddedServer | None


_runtime: _Runtime | None = None
_init_lock = asyncio.Lock()


@dataclass(frozen=True)
class PoolStatus:
    """A snapshot of the connection pool."""

    size: int
    checked_out: int
    overflow: int
    checked_in: int
    max_overflow: int


async def init_database(settings: Settings | None = None, *, migrate: bool | None = None) -> AsyncEngine:
    """Create the engine, start the embedded server if needed, check the connection and migrate.

    Calling it again while initialised returns the existing engine.

    Args:
        settings: configuration to use; read from the environment when omitted.
        migrate: upgrade the schema when it is behind; defaults to `settings.auto_migrate`.

    Raises:
        ConfigError: a setting is invalid.
        EmbeddedPostgresError: the embedded server cannot start.
        DatabaseUnavailableError: the server cannot be reached within the connect timeout.
    """
    global _runtime
    async with _init_lock:
        if _runtime is not None:
            return _runtime.engine
        settings = settings or get_settings()
        embedded: EmbeddedServer | None = None
        if settings.database_url is None:
            embedded = await asyncio.to_thread(start_embedded, settings.data_dir)
            url = embedded.url()
            logger.info('embedded PostgreSQL: data in %s (socket %s)', embedded.data_dir, embedded.socket_dir)
        else:
            url = parse_database_url(settings.database_url)
        engine = build_engine(url, settings)
        try:
            await check_connection(engine, url, settings.connect_timeout)
            if settings.auto_migrate if migrate is None else migrate:
                from agentrt.db.migrate import upgrade_if_behind

                await upgrade_if_behind(engine)
        except BaseException:
            await engine.dispose()
            raise
        _runtime = _Runtime(
            settings=settings,
            url=url,
            engine=engine,
            sessionmaker=async_sessionmaker(engine, expire_on_commit=False, autoflush=False),
            embedded=embedded,
        )
        return engine


async def close_database(*, release_embedded_server: bool = False) -> None:
    """Dispose of the engine and its pool. Safe to call when not initialised.

    Args:
        release_embedded_server: also give up this process's hold on the embedded server (stopping it if no other
            process uses it), as process exit would; for processes that may end by a signal (`release_embedded`).
    """
    global _runtime
    runtime, _runtime = _runtime, None
    if runtime is not None:
        await runtime.engine.dispose()
        if release_embedded_server and runtime.embedded is not None:
            await asyncio.to_thread(release_embedded, runtime.embedded.data_dir)


def build_engine(url: URL, settings: Settings) -> AsyncEngine:
    """Create an async engine with the pool and per-connection timeouts from `settings`."""
    server_settings = {'application_name': 'agentrt'}
    if settings.statement_timeout_ms:
        server_settings['statement_timeout'] = str(settings.statement_timeout_ms)
    if settings.lock_timeout_ms:
        server_settings['lock_timeout'] = str(settings.lock_timeout_ms)
    connect_args: dict[str, Any] = {'timeout': settings.connect_timeout, 'server_settings': server_settings}
    if not settings.statement_cache:
        # PgBouncer in transaction mode hands each transaction to any server connection, where a statement
        # prepared on another one does not exist (field notes: 85 of 200 transactions failed without this).
        connect_args['statement_cache_size'] = 0
        url = url.update_query_dict({'prepared_statement_cache_size': '0'})
    engine = create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_pre_ping=settings.pool_pre_ping and settings.pool_pre_ping_idle == 0,
        pool_recycle=settings.pool_recycle,
        connect_args=connect_args,
    )
    # One broken connection should not throw away every healthy one in the pool (see field notes:
    # a third more throughput while backends are being killed).
    event.listen(engine.sync_engine, 'handle_error', _keep_pool_on_disconnect)
    if settings.pool_pre_ping and settings.pool_pre_ping_idle > 0:
        _ping_idle_connections(engine, settings.pool_pre_ping_idle)
    return engine


def _ping_idle_connections(engine: AsyncEngine, idle_s: float) -> None:
    """Test a connection before use only when it sat idle in the pool for more than `idle_s` seconds.

    SQLAlchemy's `pool_pre_ping` tests every checkout; with asyncpg that is BEGIN, SELECT 1, ROLLBACK, three
    round trips before each short session. The runtime opens a session per operation, so that cost is paid
    several times per chat turn (measured: about a fifth of the CPU per turn at 200+ concurrent chats). A
    connection that was in use moments ago is as alive as the ping would say; an idle one (server restart,
    idle timeout, failover) is what pre-ping exists for, and it still gets tested.
    """
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, 'checkin')
    def _mark_idle(dbapi_connection: Any, record: Any) -> None:
        record.info['agentrt_checked_in'] = time.monotonic()

    @event.listens_for(sync_engine, 'checkout')
    def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        checked_in = record.info.get('agentrt_checked_in')
        if checked_in is None or time.monotonic() - checked_in <= idle_s:
            return  # new, or in use a moment ago
        try:
            sync_engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool discards this connection and checks out (or opens) another one.
            raise DisconnectionError(f'connection failed its idle pre-ping: {exc}') from exc


def _keep_pool_on_disconnect(context: Any) -> None:
    if context.is_disconnect:
        context.invalidate_pool_on_disconnect = False


async def check_connection(engine: AsyncEngine, url: URL, connect_timeout: float) -> None:
    """Run `SELECT 1`, failing within `connect_timeout` seconds with the host and port.

    Raises:
        DatabaseUnavailableError: naming the server that could not be reached and why.
    """
    where = describe_server(url)
    try:
        async with asyncio.timeout(connect_timeout + 1):
            async with engine.connect() as conn:
                await conn.execute(text('SELECT 1'))
    except TimeoutError as exc:
        raise DatabaseUnavailableError(f'PostgreSQL at {where} did not answer within {connect_timeout:g}s') from exc
    except (OSError, socket.gaierror) as exc:
        raise DatabaseUnavailableError(f'cannot connect to PostgreSQL at {where}: {exc}') from exc
    except (OperationalError, InterfaceError, DBAPIError) as exc:
        reason = str(exc.orig) if exc.orig is not None else str(exc)
        raise DatabaseUnavailableError(f'cannot connect to PostgreSQL at {where}: {reason}') from exc


def describe_server(url: URL) -> str:
    """`host:port/database` (or the socket directory) for messages; never includes a password."""
    host = url.host or url.query.get('host') or 'localhost'
    port = url.port or url.query.get('port') or 5432
    return f'{host}:{port}/{url.database}'


def _require() -> _Runtime:
    if _runtime is None:
        raise DatabaseNotInitializedError('the database is not initialised: await init_database() first')
    return _runtime


def get_engine() -> AsyncEngine:
    """The process-wide engine. Raises `DatabaseNotInitializedError` before `init_database()`."""
    return _require().engine


def get_sessionmaker() -> async_sessionmaker[AsyncSession]:
    """The process-wide session factory behind `get_db_session()`."""
    return _require().sessionmaker


def current_settings() -> Settings:
    """The settings the database was initialised with."""
    return _require().settings


def server_info() -> dict[str, Any]:
    """The server URL (password masked), whether it is embedded, and its data directory."""
    runtime = _require()
    return {
        'url': mask_url(runtime.url),
        'embedded': runtime.embedded is not None,
        'data_dir': str(runtime.embedded.data_dir) if runtime.embedded else None,
    }


def pool_status() -> PoolStatus:
    """Report the pool's size, connections checked out, overflow in use and idle connections."""
    runtime = _require()
    pool: Any = runtime.engine.pool
    return PoolStatus(
        size=pool.size(),
        checked_out=pool.checkedout(),
        overflow=max(pool.overflow(), 0),
        checked_in=pool.checkedin(),
        max_overflow=runtime.settings.max_overflow,
    )
