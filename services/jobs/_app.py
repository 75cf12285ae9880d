"""The procrastinate app of the runtime's jobs, and its connection pool: opened once per process, on the queue's URL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any, LiteralString, Self

import psycopg
import psycopg_pool
from procrastinate import App, PsycopgConnector
from sqlalchemy.engine import URL

from agentrt.db.database_url import libpq_uri, mask_url
from agentrt.db.engine import current_settings, describe_server, get_engine
from agentrt.db.errors import ConfigError, DatabaseUnavailableError
from agentrt.db.failures import causes, pooler_refusal
from agentrt.db.forks import forget_in_child
from agentrt.db.loop_lock import LockPerLoop
from agentrt.db.pg_environment import embedded_libpq_parameters
from agentrt.db.settings import Settings, parse_database_url
from agentrt.db.setup_failures import login_error, login_refused, setting_error
from agentrt.services.jobs._manager import QueueJobManager

logger = logging.getLogger('agentrt.jobs')

QUEUE_POOL_SIZE = 2
"""psycopg connections a process keeps for the queue: deferring from a server, fetching and finishing in a worker."""


class QueueConnection(psycopg.AsyncConnection):
    """The queue's connections (its pool's and the worker's LISTEN connection, which procrastinate opens with the
    pool's `connection_class`): a connection attempt that is cancelled closes its socket at once.

    psycopg leaves a cancelled attempt's libpq connection in the frames of the `CancelledError`'s traceback, its
    socket open for as long as that exception is kept (a task keeps it; often only the cyclic garbage collector frees
    it). Cancelled before libpq sent its startup packet (during the TCP handshake, or after an `SSLRequest`, which
    libpq sends first unless `sslmode=disable`), it is a connection a PostgreSQL shutting down waits for: the
    postmaster forks a child for a connection that arrives while it shuts down, signals none of them, and waits for
    each to read a startup packet, up to `authentication_timeout` (60 s by default). A worker stopping as its server
    shuts down cancels procrastinate's listener while it connects again: a test server's fast stop was held a minute.
    The traceback of a cancellation is of no use here; dropping it frees the attempt, and libpq closes the socket.

    Each connection then has the session settings psycopg needs to read what procrastinate's queries return
    (`_PINNED`), whatever the environment, the URL's `options`, the role or the server configured.
    """

    @classmethod
    async def connect(cls, *args: Any, **kwargs: Any) -> Self:
        """`psycopg.AsyncConnection.connect`, leaving nothing open when cancelled, its session settings pinned."""
        try:
            connection = await super().connect(*args, **kwargs)
        except asyncio.CancelledError as cancelled:
            raise cancelled.with_traceback(None) from None
        try:
            await connection._pin_settings()
        except BaseException:
            await connection.close()
            raise
        return connection

    async def _pin_settings(self) -> None:
        """Set each of `_PINNED` the server reports otherwise (a statement only then: usually none)."""
        for name, wanted, statement in _PINNED:
            if (self.info.parameter_status(name) or '').upper().startswith(wanted):
                continue
            # The session's (not SET LOCAL): behind PgBouncer in transaction mode both are settings it keeps per
            # client, sent to each server connection it lends that client.
            await self.execute(statement)
        if self.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            await self.commit()  # the pool's connections are not autocommit: the SET opened a transaction


# The session settings psycopg cannot read the queue's rows without, and the value each is set to when the server
# reports another. DateStyle: libpq sends PGDATESTYLE as a startup setting, which no parameter of the URL overrides
# (its `options` are applied first), and psycopg cannot parse a timestamptz in another style: PGDATESTYLE=German
# ended `agentrt worker` at its first job, an internal error, the job left queued (QA). client_encoding: with
# PGCLIENTENCODING=SQL_ASCII psycopg returns text as bytes, and every job failed as "Task cannot be imported".
_PINNED: tuple[tuple[str, str, LiteralString], ...] = (
    ('DateStyle', 'ISO', "SET DateStyle TO 'ISO'"),
    ('client_encoding', 'UTF8', "SET client_encoding TO 'UTF8'"),
)


class _QueuePool(psycopg_pool.AsyncConnectionPool):
    """psycopg's pool, whose opening (procrastinate waits for it) gives up after the pool's own timeout
    (`DB_CONNECT_TIMEOUT`) rather than psycopg_pool's fixed 30 s, when the queue's server cannot be reached, and at
    once, with the server's error, when it refuses the login (`login_refused`: no wait changes that).

    Its `PoolTimeout` carries the last connection attempt's error (`last_connect_error`): psycopg's says only "pool
    initialization incomplete after 10.0 sec", and the cause (`database "x" does not exist`, a password refused)
    was in the warnings above the runtime's error line, never in it.
    """

    last_connect_error: Exception | None = None
    _refused: asyncio.Event | None = None
    """Set when a connection attempt's login is refused: the opening stops waiting."""

    async def open(self, wait: bool = False, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - psycopg's own
        refused = self._refused = asyncio.Event()
        opening = asyncio.ensure_future(super().open(wait, timeout=min(timeout, self.timeout)))
        waiting = asyncio.ensure_future(refused.wait())
        try:
            with _connect_failures.opening():
                await asyncio.wait((opening, waiting), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (opening, waiting):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if refused.is_set() and self.last_connect_error is not None:
            # psycopg retried a refused login until DB_CONNECT_TIMEOUT (four warnings), and the queue reported it as
            # an outage (exit 3: a process manager started the worker again and again).
            await self.close()
            raise self.last_connect_error
        try:
            opening.result()
        except psycopg_pool.PoolTimeout as exc:
            exc.last_connect_error = self.last_connect_error  # type: ignore[attr-defined]
            raise

    async def getconn(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - psycopg's own
        try:
            return await super().getconn(timeout)
        except psycopg_pool.PoolTimeout as exc:
            exc.last_connect_error = self.last_connect_error  # type: ignore[attr-defined]
            raise

    async def _connect(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - psycopg's own
        # psycopg's pool connects in its own tasks and only logs their failures: the last one is kept for the error.
        try:
            connection = await super()._connect(timeout)
        except Exception as exc:
            self.last_connect_error = exc
            if self._refused is not None and _refused_by_the_server(exc):
                self._refused.set()
            raise
        self.last_connect_error = None
        return connection


_POOL_NAME = 'agentrt-jobs'


class _OneLineConnectFailures(logging.Filter):
    """On psycopg's pool logger, its notices about the queue's pool in the runtime's words, one line each.

    A failed connection attempt (PostgreSQL down, a closed port) stays a warning: psycopg's own was four lines of raw
    driver text each ("error connecting in 'pool-1': connection failed: ... Is the server running on that host and
    accepting TCP/IP connections?"), four times over before the runtime's one error line.

    A connection that came back broken (PostgreSQL or PgBouncer went away while it was used) becomes a DEBUG line:
    psycopg warned "discarding closed connection: <QueueConnection [BAD] at 0x...>", beside the line of the failure
    itself, which the runtime reports already (the operation that used it raised `DatabaseUnavailableError`: a post-turn
    task's "not done: database unavailable", a worker's `error:` line).
    """

    quiet = 0
    """Above 0 while a worker waits for the queue to come back (`connect_failures_quiet`): it says so once, and its
    pool's failed attempts are DEBUG lines, not a warning each second."""
    opening_pools = 0
    """Above 0 while the queue's pool is opened (`opening`): a refused login ends the opening with its error, which
    says it; its warning ("trying again") would not be true."""

    def filter(self, record: logging.LogRecord) -> bool:
        """The record reworded when it is such a notice; False only for a discarded connection's with DEBUG off."""
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg == 'error connecting in %r: %s' and len(args) == 2 and args[0] == _POOL_NAME:
            failed = args[1]
            detail = _cause(failed) if isinstance(failed, BaseException) else ' '.join(str(failed).split())[:300]
            refused = isinstance(failed, BaseException) and _refused_by_the_server(failed)
            record.msg, record.args = 'the job queue cannot connect to PostgreSQL (%s); trying again', (detail,)
            if self.quiet or (refused and self.opening_pools):
                return _as_debug(record)
        elif (
            record.msg == 'discarding closed connection: %s' and len(args) == 1 and isinstance(args[0], QueueConnection)
        ):
            record.msg, record.args = 'the job queue dropped a connection PostgreSQL closed; a new one replaces it', ()
            return _as_debug(record)
        return True

    @contextlib.contextmanager
    def opening(self) -> Iterator[None]:
        """While the block runs, the queue's pool is being opened (`opening_pools`)."""
        self.opening_pools += 1
        try:
            yield
        finally:
            self.opening_pools -= 1


def _as_debug(record: logging.LogRecord) -> bool:
    """`record` as if logged at DEBUG: kept (as a DEBUG line) only when its logger shows DEBUG. A logger's filter runs
    after its level was checked, so the level is checked here again."""
    if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
        return False
    record.levelno, record.levelname = logging.DEBUG, 'DEBUG'
    return True


_connect_failures = _OneLineConnectFailures()
logging.getLogger('psycopg.pool').addFilter(_connect_failures)


@contextlib.contextmanager
def connect_failures_quiet() -> Iterator[None]:
    """While the block runs, the queue pool's failed connection attempts are DEBUG lines (a worker waiting for the
    queue to come back has said so once)."""
    _connect_failures.quiet += 1
    try:
        yield
    finally:
        _connect_failures.quiet -= 1


# The tasks register on it when `agentrt.services.jobs` is imported; the pool is given when the queue is opened.
jobs = App(connector=PsycopgConnector())
jobs.job_manager = QueueJobManager(connector=jobs.connector)

_open_on: asyncio.AbstractEventLoop | None = None
# Per event loop: one lock for the process failed the openings that waited on it in the next `asyncio.run`.
_lock = LockPerLoop()


def _forget_the_parents() -> list[object]:
    """In a forked child: the queue's pool is the parent's (its connections, which libpq would end with a goodbye to
    the server if collected); the child opens one of its own (`agentrt.db.forks`)."""
    global _open_on, _lock
    left: list[object] = [_open_on, _lock, jobs.connector]
    jobs.connector = jobs.job_manager.connector = PsycopgConnector()
    _open_on, _lock = None, LockPerLoop()
    return left


forget_in_child(_forget_the_parents)


def queue_conninfo(settings: Settings, engine_url: URL, *, hide_password: bool = False) -> str:
    """The libpq URL of the queue: `AGENTRT_QUEUE_DATABASE_URL`, else `DATABASE_URL`, else the embedded server's
    (`hide_password`: `***` for the password, for a message)."""
    url = _queue_url(settings, engine_url)
    if not (settings.queue_database_url or settings.database_url):
        # The embedded server's socket: every setting libpq would otherwise read from the environment is named, so
        # `PG*` variables meant for another server leave it alone (the engine's URL has its own moved to asyncpg's
        # arguments): `PGSSLROOTCERT=system`, `PGGSSENCMODE=require`, `PGCHANNELBINDING=require`... failed each of
        # the queue's connections, and post-turn jobs were dropped (QA). An empty value keeps a variable out.
        url = url.update_query_dict(embedded_libpq_parameters(psycopg.pq.version(), settings.connect_timeout))
    return libpq_uri(url, hide_password=hide_password)


def _queue_url(settings: Settings, engine_url: URL) -> URL:
    """The queue's URL as the runtime reads one (checked; without the embedded server's libpq parameters, which
    `parse_database_url` would refuse): its server and login, for a message."""
    given = settings.queue_database_url or settings.database_url
    return parse_database_url(given) if given else engine_url


def listens(settings: Settings) -> bool:
    """Whether workers wait for jobs with LISTEN/NOTIFY: not through a transaction pooler, where a LISTEN is lost
    when the pooler hands the server connection to another client (the workers poll instead). In the pooler mode,
    only when `AGENTRT_QUEUE_DATABASE_URL` names another address than `DATABASE_URL` (a direct connection): the same
    address is the pooler again."""
    if not settings.pooled:
        return True
    if settings.queue_database_url is None or settings.database_url is None:
        return False
    return _address(settings.queue_database_url) != _address(settings.database_url)


def _address(database_url: str) -> tuple[object, ...]:
    url = parse_database_url(database_url)
    return (url.host, url.port, url.database, url.query.get('host'), url.query.get('port'))


async def open_queue() -> App:
    """Open the queue for this process (once per event loop; safe from many tasks): a small psycopg pool on
    `queue_conninfo`, owned by a connector of its own.

    Raises:
        DatabaseUnavailableError: the queue's server cannot be reached within `DB_CONNECT_TIMEOUT`.
        ConfigError: its database has no job tables (another database than the runtime's, or not migrated).

    Prepared statements are off (`prepare_threshold=None`): behind PgBouncer in transaction mode psycopg's automatic
    ones collide (measured: 18 of 200 defers failed without it).
    """
    global _open_on
    async with _lock():
        loop = asyncio.get_running_loop()
        if _open_on is loop:
            return jobs
        settings = current_settings()
        conninfo = queue_conninfo(settings, get_engine().url)
        connector = PsycopgConnector(
            conninfo=conninfo,
            min_size=1,
            max_size=QUEUE_POOL_SIZE,
            timeout=settings.connect_timeout,
            kwargs={'prepare_threshold': None, 'application_name': 'agentrt-jobs'},
            pool_factory=_QueuePool,
            connection_class=QueueConnection,
            name=_POOL_NAME,
        )
        jobs.connector = jobs.job_manager.connector = connector  # as App.replace_connector does
        try:
            await jobs.open_async()
            has_tables = await jobs.check_connection_async()
        except Exception as exc:
            # The pool may be open (its first query failed, not its opening): closed here, or its tasks would go on
            # reconnecting in the background until the next opening replaced it ("Task was destroyed but it is
            # pending!" as it was collected).
            await jobs.close_async()
            if (refused := queue_refused(exc)) is not None:
                raise refused from exc
            if (unavailable := queue_unavailable(exc, 'cannot connect to PostgreSQL')) is not None:
                raise unavailable from exc
            raise
        if not has_tables:
            await jobs.close_async()
            raise ConfigError(
                f"the job queue's database at {mask_url(conninfo)} has no job tables (procrastinate_jobs): it must be "
                "the runtime's own database, migrated (`agentrt db upgrade`, migration 0011_procrastinate); "
                'AGENTRT_QUEUE_DATABASE_URL, when set, names that same database by a direct connection'
            )
        _open_on = loop
        logger.info('job queue open on %s', queue_conninfo(settings, get_engine().url, hide_password=True))
        return jobs


async def close_queue() -> None:
    """Close the queue's pool, if this process opened it."""
    global _open_on
    async with _lock():
        if _open_on is None:
            return
        _open_on = None
        await jobs.close_async()


def queue_unavailable(exc: BaseException, what: str) -> DatabaseUnavailableError | None:
    """The runtime's error for a failure of the queue's connections (psycopg's, wrapped by procrastinate in a
    `ConnectorException`, or the pool's `PoolTimeout`): PostgreSQL down, restarting, unreachable, a connection lost;
    None for any other exception, and for a login PostgreSQL refused, which no wait changes (`queue_refused`).

    Args:
        exc: what the queue raised.
        what: what failed, for the message (`cannot connect to PostgreSQL`, `lost PostgreSQL`...).
    """
    if _queue_login_refused(exc) is not None:
        return None
    for error in causes(exc):
        if isinstance(error, psycopg.OperationalError):  # psycopg_pool.PoolTimeout is one
            detail = _one_line(error)
            if isinstance(error, psycopg_pool.PoolTimeout):  # psycopg logged each attempt's error as a warning
                last = getattr(error, 'last_connect_error', None)
                # The cause first (a database or role that does not exist, a password refused): what to fix.
                detail = (
                    f'{_cause(last)} (no connection could be made within DB_CONNECT_TIMEOUT)'
                    if last is not None
                    else f'no connection could be made within DB_CONNECT_TIMEOUT ({detail})'
                )
            settings = current_settings()
            where = queue_conninfo(settings, get_engine().url, hide_password=True)
            # The queue's connections go to PgBouncer, which may be what went away; not a queue URL of its own (another
            # address: PostgreSQL itself, as README "Running several workers" advises), once called PgBouncer (QA).
            if settings.pooled and not listens(settings):
                what, where = what.replace('PostgreSQL', 'its database'), f'{where} (PgBouncer)'
            return DatabaseUnavailableError(f'the job queue {what} at {where}: {detail}')
    return None


def queue_refused(exc: BaseException) -> ConfigError | None:
    """The queue's login PostgreSQL refused (a wrong password, an unknown role or database: as `DATABASE_URL`'s, the
    line naming the variable to fix), or its login role refused procrastinate's tables or functions (SQLSTATE
    42501), as the `ConfigError` that says what to fix or grant; None for any other exception. procrastinate said only
    "Database error."."""
    if (refused := _queue_login_refused(exc)) is not None:
        return refused
    for error in causes(exc):
        if isinstance(error, psycopg.errors.InsufficientPrivilege):
            url = _queue_url(current_settings(), get_engine().url)
            login = url.username or 'the login role'
            return ConfigError(
                f"the job queue's login role ({login}) was refused its tables ({_primary(error)}): the queue runs as "
                "its URL's login role itself, which must own them or be a member of agentrt_jobs that inherits its "
                f'rights (GRANT agentrt_jobs TO {login}), with the schema at head (`agentrt db upgrade`: migration '
                '0016 grants them to agentrt_jobs; README "Background work")'
            )
    return None


def _refused_by_the_server(exc: BaseException) -> bool:
    """Whether the queue's server refused the connection: its login, or a server setting of the URL's `options`."""
    return login_refused(exc) is not None or setting_error(exc, '') is not None


def _queue_login_refused(exc: BaseException) -> ConfigError | None:
    """A login, or a server setting of the URL's `options`, the queue's server refused, as `login_error` and
    `setting_error` say it for `DATABASE_URL`, naming the variable the queue's URL came from; the cause of a pool's
    `PoolTimeout` (`last_connect_error`) too."""
    for error in causes(exc):
        for candidate in (error, getattr(error, 'last_connect_error', None)):
            if isinstance(candidate, BaseException) and _refused_by_the_server(candidate):
                settings = current_settings()
                where = describe_server(_queue_url(settings, get_engine().url))
                setting = 'AGENTRT_QUEUE_DATABASE_URL' if settings.queue_database_url else 'DATABASE_URL'
                return login_error(candidate, where, setting) or setting_error(candidate, where, setting, libpq=True)
    return None


def _primary(error: psycopg.Error) -> str:
    """PostgreSQL's own message, without the CONTEXT lines (the PL/pgSQL function of procrastinate's that ran it)."""
    return error.diag.message_primary or _one_line(error)


def _cause(error: BaseException) -> str:
    """Why a connection attempt failed, on one line: a full PgBouncer (max_client_conn), or one refusing clients while
    its logins fail, with what to raise, as the runtime's own connections say it; the queue's (psycopg's) said only
    PgBouncer's words (qa174)."""
    refused = pooler_refusal(error)
    return str(refused) if refused is not None else _one_line(error)


def _one_line(error: BaseException) -> str:
    return ' '.join(str(error).split())[:300] or type(error).__name__
