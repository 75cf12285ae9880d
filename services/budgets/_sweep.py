"""The sweeper: gives back the holds of processes that died holding them, and holds that expired.

A hold of a process on this host is released as soon as that process is gone (its id is free or names a process started
at another time); any hold is released once it expires (`AGENTRT_BUDGET_RESERVATION_TTL_SECONDS` after it was taken or
last renewed: a request in flight renews its own, `_renew.py`), which covers other hosts. If the request's ledger row
arrives later (spooled while the database was down, replayed after), its cost still counts: it is added to the window
its `started_at` falls in (`_settle.py`).

It also folds the settlements the ledger writer appended into their windows (admissions do it for their own window;
the sweeper for windows no request has used since). Runs from `agentrt budget sweep`, and in the background of
every process that reserves, at most once per
`AGENTRT_BUDGET_SWEEP_INTERVAL_SECONDS` (on the event loop's `TaskSupervisor`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import text

from agentrt.db.processes import is_alive, this_host
from agentrt.db.session import Unscoped, scoped_connection
from agentrt.services.background import BackgroundQueueFull, SupervisorClosed, get_supervisor
from agentrt.services.budgets._orphans import orphaned, released

logger = logging.getLogger('agentrt.budgets')

_HOLDERS_HERE = text("""
SELECT DISTINCT holder_pid, holder_started FROM budget_reservations WHERE holder_host = :host
""")

_SWEEP = text("""
WITH quick AS (
    -- One sweep at a time (another process's sweep does the same work); not waiting for the disk: a sweep lost to a
    -- database crash is simply done again.
    SELECT set_config('synchronous_commit', 'off', true), pg_try_advisory_xact_lock(:lock) AS mine
), gone AS (
    DELETE FROM budget_reservations
    WHERE (SELECT mine FROM quick) AND (
        expires_at < now()
        OR (holder_host = :host AND (holder_pid, holder_started) IN (
            SELECT * FROM unnest(CAST(:pids AS integer[]), CAST(:starts AS double precision[]))))
        OR id = ANY(CAST(:orphans AS uuid[]))
    )
    RETURNING account_id, period_start, amount_usd, expires_at < now() AS expired,
              id = ANY(CAST(:orphans AS uuid[])) AS orphan
), settled AS (
    DELETE FROM budget_settlements WHERE (SELECT mine FROM quick)
    RETURNING account_id, period_start, held_usd, spent_usd, tokens
), deltas AS (
    SELECT account_id, period_start, sum(released) AS released, sum(spent) AS spent, sum(tokens) AS tokens
    FROM (
        SELECT account_id, period_start, amount_usd AS released, 0 AS spent, 0 AS tokens FROM gone
        UNION ALL
        SELECT account_id, period_start, held_usd, spent_usd, tokens FROM settled
    ) AS d
    GROUP BY account_id, period_start
), folded AS (
    UPDATE budget_periods AS p
    SET reserved_usd = greatest(p.reserved_usd - t.released, 0), spent_usd = p.spent_usd + t.spent,
        spent_tokens = p.spent_tokens + t.tokens, updated_at = now()
    FROM deltas AS t WHERE p.account_id = t.account_id AND p.period_start = t.period_start
    RETURNING 1
)
SELECT count(*) FILTER (WHERE NOT expired AND NOT orphan) AS dead, count(*) FILTER (WHERE expired) AS expired,
       count(*) FILTER (WHERE orphan AND NOT expired) AS orphans,
       coalesce(sum(amount_usd), 0) AS amount, (SELECT count(*) FROM folded) AS windows,
       (SELECT mine FROM quick) AS mine
FROM gone
""")
# The advisory lock that makes sweeps exclusive (any constant; this one spells "budgets").
_SWEEP_LOCK = 0x62756467657473
# Until the sweep under way commits: shared, so the sweeps' waiters do not queue behind each other.
_AFTER_THE_SWEEP = text('SELECT pg_advisory_xact_lock_shared(:lock)')


@dataclass(frozen=True)
class SweepReport:
    """What one sweep released."""

    dead_holders: int
    """Processes on this host found gone while holding reservations."""
    released_dead: int
    """Reservations of those processes released."""
    released_expired: int
    """Reservations released because they expired."""
    released_usd: str
    """The amount given back, as a decimal string in plain notation."""
    folded_windows: int = 0
    """Windows whose pending settlements (or released holds) were folded into their row."""
    released_orphans: int = 0
    """Holds of this process released by id: it could not give them back itself (`_orphans.py`)."""


async def sweep_reservations(*, wait: bool = False) -> SweepReport:
    """Release the reservations of dead processes on this host and every expired reservation, and fold pending
    settlements into their windows, in one statement.

    Safe to run at any time, from any number of processes (one sweeps at a time): a reservation is deleted (and its
    amount given back) once, and one a live request holds is never touched before it expires.

    Args:
        wait: when another sweep is under way, wait for it to commit (up to the session's lock timeout) instead of
            returning at once: a refused request asks again once what that sweep gave back is visible. It does not
            sweep again (the other one did the work).
    """
    global _last_sweep
    _last_sweep = time.monotonic()  # any sweep of this process's is its sweep for `sweep_soon`'s interval
    host = this_host()
    orphans = orphaned()  # holds this process took and could not give back (`_orphans.py`)
    async with scoped_connection(account=Unscoped.JOBS) as connection:  # every account's holds
        holders = (await connection.execute(_HOLDERS_HERE, {'host': host})).all()
        dead = [(pid, started) for pid, started in holders if not is_alive(pid, started)]
        params = {
            'host': host,
            'pids': [pid for pid, _ in dead],
            'starts': [started for _, started in dead],
            'lock': _SWEEP_LOCK,
            'orphans': orphans,
        }
        row = (await connection.execute(_SWEEP, params)).one()
        if wait and not row.mine:
            await connection.execute(_AFTER_THE_SWEEP, {'lock': _SWEEP_LOCK})
    if row.mine:
        released(orphans)  # committed: gone now, or never committed in the first place
    amount = format(row.amount, 'f')  # never `1E-9`
    report = SweepReport(len(dead), row.dead, row.expired, amount, row.windows, row.orphans)
    if report.released_dead or report.released_expired or report.released_orphans:
        logger.info(
            'budgets: released %d reservation(s) of %d dead process(es), %d expired one(s) and %d this process could '
            'not give back when the database was lost, $%s in all',
            report.released_dead,
            report.dead_holders,
            report.released_expired,
            report.released_orphans,
            report.released_usd,
        )
    return report


_last_sweep: float | None = None


def sweep_soon(interval_seconds: float) -> None:
    """Start a background sweep on this loop's supervisor unless this process started one within the interval.

    Never raises: a sweep that cannot start now (backlog full, shutting down) is covered by a later one.
    """
    global _last_sweep
    now = time.monotonic()
    if _last_sweep is not None and now - _last_sweep < interval_seconds and not orphaned():
        return
    _last_sweep = now
    try:
        get_supervisor().spawn(sweep_reservations, name='budget sweep')
    except (BackgroundQueueFull, SupervisorClosed):
        pass
