"""`PoolHealth`: broken connections kept out of the engine's pool, suspect ones tested before they are handed out.

Installed on every engine by `agentrt.db.engine_build.build_engine`; `pool_status()` reads its counters.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any, NoReturn

from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine

from agentrt.db import transaction_setup
from agentrt.db.failures import StatementNotAnswered, out_of_step
from agentrt.db.transaction_setup import driver_waiting

__all__ = ['PoolHealth']

logger = logging.getLogger(__name__)


class PoolHealth:
    """Keeps broken connections out of the pool, and tests the ones that may be broken before they are used.

    - A connection that raised a disconnect, or an asyncpg `InternalClientError` (its protocol state is out of step
      with the server's, sqlalchemy issue 13241), is invalidated: closed, never handed out again.
    - Every disconnect starts a new *generation* of the pool. A connection opened (or last tested) in an older
      generation is pinged at its next checkout: after a server restart or a failover, the first failure marks
      every other pooled connection suspect, and none of them reaches a caller untested. Healthy ones pass the
      ping and stay (the pool is not thrown away: under killed backends that kept a third more throughput,
      field notes); dead ones are replaced by a new connection in the same checkout.
    - Between disconnects, a connection is pinged only when it sat idle for more than `ping_idle_after` seconds
      (idle timeouts, firewalls): a connection in use moments ago in the same generation is as alive as a ping
      would say, and skipping that ping saves three round trips per short session (a fifth of the CPU per turn).

    - A ping waits for its answer at most `CLIENT_WAIT_MARGIN_SECONDS` (5 s), not a statement's whole wait (the
      statement timeout plus the margin, 35 s by default): `SELECT 1` has nothing to time out, and a connection a
      firewall dropped while it was idle, or whose backend froze, cost each checkout that found one 35 s (QA: a
      turn took 74 s on two such connections). Behind PgBouncer (`bounded_ping=False`) a ping waits in its queue for a
      server connection as any statement does, so it keeps the whole wait.

    With pre-ping off (`ping_idle_after=None`), nothing is pinged and a disconnect invalidates the whole pool
    instead (SQLAlchemy's default), so a stale connection is still never handed out.
    """

    GENERATION = 'agentrt_generation'
    CHECKED_IN = 'agentrt_checked_in'

    def __init__(self, engine: AsyncEngine, *, ping_idle_after: float | None, bounded_ping: bool = True) -> None:
        self.generation = 0
        self.disconnects = 0
        self.pings = 0
        self.ping_idle_after = ping_idle_after
        self.bounded_ping = bounded_ping
        self._sync_engine = engine.sync_engine
        engine.sync_engine.pool.agentrt_health = self  # type: ignore[attr-defined]  # for pool_status() and tests
        event.listen(engine.sync_engine, 'handle_error', self.on_error)
        if ping_idle_after is None:
            return
        event.listen(engine.sync_engine, 'connect', self._on_connect)
        event.listen(engine.sync_engine, 'checkout', self._on_checkout)
        if ping_idle_after:
            event.listen(engine.sync_engine, 'checkin', self._on_checkin)

    def on_error(self, context: Any) -> StatementNotAnswered | None:
        """SQLAlchemy's `handle_error` listener: a disconnect starts a new generation (and an out-of-step connection
        counts as one, as does one whose server did not answer within the client's wait).

        Returns:
            `StatementNotAnswered` for a wait that ran out, raised by SQLAlchemy in place of asyncpg's bare
            `TimeoutError` (which SQLAlchemy already takes for a disconnect, as it takes a cancellation); else None.
        """
        original = context.original_exception
        silent = None
        if context.connection is not None and not context.is_pre_ping:
            driver = _driver_of(context.connection)
            silent = StatementNotAnswered.of(original, driver)
            if silent is not None and driver is not None:
                # Closed now: SQLAlchemy's invalidation closes it gracefully, which waits up to 2 s for a server
                # that has just shown it does not answer.
                driver.terminate()
        if not context.is_disconnect and (silent is not None or out_of_step(original)):
            context.is_disconnect = True
        if context.is_disconnect:
            self._disconnected()
            if self.ping_idle_after is not None:
                context.invalidate_pool_on_disconnect = False
        return silent

    def lost(self, connection: Any) -> None:
        """A connection (`PoolProxiedConnection`) lost under statements SQLAlchemy did not run (`agentrt.db.driver`):
        what `on_error` and SQLAlchemy do for a disconnect it sees. A new generation, so the pool tests its other
        connections before handing them out; with pre-ping off, every connection opened before now is replaced."""
        self._disconnected()
        if self.ping_idle_after is None:
            self._sync_engine.pool._invalidate(connection, _checkin=False)  # SQLAlchemy's own step for a disconnect

    def _disconnected(self) -> None:
        """A disconnect: a new generation, so every connection of an older one is tested before it is handed out."""
        self.generation += 1
        self.disconnects += 1

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        record.info[self.GENERATION] = self.generation

    def _on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        record.info[self.CHECKED_IN] = time.monotonic()

    def _on_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        info = record.info
        if _closed(dbapi_connection):
            # The server closed it while it sat in the pool (a restart, a killed backend) and the event loop has
            # seen the socket close: no round trip needed to know.
            self._replace(record, 'connection closed by the server while idle in the pool')
        generation = info.get(self.GENERATION, self.generation)
        if generation == self.generation and not self._idle_too_long(info):
            return  # tested, or used, since the last disconnect
        self.pings += 1
        driver = getattr(dbapi_connection, '_connection', None)  # the asyncpg connection (a PreludeConnection)
        wait = self._ping_wait(driver)
        try:
            with driver_waiting(driver, wait) if wait is not None else nullcontext():
                self._sync_engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            silent = next(filter(None, (StatementNotAnswered.of(e, driver) for e in (exc, exc.__cause__) if e)), None)
            if silent is not None:
                silent = StatementNotAnswered(wait) if wait is not None else silent  # the ping's wait, not the next's
                if driver is not None:  # closed now: a graceful close waits up to 2 s more for a silent server
                    driver.terminate()
                logger.warning(
                    'a pooled connection did not answer its ping (%s): replaced by a new one; a firewall that drops '
                    'idle connections, or a frozen server?',
                    silent,
                )
            self._replace(record, f'connection failed its pre-ping: {silent or exc}', exc)
        info[self.GENERATION] = self.generation

    def _ping_wait(self, driver: Any) -> float | None:
        """How long a ping on `driver` waits for its answer (see the class); None: as long as its statements do (behind
        PgBouncer, another driver, or no client-side bound at all: no statement timeout)."""
        waiting = getattr(driver, 'waiting', None)
        before = waiting() if callable(waiting) and self.bounded_ping else None
        return None if before is None else min(before, transaction_setup.CLIENT_WAIT_MARGIN_SECONDS)

    def _replace(self, record: Any, reason: str, cause: Exception | None = None) -> NoReturn:
        """Close `record`'s connection, then have the pool open a new one in its place, in this same checkout.

        The close is made here, not left to SQLAlchemy: it closes a connection that a checkout event refused with
        `DisconnectionError` in a branch of its checkout that does not give the connection back to the pool when the
        close itself raises (SQLAlchemy 2.1.9, `_ConnectionFairy._checkout`). A graceful close waits for the server
        (up to 2 s; behind PgBouncer, a round trip), and a cancellation landing there (a turn's other tool call failed)
        left the connection checked out for as long as the cancellation's traceback lived. Raised from this event, the
        cancellation reaches the branch that gives it back, and SQLAlchemy's own close is then a no-op.
        """
        self._disconnected()
        error = DisconnectionError(reason)
        record.invalidate(error)
        raise error from cause

    def _idle_too_long(self, info: dict[str, Any]) -> bool:
        if self.ping_idle_after == 0:
            return True  # DB_POOL_PRE_PING_IDLE=0: every checkout
        checked_in = info.get(self.CHECKED_IN)
        return checked_in is not None and time.monotonic() - checked_in > self.ping_idle_after


def _driver_of(connection: Any) -> Any:
    """The asyncpg connection under a SQLAlchemy `Connection`, None when it has none any more (read from the
    attribute: the `connection` property would reconnect an invalidated one, from inside an error handler)."""
    pooled = getattr(connection, '_dbapi_connection', None)
    return getattr(pooled, 'driver_connection', None)


def _closed(dbapi_connection: Any) -> bool:
    is_closed = getattr(getattr(dbapi_connection, '_connection', None), 'is_closed', None)
    return bool(is_closed()) if callable(is_closed) else False
