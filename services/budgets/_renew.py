"""Keeping a hold while its request is in flight: its expiry pushed back every third of its TTL until it ends.

The sweeper releases any hold older than `AGENTRT_BUDGET_RESERVATION_TTL_SECONDS` (it cannot tell a live process on
another host from a dead one), so a request that ran longer lost its hold while it ran and its account could be
admitted past its limit meanwhile. A caller decides how long a request runs: a streamed answer whose client reads
slowly (or not at all) waits on it, and so does the request, with nothing to end it. A tenant could hold streams
open past the TTL, start as many again on the limit their holds gave back, then let them all finish, over and over.
A request in flight now renews its hold; a hold nobody renews (its process died or lost track of it) still expires.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text

from agentrt.db.session import scoped_connection
from agentrt.services.budgets._reserve import Hold

logger = logging.getLogger('agentrt.budgets')

_RENEW = text("""
UPDATE budget_reservations SET expires_at = now() + make_interval(secs => :ttl) WHERE id = :id
""")


@asynccontextmanager
async def kept(hold: Hold | None, ttl_seconds: float) -> AsyncIterator[None]:
    """Renew `hold` (when there is one) every third of `ttl_seconds` for as long as the block runs.

    A request shorter than that (nearly all) spends nothing on it: the first renewal comes a third of the TTL in.
    Never raises: a renewal that fails (the database away) is tried again at the next one.
    """
    if hold is None:
        yield
        return
    renewing = asyncio.create_task(_renew_every(hold, float(ttl_seconds)), name='budget hold renewal')
    try:
        yield
    finally:
        renewing.cancel()


async def _renew_every(hold: Hold, ttl_seconds: float) -> None:
    while True:
        await asyncio.sleep(ttl_seconds / 3)
        # Shielded: the request's end cancels the wait, never a renewal half-way through its statement.
        await asyncio.shield(_renew(hold, ttl_seconds))


async def _renew(hold: Hold, ttl_seconds: float) -> None:
    try:
        async with scoped_connection(account=hold.account_id) as connection:
            await connection.execute(_RENEW, {'id': hold.id, 'ttl': ttl_seconds})
    except Exception as exc:  # the next renewal tries again; the TTL is what is left if none succeeds
        logger.warning('budgets: could not renew the hold of request %s (%s); trying again', hold.id, exc)
