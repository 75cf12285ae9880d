"""Daily usage per account, agent and model: rolled up from the ledger exactly once, and recomputable.

`summarise_costs(source='rollup')` reads it.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, text

from agentrt.db.session import Unscoped, get_side_session

logger = logging.getLogger('agentrt.usage')

# Roll-ups and recomputes of large ranges can wait behind each other; the side session's default is 2 s.
_LOCK_TIMEOUT_MS = 30_000
_STATEMENT_TIMEOUT_MS = 120_000

# Incremental roll-ups share this lock; a recompute takes it exclusively, so it never interleaves with one.
_LOCK_KEYS = {'namespace': 0x726F6C6C, 'key': 0}  # 'roll'
_LOCK_SHARED = text('SELECT pg_advisory_xact_lock_shared(:namespace, :key)')
_TRY_LOCK_SHARED = text('SELECT pg_try_advisory_xact_lock_shared(:namespace, :key)')
_LOCK_EXCLUSIVE = text('SELECT pg_advisory_xact_lock(:namespace, :key)')

_COUNTERS = (
    'requests',
    'failed_requests',
    'cancelled_requests',
    'unpriced_requests',
    'input_tokens',
    'output_tokens',
    'cache_read_tokens',
    'cache_write_tokens',
    'reasoning_tokens',
    'total_tokens',
    'input_cost',
    'output_cost',
    'total_cost',
)
_KEY = 'day, account_id, agent_instance_id, model'
# One UTC day per row; the same expression in the incremental and the recompute path keeps them equal.
_LEDGER_KEY = "(r.started_at AT TIME ZONE 'UTC')::date AS day, r.account_id, r.agent_instance_id, r.model"
_LEDGER_AGGREGATES = """
    count(*) AS requests,
    count(*) FILTER (WHERE NOT r.success AND r.status <> 'cancelled') AS failed_requests,
    count(*) FILTER (WHERE r.status = 'cancelled') AS cancelled_requests,
    count(*) FILTER (WHERE r.total_cost IS NULL) AS unpriced_requests,
    coalesce(sum(r.input_tokens), 0)::bigint AS input_tokens,
    coalesce(sum(r.output_tokens), 0)::bigint AS output_tokens,
    coalesce(sum(r.cache_read_tokens), 0)::bigint AS cache_read_tokens,
    coalesce(sum(r.cache_write_tokens), 0)::bigint AS cache_write_tokens,
    coalesce(sum(r.reasoning_tokens), 0)::bigint AS reasoning_tokens,
    coalesce(sum(r.total_tokens), 0)::bigint AS total_tokens,
    coalesce(sum(r.input_cost), 0) AS input_cost,
    coalesce(sum(r.output_cost), 0) AS output_cost,
    coalesce(sum(r.total_cost), 0) AS total_cost
"""
_LABELS = ('account_slug', 'agent_instance_slug', 'agent_name')
_LEDGER_LABELS = ', '.join(f'max(r.{name}) AS {name}' for name in _LABELS)
_COLUMNS = f'{_KEY}, {", ".join(_LABELS)}, {", ".join(_COUNTERS)}'

# Take the queued rows (`usage_pending_requests`: every ledger row is queued by the statement that writes it,
# migration 0019) and claim them (the claim is the idempotency key: a row counted by a recompute, or by a roll-up
# of an earlier version, is claimed already and counted nothing twice), then add just the newly claimed rows to their
# buckets; rows a budget refused are claimed (so they are not looked at again) but not counted: those requests were
# never sent. Queued rows another roll-up is taking are skipped, not waited for. Sorted so two roll-ups touching the
# same buckets lock them in the same order and cannot deadlock.
_ROLL_UP = f"""
WITH taken AS (
    DELETE FROM usage_pending_requests AS p
    WHERE p.request_id IN (
        SELECT q.request_id FROM usage_pending_requests AS q WHERE true {{where}}
        ORDER BY q.request_id FOR UPDATE SKIP LOCKED
    )
    RETURNING p.request_id
), claimed AS (
    INSERT INTO usage_rolled_up_requests (request_id)
    SELECT t.request_id FROM taken AS t ORDER BY t.request_id
    ON CONFLICT DO NOTHING
    RETURNING request_id
)
INSERT INTO usage_daily_rollups ({_COLUMNS})
SELECT {_LEDGER_KEY}, {_LEDGER_LABELS}, {_LEDGER_AGGREGATES}
FROM llm_requests AS r JOIN claimed AS c ON c.request_id = r.id
WHERE r.status <> 'refused'
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 3, 4
ON CONFLICT ON CONSTRAINT uq_usage_daily_rollups_day_account_id_agent_instance_id_model DO UPDATE SET
    {', '.join(f'{name} = usage_daily_rollups.{name} + EXCLUDED.{name}' for name in _COUNTERS)},
    {', '.join(f'{name} = greatest(usage_daily_rollups.{name}, EXCLUDED.{name})' for name in _LABELS)},
    updated_at = now()
