"""A pool's idle connections closed together at the runtime's end, each goodbye bounded (`close_idle_connections`).

SQLAlchemy's `dispose()` closes a pool's connections one after another, and each asyncpg `close()` waits for the
server's answer to its goodbye as long as a statement may (the statement timeout plus the margin, 35 s by default): a
server that did not answer (frozen, a network that drops packets) held `agentrt serve`'s stop 243 s with 6 pooled
connections, and SQLAlchemy logged each as an ERROR with a traceback (QA). Closed here first, together, each waiting at
most `CLOSE_WAIT_SECONDS` and aborted past it, they leave `dispose()` nothing to wait for.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ['CLOSE_WAIT_SECONDS', 'close_idle_connections', 'track_idle_connections']

logger = logging.getLogger('agentrt.db')

CLOSE_WAIT_SECONDS = 2.0
"""How long closing a pooled connection waits for the server to answer its goodbye (SQLAlchemy's own bound for an
invalidated connection's); past it the connection is aborted: its socket closed, which ends the server's session."""

_ROUNDS = 3
"""Closes made at most: a connection checked in while the others were closing is closed in the next round."""

_idle: weakref.WeakKeyDictionary[Engine, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()
"""The asyncpg connections sitting in each engine's pool (checked in and not checked out since)."""


def track_idle_connections(engine: AsyncEngine) -> None:
    """Note which connections sit idle in `engine`'s pool, for `close_idle_connections` (`build_engine` calls it)."""
    idle: weakref.WeakSet[Any] = weakref.WeakSet()
    _idle[engine.sync_engine] = idle

    def checked_in(dbapi_connection: Any, record: Any) -> None:
        driver = getattr(dbapi_connection, 'driver_connection', None)  # None: invalidated, closed already
        if driver is not None:
            idle.add(driver)

    def checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        idle.discard(getattr(dbapi_connection, 'driver_connection', None))

    event.listen(engine.sync_engine, 'checkin', checked_in)
    event.listen(engine.sync_engine, 'checkout', checked_out)


async def close_idle_connections(engine: AsyncEngine) -> int:
    """Close the connections idle in `engine`'s pool together, each waiting at most `CLOSE_WAIT_SECONDS` for the
    server's answer and aborted past it; on their event loop, before `engine.dispose()` (which then has none to close).

    Returns:
        How many the server did not answer in time (aborted: closed all the same).
    """
    idle = _idle.get(engine.sync_engine)
    unanswered = 0
    for _ in range(_ROUNDS):
        open_ = [driver for driver in list(idle or ()) if not driver.is_closed()]
        if not open_:
            break
        answered = await asyncio.gather(*(_goodbye(driver) for driver in open_))
        unanswered += answered.count(False)
    return unanswered


async def _goodbye(driver: Any) -> bool:
    """Close `driver` (an asyncpg connection) gracefully within `CLOSE_WAIT_SECONDS`, else abort it; whether the server
    answered."""
    try:
        await driver.close(timeout=CLOSE_WAIT_SECONDS)
    except TimeoutError:
        driver.terminate()  # asyncpg aborted it already as its close failed: made sure of, whatever the version
        return False
    except Exception as exc:  # a connection that broke meanwhile (its server gone) has nothing left to close
        driver.terminate()
        logger.debug('a pooled connection failed its close (%s: %s); aborted', type(exc).__name__, exc)
    return True
