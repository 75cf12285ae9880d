"""The process-wide engine and pool: `init_database()`, `close_database()`, `pool_status()`.

How an engine is built for a URL and checked (`build_engine`, `connect_engine`, `check_connection`, ...) is in
`agentrt.db.engine_build`; those names are re-exported here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from agentrt.db.database_url import mask_url, parse_database_url
from agentrt.db.embedded import EmbeddedServer, release_embedded, start_embedded
from agentrt.db.embedded_revival import EmbeddedRevival
from agentrt.db.engine_build import build_engine as build_engine
from agentrt.db.engine_build import check_connection as check_connection
from agentrt.db.engine_build import configured_timeouts as configured_timeouts
from agentrt.db.engine_build import connect_engine as connect_engine
from agentrt.db.engine_build import describe_server as describe_server
from agentrt.db.engine_build import effective_connect_timeout as effective_connect_timeout
from agentrt.db.engine_build import migration_engine as migration_engine
from agentrt.db.engine_build import timeouts_in_force as timeouts_in_force
from agentrt.db.errors import ConfigError, DatabaseNotInitializedError
from agentrt.db.forks import forget_in_child
from agentrt.db.loop_lock import LockPerLoop
from agentrt.db.pool_close import CLOSE_WAIT_SECONDS, close_idle_connections
from agentrt.db.schema_version import at_packaged_head
from agentrt.db.settings import Settings, get_settings
from agentrt.db.transaction_setup import RetryingSession, SetupSession, close_connections_of

logger = logging.getLogger('agentrt.db')


@dataclass
class _Runtime:
    settings: Settings
    url: URL
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    embedded: EmbeddedServer | None
    loop: asyncio.AbstractEventLoop
    """The event loop the pool's connections belong to."""
    schema_behind: str | None = None
    """The schema's revision when it was started behind this version's and not upgraded (`allow_behind`; `'none'`:
    never migrated), until `schema_caught_up()`; None otherwise."""
    closer: AsyncGenerator[None, None] | None = None
    """Started on `loop`, so the loop's end closes the pool (`_pool_closed_with_loop`); held here, as the loop holds
    its async generators only weakly."""


_runtime: _Runtime | None = None
# Per event loop: a lock shared by every loop failed the next `asyncio.run` whose first turns started together.
_init_lock = LockPerLoop()
_starting: asyncio.AbstractEventLoop | None = None
"""The event loop initialising the database, while it does (before `_runtime` names it)."""
_shut_down = False
"""The runtime was closed (`close_database`, by `shutdown_runtime()`) and not started again since."""
_start_tried = False
"""`init_database()` was called in this process, whether its start succeeded or not."""
_revival = EmbeddedRevival()
_forked = False
"""This process was forked from one whose runtime was running (or starting), and forgot it: said when it is used
before it started its own."""
_loops_guard = threading.Lock()  # the check that no other running loop owns the runtime, and the claim, in one step


def _forget_the_parents() -> list[object]:
    """In a forked child: the parent's runtime is not this process's (its loop, a copy, still says it runs; its
    connections are the parent's sockets). Forgotten, unclosed (`agentrt.db.forks`): the child's first session starts
    one of its own, and registers the child as a user of the embedded server."""
    global _runtime, _starting, _shut_down, _start_tried, _init_lock, _revival, _loops_guard, _forked
    left: list[object] = [_runtime, _starting, _init_lock, _revival]
    _forked = _forked or _runtime is not None or _starting is not None
    _runtime = _starting = None
    _shut_down = _start_tried = False
    _init_lock, _revival, _loops_guard = LockPerLoop(), EmbeddedRevival(), threading.Lock()
    return left


forget_in_child(_forget_the_parents)


@dataclass(frozen=True)
class PoolStatus:
    """A snapshot of the connection pool."""

    size: int
    checked_out: int
    overflow: int
    checked_in: int
    max_overflow: int


