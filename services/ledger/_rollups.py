"""Daily usage per account, agent (its instance and name) and model: rolled up from the ledger once, and recomputable.

`summarise_costs(source='rollup')` reads it.
"""

from __future__ import annotations

import logging
import time as clock
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, text

from agentrt.db.failures import causes, sqlstate_of
from agentrt.db.session import Unscoped, get_read_only_session, get_side_session

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
# A bucket: the incremental upsert, the recompute and the model's unique constraint (migration 0021) share this key.
# The agent's name is in it, not a label: two agents on one instance, or agents without one, were one bucket under the
# greatest name, and reports filtered and grouped by that name (`costs --agent`, `--by agent`) moved a day's usage to
# the wrong agent (QA).
_KEY_COLUMNS = ('day', 'account_id', 'agent_instance_id', 'agent_name', 'model')
_KEY = ', '.join(_KEY_COLUMNS)
_BUCKET = 'uq_usage_daily_rollups_bucket'
# One UTC day per row; the same expression in the incremental and the recompute path keeps them equal.
_LEDGER_KEY = "(r.started_at AT TIME ZONE 'UTC')::date AS day, " + ', '.join(f'r.{name}' for name in _KEY_COLUMNS[1:])
_GROUP_BY_KEY = ', '.join(str(position) for position in range(1, len(_KEY_COLUMNS) + 1))
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
_LABELS = ('account_slug', 'agent_instance_slug')
_LEDGER_LABELS = ', '.join(f'max(r.{name}) AS {name}' for name in _LABELS)
_COLUMNS = f'{_KEY}, {", ".join(_LABELS)}, {", ".join(_COUNTERS)}'

# A roll-up takes the queue this many rows a transaction, each committed: one statement over the whole queue (millions
# of rows after an upgrade whose ledger was never rolled up) outran the statement timeout, rolled back and made no
# progress, again at every later roll-up (QA: ~18.6k rows/s on 2 cores). A batch takes a fraction of a second.
ROLL_UP_BATCH = 5_000
# How long a read (`source=rollup`) rolls up before it answers: from the rollup when that caught up with the queue,
# else from the ledger. A read waited for the whole backlog (minutes after an upgrade) before.
READ_ROLL_UP_SECONDS = 3.0

