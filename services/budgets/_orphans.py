"""Holds this process took and can no longer give back itself: the sweeper of this process releases them.

A hold's statement whose connection was lost before its reply (PgBouncer or PostgreSQL restarted, the network cut)
may have committed: the request is not sent (its admission failed with `DatabaseDisconnectedError`), so nothing
would ever settle the hold, and the process that took it is alive, so the sweeper would leave it to its TTL
(`AGENTRT_BUDGET_RESERVATION_TTL_SECONDS`, 15 minutes), the account's budget short by it meanwhile: the next
requests refused for holds "by requests in flight" that none were. `reserve` gives such a hold back at once; when the
database is still away (the release fails too), or a release of a skipped request's hold (or of a hold taken as its
caller was cancelled) fails, the hold's id is kept here and the next sweep of this process releases it by id (a no-op
for a hold that was never committed), and the next admission sweeps at once rather than after
`AGENTRT_BUDGET_SWEEP_INTERVAL_SECONDS`.
"""

from __future__ import annotations

import uuid

from agentrt.db.forks import forget_in_child

_orphans: set[uuid.UUID] = set()
_MAX_ORPHANS = 10_000  # bounded: an outage of hours with no sweep succeeding; beyond it, the TTL covers them


def _forget_the_parents() -> list[object]:
    """In a forked child: the parent's orphaned holds are its sweeper's to give back (`agentrt.db.forks`)."""
    _orphans.clear()
    return []


forget_in_child(_forget_the_parents)


def orphan(hold_id: uuid.UUID) -> None:
    """Remember a hold this process could not give back, for its next sweep."""
    if len(_orphans) < _MAX_ORPHANS:
        _orphans.add(hold_id)


def orphaned() -> list[uuid.UUID]:
    """The holds to release by id at the next sweep."""
    return list(_orphans)


def released(hold_ids: list[uuid.UUID]) -> None:
    """Forget the holds a sweep has released (or found gone)."""
    _orphans.difference_update(hold_ids)