RETURNING requests
"""

_RECOMPUTE_DELETE = text('DELETE FROM usage_daily_rollups WHERE day >= :first_day AND day <= :last_day')
# One statement, so the rows claimed and the rows summed come from one snapshot: a ledger row committed
# between two statements would otherwise be summed here unclaimed and counted again by the next roll-up.
_RECOMPUTE = text(f"""
WITH in_range AS (
    SELECT r.id FROM llm_requests AS r WHERE r.started_at >= :start AND r.started_at < :end
), claimed AS (
    INSERT INTO usage_rolled_up_requests (request_id) SELECT id FROM in_range ON CONFLICT DO NOTHING
), unqueued AS (
    DELETE FROM usage_pending_requests AS p USING in_range AS i WHERE p.request_id = i.id
)
INSERT INTO usage_daily_rollups ({_COLUMNS})
SELECT {_LEDGER_KEY}, {_LEDGER_LABELS}, {_LEDGER_AGGREGATES}
FROM llm_requests AS r JOIN in_range AS i ON i.id = r.id
WHERE r.status <> 'refused'
GROUP BY 1, 2, 3, 4
""")


async def roll_up_account_usage(account_id: int) -> int:
    """Background task after a chat turn: add the account's uncounted ledger rows to the rollup.

    Args:
        account_id: the account whose queued ledger rows to roll up (every one, however old).

    Returns:
        How many buckets were created or updated.
    """
    return await roll_up_pending(account_id=account_id) or 0


async def roll_up_pending(
    since: datetime | None = None, *, account_id: int | None = None, wait: bool = True
) -> int | None:
    """Add the ledger rows not counted yet to the rollup, for one account or all.

    Every ledger row is queued for the rollup by the statement that writes it (whoever writes it: a chat turn, an
    agent of one's own with `ledger_capability()`, a spool's replay), so nothing is missed however late a roll-up
    runs, and no clock is compared.

    Safe to run any number of times, concurrently too: each ledger row is counted once.

    Args:
        since: only rows recorded (`recorded_at`, the database's clock) at or after this; all when None.
        account_id: only this account's rows; every account's when None.
        wait: wait (up to 30 s) while a recompute holds the roll-ups off; when False, do nothing then and return
            None: a read about to show the rollup answers from it as it stands rather than wait (QA: a `source=rollup`
            read waited 30 s behind a recompute and answered 503).

    Returns:
        How many buckets were created or updated; None when `wait` is False and a recompute is running.
    """
    where, params = '', dict[str, Any]()
    if since is not None:
        where, params['since'] = f'{where} AND q.recorded_at >= :since', since
    if account_id is not None:
        where, params['account_id'] = f'{where} AND q.account_id = :account_id', account_id
    async with get_side_session(
        account=Unscoped.JOBS, lock_timeout_ms=_LOCK_TIMEOUT_MS, statement_timeout_ms=_STATEMENT_TIMEOUT_MS
    ) as session:
        if wait:
            await session.execute(_LOCK_SHARED, _LOCK_KEYS)
        elif not (await session.execute(_TRY_LOCK_SHARED, _LOCK_KEYS)).scalar_one():
            return None
        touched = len((await session.execute(text(_ROLL_UP.format(where=where)), params)).all())
    return touched


async def recompute_usage_rollups(first_day: date, last_day: date) -> int:
    """Rebuild the rollup of the UTC days `first_day`..`last_day` (inclusive) from the ledger.

    Runs under the exclusive roll-up lock, so no incremental roll-up interleaves; afterwards every
    ledger row of those days is marked counted.

    Returns:
        How many buckets the range now has.
    """
    params: dict[str, Any] = {'first_day': first_day, 'last_day': last_day, **_day_bounds(first_day, last_day)}
    async with get_side_session(
        account=Unscoped.JOBS, lock_timeout_ms=_LOCK_TIMEOUT_MS, statement_timeout_ms=_STATEMENT_TIMEOUT_MS
    ) as session:
        await session.execute(_LOCK_EXCLUSIVE, _LOCK_KEYS)
        await session.execute(_RECOMPUTE_DELETE, params)
        result = cast(CursorResult[Any], await session.execute(_RECOMPUTE, params))
    logger.info('usage rollup recomputed for %s..%s: %d buckets', first_day, last_day, result.rowcount)
    return result.rowcount


def _day_bounds(first_day: date, last_day: date) -> dict[str, datetime]:
    """Timestamps around the UTC days, so the ledger's `started_at` index bounds the scan."""
    return {
        'start': datetime.combine(first_day, time.min, UTC),
        'end': datetime.combine(last_day + timedelta(days=1), time.min, UTC),
    }
