"""Which database errors are worth retrying, and a retry loop with exponential backoff and jitter."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import sqlalchemy.exc

from agentrt.db.errors import DatabaseUnavailableError

logger = logging.getLogger('agentrt.ledger')

T = TypeVar('T')

# SQLSTATEs that say "the server or the connection is unavailable right now", not "your data is wrong":
# class 08 (connection exception), 53 (insufficient resources, e.g. too many clients), 57P01-57P05
# (shutdown, starting up: field notes saw 57P03 during a restart), lock and statement timeouts of our
# own side sessions, serialization failures and deadlocks.
_TRANSIENT_SQLSTATE_PREFIXES = ('08', '53', '57P')
_TRANSIENT_SQLSTATES = frozenset({'40001', '40P01', '55P03', '57014'})


def is_transient_db_error(exc: BaseException) -> bool:
    """True when `exc` (or anything in its cause chain) means "try again later", not "this write is invalid".

    Broad on purpose (see the field notes): during a server restart the application sees raw
    `ConnectionRefusedError` / `ConnectionResetError` and SQLSTATE 57P03 without SQLAlchemy's
    `connection_invalidated` flag, and a pool checkout timeout is `sqlalchemy.exc.TimeoutError`. Errors come
    wrapped by SQLAlchemy (a session, a Core connection) or as the driver raised them (`driver_transaction`: asyncpg's
    own exceptions, by class name and SQLSTATE), and translated by the database layer (`DatabaseUnavailableError`).

    Args:
        exc: the exception a database write raised.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _is_transient_one(current):
            return True
        nxt = getattr(current, 'orig', None)
        if not isinstance(nxt, BaseException) or id(nxt) in seen:
            nxt = current.__cause__ or current.__context__
        current = nxt
    return False


def _is_transient_one(exc: BaseException) -> bool:
    if isinstance(exc, asyncio.CancelledError):
        return False
    # Builtin TimeoutError (asyncpg's command timeout, asyncio.timeout) and every socket error are OSErrors.
    # `DatabaseUnavailableError` (and `DatabaseDisconnectedError`): the database layer's own word for "not now".
    if isinstance(
        exc, DatabaseUnavailableError | OSError | sqlalchemy.exc.TimeoutError | sqlalchemy.exc.DisconnectionError
    ):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return True
    # asyncpg's own classes, without importing asyncpg-specific names the driver may rename.
    name = type(exc).__name__
    if name in {'ConnectionDoesNotExistError', 'InterfaceError', 'InternalClientError', 'ConnectionFailureError'}:
        return True
    sqlstate = getattr(exc, 'sqlstate', None) or getattr(exc, 'pgcode', None)
    if isinstance(sqlstate, str):
        return sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a write that failed for a connection reason."""

    attempts: int = 8
    base_delay: float = 0.05
    max_delay: float = 2.0
    attempt_timeout: float = 15.0

    def delays(self) -> list[float]:
        """The nominal sleep before each retry (jitter is applied on top)."""
        return [min(self.base_delay * 2**i, self.max_delay) for i in range(max(self.attempts - 1, 0))]


async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    what: str,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run `operation`, retrying transient database errors with exponential backoff and full jitter.

    Each attempt is bounded by `policy.attempt_timeout` (a stuck pool checkout or a dead socket turns into
    a retryable `TimeoutError`). The operation must be idempotent: the ledger's writes are
    `INSERT ... ON CONFLICT DO NOTHING` on keys minted before the model call.

    Raises:
        Exception: the last error, once attempts are exhausted, or at once when it is not transient.
    """
    delays = policy.delays()
    for attempt in range(policy.attempts):
        try:
            async with asyncio.timeout(policy.attempt_timeout):
                return await operation()
        except Exception as exc:
            if attempt >= len(delays) or not is_transient_db_error(exc):
                raise
            if on_retry is not None:
                on_retry(exc)
            logger.debug('%s failed (%s: %s); retry %d of %d', what, type(exc).__name__, exc, attempt + 1, len(delays))
            await asyncio.sleep(delays[attempt] * random.uniform(0.5, 1.0))
    raise AssertionError('unreachable')  # pragma: no cover