async def init_database(
    settings: Settings | None = None, *, migrate: bool | None = None, allow_behind: bool = False
) -> AsyncEngine:
    """Create the engine, start the embedded server if needed, check the connection and migrate.

    Calling it again while initialised returns the existing engine.

    Args:
        settings: configuration to use; read from the environment when omitted.
        migrate: upgrade the schema when it is behind; defaults to `settings.auto_migrate`.
        allow_behind: start even when the schema is behind and is not upgraded here (`AGENTRT_AUTO_MIGRATE=false`):
            a server, whose `/health/ready` says so while a migration job runs. Otherwise that is a `SchemaBehindError`
            (`migrate=False`, as `agentrt db status` and `db upgrade` pass, never checks).

    Raises:
        ConfigError: a setting is invalid. SchemaBehindError: the schema is behind and not upgraded here.
        EmbeddedPostgresError: the embedded server cannot start.
        DatabaseUnavailableError: the server cannot be reached within the connect timeout.
    """
    global _runtime, _start_tried
    _start_tried = True
    loop = asyncio.get_running_loop()
    starting = _claim_start(loop)
    try:
        async with _init_lock():
            if _runtime is not None and _runtime.loop is not loop and not _runtime.loop.is_running():
                # Started on an event loop that ended without `shutdown_runtime()` (`asyncio.run` called again), or
                # that is not running: its connections cannot be used, nor closed, from this loop (asyncpg's
                # "attached to a different loop"). Dropped, their sockets went with that loop; the database starts
                # afresh on this one.
                ended, _runtime = _runtime, None
                await ended.engine.dispose(close=False)
                close_connections_of(ended.loop)  # a closed loop's, its tasks' checked-out ones too
            if _runtime is not None:
                return _runtime.engine
            return await _start(settings, migrate=migrate, allow_behind=allow_behind, loop=loop)
    finally:
        if starting:
            _end_start(loop)


def _claim_start(loop: asyncio.AbstractEventLoop) -> bool:
    """Refuse `loop` when another running loop owns the runtime (or is starting it); mark `loop` as starting it when
    nobody owns it. Returns whether this call made the mark (and so must clear it)."""
    global _starting
    with _loops_guard:
        _refuse_another_loop(loop)
        if (_runtime is None or _runtime.loop is not loop) and _starting is None:
            _starting = loop
            return True
        return False


def _end_start(loop: asyncio.AbstractEventLoop) -> None:
    global _starting
    with _loops_guard:
        if _starting is loop:
            _starting = None


def check_event_loop() -> None:
    """Refuse to act on the runtime from this event loop while another one, running in another thread, has it.

    Raises:
        ConfigError: the runtime's connections belong to another event loop that is running.
    """
    loop = asyncio._get_running_loop()
    if loop is not None:
        with _loops_guard:
            _refuse_another_loop(loop)