# Take up to `:batch` queued rows past `:after` in key order (ids are time-ordered: a cursor, so a batch never walks
# again over the rows earlier batches deleted) and claim them (the claim is the idempotency key: a row counted by a
# recompute, or by a roll-up of an earlier version, is claimed already and counted nothing twice), then add just the
# newly claimed rows to their buckets; rows a budget refused are claimed (so they are not looked at again) but not
# counted: those requests were never sent. Queued rows another roll-up is taking are skipped, not waited for (the
# limit counts only rows taken). Sorted so two roll-ups touching the same buckets lock them in the same order and
# cannot deadlock. One row per bucket touched (a row of NULL buckets when none), each with how many rows the batch
# took and the last one's id.
# The batch is picked once (MATERIALIZED): as `DELETE ... WHERE request_id IN (SELECT ... LIMIT :batch FOR UPDATE SKIP
# LOCKED)`, a plan that ran the subquery again per outer row (a nested loop) skipped the rows this statement had just
# deleted and picked the next ones, so one batch took 19 or 27 rows of 10 and the cursor jumped past rows left queued
# (CI: a roll-up of 37 rows in 2 batches, a read's one batch taking 19).
_ROLL_UP = f"""
WITH picked AS MATERIALIZED (
    SELECT q.request_id FROM usage_pending_requests AS q WHERE q.request_id > :after {{where}}
    ORDER BY q.request_id LIMIT :batch FOR UPDATE SKIP LOCKED
), taken AS (
    DELETE FROM usage_pending_requests AS p USING picked
    WHERE p.request_id = picked.request_id
    RETURNING p.request_id
), claimed AS (
    INSERT INTO usage_rolled_up_requests (request_id)
    SELECT t.request_id FROM taken AS t ORDER BY t.request_id
    ON CONFLICT DO NOTHING
    RETURNING request_id
), buckets AS (
    INSERT INTO usage_daily_rollups ({_COLUMNS})
    SELECT {_LEDGER_KEY}, {_LEDGER_LABELS}, {_LEDGER_AGGREGATES}
    FROM llm_requests AS r JOIN claimed AS c ON c.request_id = r.id
    WHERE r.status <> 'refused'
    GROUP BY {_GROUP_BY_KEY}
    ORDER BY {_GROUP_BY_KEY}
    ON CONFLICT ON CONSTRAINT {_BUCKET} DO UPDATE SET
        {', '.join(f'{name} = usage_daily_rollups.{name} + EXCLUDED.{name}' for name in _COUNTERS)},
        {', '.join(f'{name} = greatest(usage_daily_rollups.{name}, EXCLUDED.{name})' for name in _LABELS)},
        updated_at = now()
    RETURNING {_KEY}
)
SELECT s.taken, s.last_id, {', '.join(f'b.{name}' for name in _KEY_COLUMNS)}
FROM (SELECT count(*) AS taken, (SELECT t.request_id FROM taken AS t ORDER BY 1 DESC LIMIT 1) AS last_id
    FROM taken) AS s
LEFT JOIN buckets AS b ON true
"""
# Below every id: the first batch's cursor.
_FIRST_ID = uuid.UUID(int=0)
# Anything queued, in the scope of a read: one probe of `ix_usage_pending_requests_account_id_request_id` for an
# account.
_QUEUED = 'SELECT EXISTS (SELECT 1 FROM usage_pending_requests AS q WHERE true {where})'
_STATEMENT_TIMEOUT = text("SELECT set_config('statement_timeout', :ms, true)")
# The least a read's statement is given, however little of its seconds is left.
_LEAST_MS = 200

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
GROUP BY {_GROUP_BY_KEY}
""")


async def roll_up_account_usage(account_id: int, *, keep_going: Callable[[], bool] | None = None) -> int:
    """Background task after a chat turn: add the account's uncounted ledger rows to the rollup.

    Args:
        account_id: the account whose queued ledger rows to roll up (every one, however old).
        keep_going: asked before each batch after the first; False stops the roll-up there, the rest left queued
            (the post-turn roll-up's supervisor shutting down: a one-shot `agentrt chat` after an upgrade waited its
            10 s at exit on a backlog of millions and printed that it cancelled the roll-up, QA).

    Returns:
        How many buckets were created or updated.
    """
    return await roll_up_pending(account_id=account_id, keep_going=keep_going) or 0


async def catch_up_rollup(account_id: int | None = None, *, seconds: float | None = None) -> bool:
    """Before a read of the rollup: roll up what is queued for a while, then say whether the rollup holds it all.

    A read that answered from the rollup after its roll-up skipped rows another roll-up was taking (a long one, or
    one just in flight) left them out without a word (QA: 375,439 requests answered of 3,333,001); one that drained a
    backlog of millions first took minutes. The caller reads the ledger when this returns False.

    Args:
        account_id: the read's account; every account's rows (and those of none) when None.
        seconds: how long to roll up, `READ_ROLL_UP_SECONDS` when None (each statement cancelled past it).

    Returns:
        True when nothing of the scope is queued any more: the rollup answers as the ledger would. False when rows
        are still queued (held by another roll-up, or the time ran out) or a recompute is rebuilding the rollup.
    """
    budget = READ_ROLL_UP_SECONDS if seconds is None else seconds
    started = clock.monotonic()
    try:
        if await roll_up_pending(account_id=account_id, wait=False, seconds=budget) is None:
            return False
        where, params = (
            ('', {}) if account_id is None else ('AND q.account_id = :account_id', {'account_id': account_id})
        )
        # Rows another roll-up has taken but not committed are still seen here, so they count as queued; the request
        # role may read its own account's queue (migration 0019). Bounded too: a queue just drained of millions of
        # rows leaves dead entries to walk past until vacuum.
        async with get_read_only_session(account=Unscoped.JOBS if account_id is None else account_id) as session:
            await session.execute(_STATEMENT_TIMEOUT, {'ms': str(_left_ms(started, budget))})
            queued = (await session.execute(text(_QUEUED.format(where=where)), params)).scalar_one()
    except Exception as exc:
        if not any(sqlstate_of(error) == '57014' for error in causes(exc)):
            raise
        return False  # a batch or the check outran the read's seconds: the ledger answers
    return not queued


async def roll_up_pending(
    since: datetime | None = None,
    *,
    account_id: int | None = None,
    wait: bool = True,
    seconds: float | None = None,
    keep_going: Callable[[], bool] | None = None,
) -> int | None:
    """Add the ledger rows not counted yet to the rollup, for one account or all.

    Every ledger row is queued for the rollup by the statement that writes it (whoever writes it: a chat turn, an
    agent of one's own with `ledger_capability()`, a spool's replay), so nothing is missed however late a roll-up
    runs, and no clock is compared.

    Safe to run any number of times, concurrently too: each ledger row is counted once. The queue is taken
    `ROLL_UP_BATCH` rows a transaction, each committed as it ends, in id order (time order) until a batch finds fewer:
    a roll-up stopped midway (a cancellation, a lost connection) loses only its current batch, which stays queued for
    the next one; a row queued meanwhile with an older id (a spool's replay) waits for the next roll-up too.

    Args:
        since: only rows recorded (`recorded_at`, the database's clock) at or after this; all when None.
        account_id: only this account's rows; every account's when None.
        wait: wait (up to 30 s) while a recompute holds the roll-ups off; when False, do nothing then and return
            None: a read about to show the rollup answers from the ledger rather than wait (`catch_up_rollup`; QA: a
            `source=rollup` read waited 30 s behind a recompute and answered 503). Asked before each batch: batches
            committed before a recompute began stay counted.
        seconds: stop after the batch that ends this many seconds after the start, rows left queued, each batch's
            statement cancelled when it would run past them (a read's budget, `catch_up_rollup`: QA, a single batch
            walking a drained queue took 11 s); None: take the whole queue (the background roll-ups).
        keep_going: asked before each batch after the first: False stops there, the rest left queued.

    Returns:
        How many buckets were created or updated (each once, however many batches touched it); None when `wait` is
        False and a recompute is running.
    """
    where, params = '', dict[str, Any]()
    if since is not None:
        where, params['since'] = f'{where} AND q.recorded_at >= :since', since
    if account_id is not None:
        where, params['account_id'] = f'{where} AND q.account_id = :account_id', account_id
    statement = text(_ROLL_UP.format(where=where))
    touched = set[tuple[Any, ...]]()
    after, started = _FIRST_ID, clock.monotonic()
    deadline = None if seconds is None else started + seconds
    while True:
        timeout_ms = _STATEMENT_TIMEOUT_MS if seconds is None else _left_ms(started, seconds)
        batch = await _roll_up_batch(
            statement, {**params, 'after': after, 'batch': ROLL_UP_BATCH}, wait=wait, timeout_ms=timeout_ms
        )
        if batch is None:
            return None
        taken, last_id, buckets = batch
        touched |= buckets
        if taken < ROLL_UP_BATCH or (deadline is not None and clock.monotonic() >= deadline):
            return len(touched)
        if keep_going is not None and not keep_going():
            return len(touched)
        after = last_id


def _left_ms(started: float, seconds: float) -> int:
    """What is left of `seconds` from `started`, in milliseconds, at least `_LEAST_MS` (a statement must get to run)."""
    return max(int((started + seconds - clock.monotonic()) * 1000), _LEAST_MS)


async def _roll_up_batch(
    statement: Any, params: dict[str, Any], *, wait: bool, timeout_ms: int
) -> tuple[int, uuid.UUID, set[tuple[Any, ...]]] | None:
    """One batch in a transaction of its own, under the shared roll-up lock (a recompute takes it between batches).

    Returns:
        How many queued rows it took, the last one's id and the buckets it touched; None when `wait` is False and a
        recompute holds the lock.
    """
    async with get_side_session(
        account=Unscoped.JOBS, lock_timeout_ms=_LOCK_TIMEOUT_MS, statement_timeout_ms=timeout_ms
    ) as session:
        if wait:
            await session.execute(_LOCK_SHARED, _LOCK_KEYS)
        elif not (await session.execute(_TRY_LOCK_SHARED, _LOCK_KEYS)).scalar_one():
            return None
        rows = (await session.execute(statement, params)).all()
    buckets = {tuple(row[2:]) for row in rows if row.day is not None}  # a bucket's day is never NULL
    return rows[0].taken, rows[0].last_id, buckets


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
