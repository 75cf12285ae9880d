"""Database failures recognised and reported as what they are: a lost connection, a server that is not there.

The driver raises a dozen exception types for these (asyncpg's own, SQLAlchemy's wrappers, plain `OSError`s, SQLSTATE
classes 08 and 57P; a statement given up on, a transaction aborted in a conflict); `unavailable_error()` turns each
into one of the runtime's two errors, which name the server state and what the caller may do. `get_db_session()`
applies it, so no raw driver error of this kind leaves a session block. Errors that are the set-up's rather than an
outage (a login refused, a privilege missing, an unannounced pooler) are in `agentrt.db.setup_failures`.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from typing import Any

import sqlalchemy.exc

from agentrt.db.errors import DatabaseDisconnectedError, DatabaseUnavailableError, InvalidInputError

# A connection that raised one of these is broken for good: its session state is gone or unknown.
_LOST_CONNECTION_CLASSES = frozenset(
    {
        'ConnectionDoesNotExistError',  # 08003
        'ConnectionFailureError',  # 08006
        'AdminShutdownError',  # 57P01: terminated by pg_terminate_backend or a fast shutdown
        'CrashShutdownError',  # 57P02
        'InternalClientError',  # asyncpg's protocol state machine is out of step (sqlalchemy issue 13241)
        'ProtocolViolationError',  # 08P01
    }
)
# The server is not accepting connections now (restarting, full, refusing, unreachable).
_CANNOT_CONNECT_CLASSES = frozenset(
    {
        'CannotConnectNowError',  # 57P03: starting up or shutting down
        # No host of the URL is what `target_session_attrs` asks for (a primary, a standby): an `InternalClientError`
        # to asyncpg, which read as a connection broken "mid-operation" (QA).
        'TargetServerAttributeNotMatched',
        'TooManyConnectionsError',  # 53300
        'ClientCannotConnectError',  # 08001
        'ConnectionRejectionError',  # 08004
    }
)
# A statement or transaction PostgreSQL gave up on, the connection intact, with what happened and what to do: it
# waited longer than `lock_timeout` for a lock another session holds (55P03); it ran longer than `statement_timeout`,
# or an operator cancelled it (57014); it was aborted in a conflict with a concurrent transaction, a deadlock broken by
# ending this side (40P01) or a snapshot a concurrent commit made stale (40001, REPEATABLE READ and SERIALIZABLE). None
# is a bug of the caller's nor a broken connection, and the same operation run again normally succeeds.
_GAVE_UP_SQLSTATES = {
    '55P03': (
        'PostgreSQL stopped waiting for a lock that another session holds ({error}; DB_LOCK_TIMEOUT_MS)',
        'the operation did not complete; retry once that session has finished',
    ),
    '57014': (
        'PostgreSQL cancelled a statement ({error}; a statement runs at most DB_STATEMENT_TIMEOUT_MS)',
        'the operation did not complete; retry once the database is less busy',
    ),
    '40P01': (
        'PostgreSQL broke a deadlock with another session by ending this transaction ({error})',
        'the operation did not complete (rolled back); retrying it normally succeeds',
    ),
    '40001': (
        'PostgreSQL aborted this transaction in a conflict with a concurrent one ({error})',
        'the operation did not complete (rolled back); retrying it normally succeeds',
    ),
}
_LOST_CONNECTION_MESSAGES = ('connection is closed', 'another operation is in progress', 'connection was closed')


class StatementNotAnswered(Exception):
    """PostgreSQL did not answer a statement (or a BEGIN, a COMMIT) within the client's wait for it: the transaction's
    statement timeout plus a margin (`agentrt.db.transaction_setup.client_wait`). The server's own timeout would have
    cancelled the statement first had it been running: it is frozen or overloaded past answering, or the network
    between drops packets. The connection is discarded; the operation did not complete, or its commit's outcome is
    unknown. Reported as `DatabaseDisconnectedError` (`unavailable_error`).

    Attributes:
        seconds: how long the client waited (None when unknown).
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        waited = f'within {seconds:g}s' if seconds is not None else 'within the wait for it'
        super().__init__(f'PostgreSQL did not answer {waited}')

    @classmethod
    def of(cls, exc: BaseException, driver: Any) -> StatementNotAnswered | None:
        """The error for `exc` when it is asyncpg's `TimeoutError` for an answer `driver` (the asyncpg connection it
        ran on, a `PreludeConnection`) waited too long for, else None. A caller's own timeout reaches the driver as a
        cancellation, never as this."""
        if type(exc) is not TimeoutError or not raised_inside(exc, 'asyncpg.'):
            return None
        waiting = getattr(driver, 'waiting', None)
        return cls(waiting() if callable(waiting) else None)