def _refuse_another_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The pool's connections belong to the event loop that opened them: another loop running at the same time (in
    another thread) would share them and wait for ever on futures of the first."""
    owners = (_runtime.loop if _runtime is not None else None, _starting)  # the one that has it, one starting it
    if any(owner is not None and owner is not loop and owner.is_running() for owner in owners):
        raise ConfigError(
            'the runtime is in use on another event loop, running in another thread: its connections belong to that '
            'loop, and a process runs the runtime on one event loop at a time. Run this on that loop (from another '
            'thread: asyncio.run_coroutine_threadsafe(simple_chat(...), loop)), or shut the runtime down there first '
            '(await shutdown_runtime())'
        )


async def _start(
    settings: Settings | None, *, migrate: bool | None, allow_behind: bool, loop: asyncio.AbstractEventLoop
) -> AsyncEngine:
    """Start the database on `loop` (nobody has it): the embedded server or the URL, connect, migrate."""
    global _runtime, _shut_down
    settings = settings or get_settings()
    embedded: EmbeddedServer | None = None
    if settings.database_url is None:
        # A thread its caller's cancellation cannot stop: told, so a wait for another process's start gives up.
        cancelled = threading.Event()
        try:
            embedded = await asyncio.to_thread(start_embedded, settings.data_dir, cancelled=cancelled)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        url = embedded.url()
        # Said once, when the directory is first used (where the data lives); after that at DEBUG (`-v`): every
        # one-shot CLI command printed it.
        logger.log(
            logging.INFO if embedded.created else logging.DEBUG,
            'embedded PostgreSQL: data in %s (socket %s)',
            embedded.data_dir,
            embedded.socket_dir,
        )
    else:
        url = parse_database_url(settings.database_url)
    engine, settings = await connect_engine(url, settings)
    behind: str | None = None
    try:
        # At the packaged head (every start but the first after an upgrade), Alembic is not even imported.
        if (settings.auto_migrate if migrate is None else migrate) and not await at_packaged_head(engine):
            from agentrt.db.migrate import upgrade_if_behind

            async with migration_engine(engine, settings) as migrating:
                await upgrade_if_behind(migrating)
        elif migrate is None and not settings.auto_migrate:
            if not allow_behind:
                await _refuse_a_schema_behind(engine)
            else:
                from agentrt.db.schema_version import revision_behind

                behind = await revision_behind(engine)
    except BaseException:
        await engine.dispose()
        raise
    _runtime = _Runtime(
        settings=settings,
        url=url,
        engine=engine,
        sessionmaker=async_sessionmaker(
            engine,
            class_=RetryingSession,
            sync_session_class=SetupSession,
            expire_on_commit=False,
            autoflush=False,
        ),
        embedded=embedded,
        loop=loop,
        schema_behind=behind,
    )
    _close_pool_with_loop(_runtime)
    _shut_down = False
    return engine


def _close_pool_with_loop(runtime: _Runtime) -> None:
    """Arrange for the running loop's end to close `runtime`'s pooled connections (`_pool_closed_with_loop`)."""
    closer = _pool_closed_with_loop(runtime)
    try:  # iterated once, here: the running loop's hooks know it from now on, and close it as the loop ends
        closer.__anext__().send(None)
    except StopIteration:
        pass
    runtime.closer = closer


async def _pool_closed_with_loop(runtime: _Runtime) -> AsyncGenerator[None, None]:
    """Close `runtime`'s pooled connections when its event loop ends, if nothing closed them before.

    `asyncio.run()` ends by closing the loop's async generators, this one among them, while the loop still runs; a
    runtime left open (no `shutdown_runtime()`: `asyncio.run(simple_chat(...))` again and again) kept its pool's
    connections and their sockets, which no later loop can close (asyncpg's "attached to a different loop"), until
    the garbage collector found them: about 3 server backends more each run, 60 idle in one script (QA).
    """
    try:
        yield
    finally:
        # Still the process's runtime, on this loop (not shut down, nor following a later loop): its pool's idle
        # connections closed, the engine kept (the next loop's sessions open new ones, as `_follow` says).
        if _runtime is runtime and runtime.loop is asyncio.get_running_loop():
            # Closed at once, not each with a goodbye the server must answer: a server that did not answer (frozen, a
            # network that drops packets) held the loop's end 36 s a connection (QA). The engine is kept, with a new
            # pool and the old one's health record (as `_follow` does): the next loop's sessions open new ones.
            health = getattr(runtime.engine.sync_engine.pool, 'agentrt_health', None)
            close_connections_of(runtime.loop)
            runtime.engine.sync_engine.dispose(close=False)
            if health is not None:
                runtime.engine.sync_engine.pool.agentrt_health = health  # type: ignore[attr-defined]


async def close_database(*, release_embedded_server: bool = False) -> None:
    """Dispose of the engine and its pool. Safe to call when not initialised.

    Args:
        release_embedded_server: also give up this process's hold on the embedded server (stopping it if no other
            process uses it), as process exit would; for processes that may end by a signal (`release_embedded`).
    """
    global _runtime, _shut_down
    runtime, _runtime = _runtime, None
    if runtime is not None:
        _shut_down = True
        if runtime.loop is asyncio.get_running_loop():
            # Closed together, each goodbye bounded: `dispose()` closes them one by one, each waiting up to a
            # statement's whole wait for a server that does not answer (QA: 243 s for 6, a traceback each).
            unanswered = await close_idle_connections(runtime.engine)
            if unanswered:
                logger.warning(
                    'closing the pool: %d pooled connection(s) to PostgreSQL at %s did not answer within %g s (a '
                    'frozen server, or a network that drops packets?); closed without waiting for it',
                    unanswered,
                    _address(runtime),
                    CLOSE_WAIT_SECONDS,
                )
        # Connections of an event loop that has ended cannot be closed from this one (asyncpg's "attached to a
        # different loop"): dropped, their sockets went with that loop.
        await runtime.engine.dispose(close=not runtime.loop.is_closed())
        if release_embedded_server and runtime.embedded is not None:
            await asyncio.to_thread(release_embedded, runtime.embedded.data_dir)


def server_address() -> str | None:
    """Where the process's runtime connects, for the messages of connections that fail after its start: `host:port/db`,
    and `(PgBouncer)` in the pooler mode; None before the start."""
    runtime = _runtime
    return None if runtime is None else _address(runtime)


def _address(runtime: _Runtime) -> str:
    return describe_server(runtime.url) + (' (PgBouncer)' if runtime.settings.pooled else '')


def connect_timeout() -> tuple[float, str] | None:
    """How long the process's runtime waits for a connection (seconds) and the setting that says so
    (`DB_CONNECT_TIMEOUT`, or the `connect_timeout` of `DATABASE_URL`, which overrides it), for the message of a
    connection attempt that timed out; None before the start."""
    runtime = _runtime
    if runtime is None:
        return None
    return effective_connect_timeout(runtime.url, runtime.settings.connect_timeout)


def runtime_shut_down() -> bool:
    """Whether the runtime was shut down (`shutdown_runtime()`, the end of `agentrt_runtime()`) and not started again.

    Work still running then (a turn cut off at a stop while blocked on a frozen database) ends after it: its
    sessions raise `DatabaseNotInitializedError`, whose text advises a developer; this lets that work say what
    happened in an operator's terms instead, and start no retry that only the next start can do.
    """
    return _runtime is None and _shut_down


def refused_after_shutdown(error: BaseException) -> bool:
    """Whether `error` is a session refused because the runtime had shut down under it (a turn cut off at a stop,
    blocked on a frozen database, ended after it): the exception's text advises a developer calling the API too late
    ("start it with init_database()"), which an operator of `agentrt serve` can do nothing about, and only the next
    start can do what was refused (QA)."""
    return isinstance(error, DatabaseNotInitializedError) and runtime_shut_down()


def embedded_unreachable() -> None:
    """A connection to the embedded server of the process's runtime was lost or could not be made: have the server
    started again in the background if it stopped (`EmbeddedRevival`); nothing for a server of `DATABASE_URL`."""
    runtime = _runtime
    if runtime is not None and runtime.embedded is not None:
        _revival.request(runtime.embedded.data_dir)


def embedded_data_dir() -> Path | None:
    """The data directory of the embedded server the process's runtime uses, for messages; None without one."""
    runtime = _runtime
    return runtime.embedded.data_dir if runtime is not None and runtime.embedded is not None else None