def lost_connection(exc: BaseException) -> bool:
    """True when `exc` says the connection broke while in use (killed backend, restart, network cut)."""
    for error in _chain(exc):
        if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
            return True
        if isinstance(error, sqlalchemy.exc.DisconnectionError):
            return True
        if class_names(error) & _LOST_CONNECTION_CLASSES and not _no_such_session_kind(exc):
            return True
        if type(error).__name__ == 'InterfaceError' and any(m in str(error) for m in _LOST_CONNECTION_MESSAGES):
            return True
        if isinstance(error, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
            return True
    return False


def pool_exhausted(exc: BaseException) -> bool:
    """True when `exc` is (or was raised from) the pool's checkout timeout: every connection of the process's pool
    stayed in use for `DB_POOL_TIMEOUT`, the process at capacity rather than PostgreSQL away."""
    return any(isinstance(error, sqlalchemy.exc.TimeoutError) for error in _chain(exc))


def _no_such_session_kind(exc: BaseException) -> bool:
    """No host of the URL is the kind `target_session_attrs` asks for: asyncpg's `TargetServerAttributeNotMatched`,
    an `InternalClientError` (SQLAlchemy's adapted one in front of it), which is no connection broken in use."""
    return any(type(error).__name__ == 'TargetServerAttributeNotMatched' for error in _chain(exc))


def out_of_step(error: BaseException | None) -> bool:
    """asyncpg's `InternalClientError` (and "another operation is in progress"): the connection's protocol state
    no longer matches the server's, typically after its backend was killed mid-statement. SQLAlchemy's disconnect
    test asks only whether the socket is closed yet, so such a connection could go back to the pool. Also a
    prepared statement lost behind a pooler: the connection's statement cache is wrong from then on."""
    if error is None or _no_such_session_kind(error):
        return False
    seen = 0
    while error is not None and seen < 8:
        if _protocol_out_of_step(error):
            return True
        if type(error).__name__ in ('InvalidSQLStatementNameError', 'DuplicatePreparedStatementError'):
            return True
        error = error.__cause__ or getattr(error, 'orig', None) or error.__context__
        seen += 1
    return False


def _protocol_out_of_step(error: BaseException) -> bool:
    """asyncpg's own complaint that the connection's protocol state does not match the server's (`out_of_step`)."""
    name = type(error).__name__
    return name == 'InternalClientError' or (name == 'InterfaceError' and 'another operation' in str(error))


def cannot_connect(exc: BaseException) -> bool:
    """True when `exc` says no connection could be made: server down, starting, full, unreachable, timed out."""
    for error in _chain(exc):
        if class_names(error) & _CANNOT_CONNECT_CLASSES:
            return True
        # Connecting raises plain OSErrors (refused, no such socket file, unreachable, timed out: builtin
        # TimeoutError is one); only those raised inside the driver count, not a tool's own file or timeout.
        if isinstance(error, OSError) and _raised_in_driver(error):
            return True
    return False


def unavailable_error(exc: BaseException) -> DatabaseUnavailableError | None:
    """The runtime's error for a database failure of the connection kind, or None for any other exception.

    Args:
        exc: what a database operation raised.

    Returns:
        `DatabaseDisconnectedError` when the connection was lost while in use (the operation did not complete,
        or its commit's outcome is unknown; safe to repeat if the operation is idempotent), `DatabaseUnavailableError`
        when no connection could be made or none was free in time; None otherwise.
    """
    if isinstance(exc, DatabaseUnavailableError):
        return exc
    if isinstance(exc, sqlalchemy.exc.TimeoutError):  # the pool's checkout timeout
        # In the runtime's words: SQLAlchemy's ("QueuePool limit of size 1 overflow 0 reached, connection timed out,
        # timeout 0.00 (Background on this error at: https://sqlalche.me/...)") rounded the wait and linked its docs.
        return DatabaseUnavailableError(
            f'no database connection became free {_pool_wait()}: the pool is exhausted; '
            'raise DB_POOL_SIZE / DB_MAX_OVERFLOW or lower the concurrency'
        )
    if (refused := pooler_refusal(exc)) is not None:
        return refused
    if (silent := not_answered(exc)) is not None:  # before `cannot_connect`: asyncpg's TimeoutError is an OSError
        return DatabaseDisconnectedError(
            f'PostgreSQL{at_server()} did not answer a statement {_waited(silent)}: the server is frozen or '
            'overloaded, or the network between drops its packets; the connection was closed and the operation did '
            'not complete (if it was committing, whether it did is unknown)'
        )
    if lost_connection(exc):
        return DatabaseDisconnectedError(
            f'the connection to PostgreSQL was lost ({_root_message(exc)}); the operation did not complete '
            '(server restart, failover or a terminated backend)'
        )
    if cannot_connect(exc):
        return DatabaseUnavailableError(f'cannot connect to PostgreSQL{at_server()}: {_connect_failure(exc)}')
    if (gave_up := given_up(exc)) is not None:
        return DatabaseUnavailableError(gave_up)
    if (full := disk_full(exc)) is not None:
        return DatabaseUnavailableError(full)
    return None


def _pool_wait() -> str:
    """How long a checkout waited, and the pool's size, in words with their settings."""
    from agentrt.db.engine import current_engine  # the engine imports this module

    engine = current_engine()
    pool: Any = engine.sync_engine.pool if engine is not None else None
    try:
        timeout, size, overflow = float(pool.timeout()), int(pool.size()), int(pool._max_overflow)
    except Exception:  # not a queue pool (or none): the words alone
        return 'in time (DB_POOL_TIMEOUT)'
    return (
        f"within {timeout:g}s (DB_POOL_TIMEOUT) while all {size + overflow} of the pool's connections were in use "
        f'(DB_POOL_SIZE {size} + DB_MAX_OVERFLOW {overflow})'
    )


def not_answered(exc: BaseException) -> StatementNotAnswered | None:
    """The `StatementNotAnswered` in `exc`'s chain (a server that did not answer in time), or None. An operation that
    failed so is not worth repeating at once: the server that did not answer is most likely still not answering, and a
    repeat waited for a new connection's `DB_CONNECT_TIMEOUT` on top, then hid this error behind "cannot connect"."""
    return next((error for error in _chain(exc) if isinstance(error, StatementNotAnswered)), None)


def _waited(silent: StatementNotAnswered) -> str:
    """How long the client waited, in words with where the figure comes from."""
    from agentrt.db.transaction_setup import CLIENT_WAIT_MARGIN_SECONDS  # imports this module

    if silent.seconds is None:
        return 'within the wait for its answer'
    return (
        f'within {silent.seconds:g}s (its statement timeout, DB_STATEMENT_TIMEOUT_MS or its own, plus '
        f'{CLIENT_WAIT_MARGIN_SECONDS:g}s)'
    )


def too_large(exc: BaseException) -> InvalidInputError | None:
    """The error for a value PostgreSQL cannot hold (SQLSTATE class 54, "program limit exceeded": a jsonb value over
    256 MB, a text over 1 GB), else None. It was a raw driver error from a turn's save (QA: a 90 MB tool result, the
    history's JSON past the jsonb limit); the transaction was rolled back, nothing of it stored."""
    for error in _chain(exc):
        if sqlstate_of(error).startswith('54'):
            return InvalidInputError(
                f'PostgreSQL cannot hold a value this large ({first_line(error)}): a text value is at most 1 GB and a '
                'JSON one 256 MB (a message, a tool result or a conversation this large); the operation did not '
                'complete and nothing of it was stored',
                field='value',
            )
    return None


def disk_full(exc: BaseException) -> str | None:
    """What to tell a person when PostgreSQL could not write for want of disk space (SQLSTATE 53100, `could not
    extend file ...: No space left on device`), else None: the operation was rolled back, nothing of it stored, and it
    succeeds again once space is freed. Unmapped, it was an internal error (exit 70, an HTTP 500 with a traceback)."""
    for error in _chain(exc):
        if sqlstate_of(error) == '53100':
            return (
                f'PostgreSQL{at_server()} ran out of disk space ({first_line(error)}): free space on the file system '
                f'of {_data_directory()}; the operation did not complete (rolled back), run it again once there is room'
            )
    return None


def _data_directory() -> str:
    """The embedded server's data directory (`AGENTRT_DATA_DIR`), or the words for another server's."""
    from agentrt.db.engine import embedded_data_dir  # the engine imports this module

    where = embedded_data_dir()
    return f'its data directory {where} (AGENTRT_DATA_DIR)' if where is not None else "the server's data directory"


def at_server() -> str:
    """` at host:port/db` of the runtime (PgBouncer's address when it is in front), or nothing before its start: a
    connection refused after the start named no address, though the operator's next question is which one (the
    pooler's or the server's, of which URL)."""
    from agentrt.db.engine import server_address  # the engine imports this module

    where = server_address()
    return f' at {where}' if where else ''


# PgBouncer's own errors, which it sends with SQLSTATE 08P01 (a protocol violation, as for a connection broken
# mid-protocol) and then closes the client's connection: a client over its `max_client_conn` (at login), a query that
# waited `query_wait_timeout` for a server connection.
_POOLER_FULL = 'no more connections allowed (max_client_conn)'
_POOLER_WAIT = 'query_wait_timeout'
# A client that needs a server connection while PgBouncer's last login to PostgreSQL failed less than
# `server_login_retry` seconds ago (PostgreSQL down or restarting, or refusing PgBouncer's login): refused at once,
# before anything of the operation reached PostgreSQL.
_POOLER_LOGIN = 'server login has been failing, try again later (server_login_retry)'


def pooler_refusal(exc: BaseException) -> DatabaseUnavailableError | None:
    """PgBouncer refusing a client (`max_client_conn`), refusing it while its logins to PostgreSQL fail
    (`server_login_retry`) or giving up on a query's wait for a server connection (`query_wait_timeout`), as the
    error that says so and what to do; None for any other exception. Reported as a
    connection lost (their SQLSTATE's class), they sent an operator looking for a restart of PostgreSQL rather than at
    the pooler's limits."""
    for error in _chain(exc):
        text = str(error)
        if _POOLER_FULL in text:
            return DatabaseUnavailableError(
                f'PgBouncer refused the connection: {_POOLER_FULL}: it accepts fewer client connections than the '
                "runtime's processes open; raise its max_client_conn to at least processes x (DB_POOL_SIZE + "
                'DB_MAX_OVERFLOW) + 2 per process with the job queue (and any other clients), or lower those pools'
            )
        if _POOLER_LOGIN in text:
            return DatabaseUnavailableError(
                f'PgBouncer cannot log in to PostgreSQL ({_POOLER_LOGIN}): PostgreSQL is down or restarting, or '
                "refuses PgBouncer's login (see PgBouncer's log); PgBouncer refuses clients for server_login_retry "
                'seconds after a failed login (15 by default; 1 recovers sooner, README "Running several workers"); '
                'the operation was not run'
            )
        if _POOLER_WAIT in text:
            return DatabaseDisconnectedError(
                f'PgBouncer gave up waiting for a server connection ({_POOLER_WAIT}) and closed the connection: its '
                'default_pool_size server connections stayed busy (raise it, or fewer turns at once), or it could not '
                'reach PostgreSQL; the operation did not complete'
            )
    return None


def given_up(exc: BaseException) -> str | None:
    """What PostgreSQL gave up on, for a person, with what to do, when `exc` is a lock or statement timeout, an
    operator's cancel, a deadlock or a serialization failure (`_GAVE_UP_SQLSTATES`), else None. Reported as the
    database being (briefly) unavailable for the operation: the connection is intact, the caller made no mistake."""
    for error in _chain(exc):
        found = _GAVE_UP_SQLSTATES.get(sqlstate_of(error))
        if found is not None:
            what, then = found
            return f'{what.format(error=first_line(error))}: {then}'
    return None


def connection_problem(exc: BaseException) -> str:
    """Why a connection could not be made, on one line, with what to do for SSL failures (a refused login is not
    asked here: `check_connection` makes it a `ConfigError` first, `login_error`)."""
    for error in _chain(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            return (
                f"the server's certificate is not trusted ({error.verify_message or error}): give the CA that "
                'signed it as sslrootcert=/path/ca.crt in DATABASE_URL (verify-full also checks the host name), '
                'or use sslmode=require to encrypt without verifying'
            )
        if isinstance(error, ssl.SSLError):
            return f'SSL failed ({first_line(error)}): check sslmode and the certificate files in DATABASE_URL'
    return _root_message(exc)


def refused_startup_parameter(exc: BaseException) -> str | None:
    """The parameter named by PgBouncer's "unsupported startup parameter: ..." refusal in `exc`'s chain, or None."""
    for error in _chain(exc):
        text = str(error)
        if 'unsupported startup parameter' in text:
            return text.split('unsupported startup parameter', 1)[1].strip(' :').split()[0] or '?'
    return None


def invalid_value(exc: BaseException) -> str | None:
    """The driver's message when PostgreSQL refused a value (SQLSTATE class 22: a NUL in text, a number out of
    range...), or None. At the command line such a value came from the user."""
    for error in _chain(exc):
        sqlstate = getattr(error, 'sqlstate', None)
        if type(error).__name__ == 'DataError' or (isinstance(sqlstate, str) and sqlstate.startswith('22')):
            if isinstance(error, sqlalchemy.exc.StatementError):
                continue
            return first_line(error)
    return None


def sqlstate_of(error: BaseException) -> str:
    """The SQLSTATE a driver's error carries (asyncpg's and psycopg's `sqlstate`), '' for any other exception."""
    return str(getattr(error, 'sqlstate', None) or '')


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it was raised from: SQLAlchemy's `.orig`, each `__cause__` (not `__context__`)."""
    return _chain(exc)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        # What it was raised from, not what was being handled when it was raised (`__context__`): a conflict
        # raised while handling a lost connection is a conflict.
        for nxt in (getattr(current, 'orig', None), current.__cause__):
            if isinstance(nxt, BaseException) and id(nxt) not in seen:
                pending.append(nxt)


def raised_inside(error: BaseException, module_prefix: str) -> bool:
    """Whether the innermost frame of `error`'s traceback (where it was raised) is in a module whose name starts with
    `module_prefix`: a library's own failure told apart from one raised by code it called."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get('__name__', '')).startswith(module_prefix)


def _raised_in_driver(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get('__name__', ''))
        if module.startswith(_DRIVER_MODULES):
            return True
        tb = tb.tb_next
    return False


_DRIVER_MODULES = ('sqlalchemy.', 'asyncpg')


def class_names(error: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(error).__mro__}


# asyncpg's words for a connection whose protocol state no longer matches the server's ("cannot switch to state 15;
# another operation (2) is in progress"): its server end was closed under it (a killed backend, PgBouncer's KILL).
# The state numbers are asyncpg's internals, which say nothing to an operator.
_OUT_OF_STEP_TEXT = 'the server or a pooler ended it while it was in use, mid-operation'


def _connect_failure(exc: BaseException) -> str:
    """Why no connection could be made: the driver's message, or for a connection attempt that timed out (asyncpg's
    bare `TimeoutError`, which read "TimeoutError" and nothing more) the wait and its setting."""
    for error in _chain(exc):
        if isinstance(error, TimeoutError) and not str(error).strip():
            return (
                f'no answer within {_connect_timeout()}: the server is hung or overloaded, or the network between '
                'drops its packets'
            )
    return _root_message(exc)


def _connect_timeout() -> str:
    """The runtime's connect timeout and its setting in words (`10s (DB_CONNECT_TIMEOUT)`)."""
    from agentrt.db.engine import connect_timeout  # the engine imports this module

    timeout = connect_timeout()
    if timeout is None:
        return 'the connect timeout (DB_CONNECT_TIMEOUT)'
    seconds, setting = timeout
    return f'{seconds:g}s ({setting})'


def _root_message(exc: BaseException) -> str:
    """The driver's own message (the innermost one that says something), on one line; asyncpg's protocol-state
    complaint in words."""
    message = ''
    if _no_such_session_kind(exc):  # its own words, not those of an out-of-step protocol
        text = next(first_line(e) for e in _chain(exc) if type(e).__name__ == 'TargetServerAttributeNotMatched')
        # asyncpg names the kind by its enum's repr: "... requirement <SessionAttribute.standby: 'standby'>" (qa170).
        if (kind := re.search(r"<SessionAttribute\.\w+: '([^']+)'>", text)) is not None:
            return f'none of its hosts is what target_session_attrs={kind[1]} asks for'
        return text
    for error in _chain(exc):
        if isinstance(error, FileNotFoundError) and not error.filename:  # asyncpg names neither socket nor file
            if _raised_in(error, 'create_unix_connection'):
                return 'no server is listening on its Unix socket (not running, or restarting)'
            # A certificate or key file asyncpg loads before it connects (`PGSSLCERT=~/...`): it was said as a Unix
            # socket with no server, for a TCP host (qa174).
            return (
                'a certificate or key file it was to read does not exist (No such file or directory): check '
                'sslrootcert, sslcert, sslkey, sslcrl and the PGSSL* variables (PGSSLCERT, PGSSLKEY...)'
            )
        if _protocol_out_of_step(error):
            return _OUT_OF_STEP_TEXT
        if 'rejected SSL upgrade' in str(error):
            # asyncpg's words alone did not say which setting asked for TLS, nor what to change (qa177).
            return (
                'the server does not accept TLS connections (it rejected the SSL upgrade), and sslmode (in '
                'DATABASE_URL, or PGSSLMODE) is require, verify-ca or verify-full: turn ssl on in the server, or '
                'set sslmode=prefer or disable'
            )
        if isinstance(error, sqlalchemy.exc.StatementError):
            continue  # SQLAlchemy's text repeats the SQL and a link; the driver's says it better
        text = first_line(error)
        if text:
            message = text
            break
    return message or type(exc).__name__


def _raised_in(exc: BaseException, function: str) -> bool:
    """Whether `exc` was raised in (or under) a call of a function of this name."""
    trace = exc.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code.co_name == function:
            return True
        trace = trace.tb_next
    return False


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