def _require() -> _Runtime:
    runtime = _runtime
    if runtime is None and _shut_down:
        # A turn (or other work) that outlived `shutdown_runtime()`: "run inside agentrt_runtime()" misled.
        raise DatabaseNotInitializedError(
            'the runtime was shut down (shutdown_runtime(), or the end of agentrt_runtime()) and not started '
            'again: start it with init_database(); for a turn that was still running then, let turns end (or '
            'cancel them) before shutting down'
        )
    if runtime is None:
        raise DatabaseNotInitializedError(
            'the database is not initialised: run inside `async with agentrt.agents.runtime.agentrt_runtime():`, '
            'or await agentrt.db.engine.init_database() first'
            + (
                " (this process was forked from one whose runtime was running: the parent's is not this process's, "
                'which starts its own)'
                if _forked
                else ''
            ),
            never_started=not _start_tried,  # else a start failed: the database may come back
        )
    loop = asyncio._get_running_loop()
    if loop is not None and loop is not runtime.loop:
        with _loops_guard:
            _refuse_another_loop(loop)
            if _runtime is runtime and not runtime.loop.is_running():
                _follow(runtime, loop)
    return runtime


def _follow(runtime: _Runtime, loop: asyncio.AbstractEventLoop) -> None:
    """Give the pool to `loop`: the runtime's loop ended (or stopped) without `shutdown_runtime()`, and code of the
    program opens a session on a new one (`asyncio.run` again) before any turn started the database afresh.

    The old loop's connections are dropped, unclosed (closing one needs its loop: SQLAlchemy logged a traceback of
    "Event loop is closed" for each as it replaced them); the pool opens new ones on this loop. No I/O.
    """
    pool = runtime.engine.sync_engine.pool
    health = getattr(pool, 'agentrt_health', None)
    runtime.engine.sync_engine.dispose(close=False)
    close_connections_of(runtime.loop)  # a closed loop's, its tasks' checked-out ones too (an idle one's are left)
    if health is not None:
        runtime.engine.sync_engine.pool.agentrt_health = health  # type: ignore[attr-defined]
    runtime.loop = loop
    _close_pool_with_loop(runtime)


def get_engine() -> AsyncEngine:
    """The process-wide engine. Raises `DatabaseNotInitializedError` before `init_database()`."""
    return _require().engine


def schema_left_behind() -> str | None:
    """The schema's revision when the runtime was started on a schema behind this version's and allowed to
    (`init_database(allow_behind=True)` with `AGENTRT_AUTO_MIGRATE=false`; `'none'`: never migrated) and it has not
    caught up since; None otherwise, or before a start."""
    return _runtime.schema_behind if _runtime is not None else None


def schema_caught_up() -> None:
    """The schema is no longer behind (an upgrade ran meanwhile): `schema_left_behind()` says None from now on."""
    if _runtime is not None:
        _runtime.schema_behind = None


def current_engine() -> AsyncEngine | None:
    """The engine, or None when the database is not initialised."""
    return _runtime.engine if _runtime is not None else None


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


async def _refuse_a_schema_behind(engine: AsyncEngine) -> None:
    """Without it, a command on a schema left behind failed on its first statement with the driver's words (a role or a
    table that does not exist), as an internal error or a value the user gave."""
    from agentrt.db.errors import SchemaBehindError
    from agentrt.db.schema_version import packaged_head, revision_behind

    if (revision := await revision_behind(engine)) is not None:
        # `'none'` is a database never migrated: "at empty", as `agentrt db upgrade` says it ("schema at empty").
        raise SchemaBehindError(
            f"the database schema is at {'empty' if revision == 'none' else revision}, behind this version's "
            f'{packaged_head()} (AGENTRT_AUTO_MIGRATE is false, so it is not upgraded here): run `agentrt db upgrade`, '
            'or set AGENTRT_AUTO_MIGRATE=true'
        )
