"""Holding part of an account's budget for one model request: one conditional statement, admitted or refused.

The statement locks the account's current window row only for itself: `UPDATE ... SET reserved = reserved + hold`
with the hold computed from the newest row version (PostgreSQL re-reads the row after waiting for its lock, READ
COMMITTED), so racing requests of an account are admitted one after the other, each seeing what the previous ones
hold, and no sequence of them can hold more than the limit. In the same statement it folds in the settlements the
ledger writer appended since (released holds, real costs), so the writer never has to lock the row. A window's first
request creates its row, with `spent_usd` summed from the ledger rows of the window. The hold is `least(:full, what
is left)`: a request near the limit is admitted with fewer output tokens (its caller caps `max_tokens` to what was
held), as long as `:minimum` fits; a refusal is counted on the row.

The statement runs on its own (autocommit: no `BEGIN`/`COMMIT` round trips), so the window row is locked only while
the server executes it, and it does not wait for its commit to reach the disk (`synchronous_commit` off for it):
admissions of one account queue behind each other for a fraction of a millisecond, not for a flush. A crash of the
database can lose the statement's last moments, atomically: a hold lost is as if swept (its request's cost still
counts when its ledger row arrives), and settlements folded are folded again.

A window's first request finds no row (the statement changes nothing then): it takes `WINDOW_LOCK` exclusive, which
waits for the ledger writes in flight to commit and holds new ones back, and runs the statement again to create the
row with the ledger rows of the window so far (`_settle.py` says why). Once per account and window. A request admitted
without a hold (an unpriced model counted) creates the row the same way (`open_window`), so reads never sum the
window's ledger rows once a request was admitted in it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import text

from agentrt.db.cancellation import undone_if_cancelled
from agentrt.db.errors import DatabaseDisconnectedError
from agentrt.db.processes import Holder, this_process
from agentrt.db.session import scoped_connection
from agentrt.services.budgets._orphans import orphan, released
from agentrt.services.budgets._settle import WINDOW_LOCK
from agentrt.services.budgets._windows import window_sql

_START, _END = window_sql('b', 'CAST(:at AS timestamptz)')
# What is left of the limit once the pending settlements are folded in.
_LEFT = 'budget.limit_usd - (p.spent_usd + f.spent) - (p.reserved_usd - f.held)'
_FRESH_LEFT = 'budget.limit_usd - s.spent'

# What the ledger holds for the window of `budget` (a window's row is created with it): summed once per account and
# window, under `WINDOW_LOCK` exclusive, and never once the row exists.
_LEDGER_SPENT = """
        -- What settlements charged beyond a row's total_cost (`budget_charges`), as the window row would have.
        SELECT coalesce(sum(r.total_cost), 0) + (
                   SELECT coalesce(sum(c.extra_usd), 0) FROM budget_charges AS c
                   WHERE c.account_id = budget.account_id
                     AND c.started_at >= budget.period_start AND c.started_at < budget.period_end
               ) AS spent,
               coalesce(sum(r.total_tokens), 0) AS tokens
        FROM llm_requests AS r
        WHERE r.account_id = budget.account_id AND r.status <> 'refused'
          AND r.started_at >= budget.period_start AND r.started_at < budget.period_end
    """

_RESERVE = text(f"""
WITH quick AS (
    SELECT set_config('synchronous_commit', 'off', true)
), budget AS (
    SELECT b.account_id, b.limit_usd, {_START} AS period_start, {_END} AS period_end
    FROM account_budgets AS b WHERE b.account_id = :account_id
), settled AS (
    DELETE FROM budget_settlements AS s USING budget
    WHERE s.account_id = budget.account_id AND s.period_start = budget.period_start
    RETURNING s.held_usd, s.spent_usd, s.tokens
), folded AS (
    SELECT coalesce(sum(held_usd), 0) AS held, coalesce(sum(spent_usd), 0) AS spent,
           coalesce(sum(tokens), 0) AS tokens
    FROM settled
), held AS (
    UPDATE budget_periods AS p
    SET spent_usd = p.spent_usd + f.spent,
        spent_tokens = p.spent_tokens + f.tokens,
        -- (never below 0: a broken invariant must not lock the account out; the CHECK stays for direct writes)
        reserved_usd = greatest(p.reserved_usd - f.held, 0)
            + CASE WHEN {_LEFT} >= :minimum THEN least(:full, {_LEFT}) ELSE 0 END,
        last_reserved_usd = CASE WHEN {_LEFT} >= :minimum THEN least(:full, {_LEFT}) END,
        -- One refusal a request: asked again after a refusal of its own (:again), that refusal is taken back first.
        refused_requests = greatest(p.refused_requests + CASE WHEN {_LEFT} >= :minimum THEN 0 ELSE 1 END
            - CASE WHEN CAST(:again AS boolean) THEN 1 ELSE 0 END, 0),
        updated_at = now()
    FROM budget, folded AS f
    WHERE p.account_id = budget.account_id AND p.period_start = budget.period_start
    RETURNING p.period_start, p.last_reserved_usd AS amount, p.spent_usd, p.reserved_usd
), missing AS MATERIALIZED (
    -- The window's first request only: the ledger is summed for it alone, never while the row exists, and only
    -- with :open (under `WINDOW_LOCK`, taken exclusive before this statement).
    SELECT budget.* FROM budget
    WHERE CAST(:open AS boolean) AND NOT EXISTS (
        SELECT 1 FROM budget_periods AS p
        WHERE p.account_id = budget.account_id AND p.period_start = budget.period_start
    )
), fresh AS (
    INSERT INTO budget_periods (account_id, period_start, period_end, spent_usd, spent_tokens, reserved_usd,
                                last_reserved_usd, refused_requests)
    SELECT budget.account_id, budget.period_start, budget.period_end, s.spent, s.tokens,
           CASE WHEN {_FRESH_LEFT} >= :minimum THEN least(:full, {_FRESH_LEFT}) ELSE 0 END,
           CASE WHEN {_FRESH_LEFT} >= :minimum THEN least(:full, {_FRESH_LEFT}) END,
           CASE WHEN {_FRESH_LEFT} >= :minimum THEN 0 ELSE 1 END
    FROM missing AS budget, LATERAL ({_LEDGER_SPENT}) AS s
    ON CONFLICT DO NOTHING
    RETURNING period_start, last_reserved_usd AS amount, spent_usd, reserved_usd
), window_row AS (
    SELECT * FROM held UNION ALL SELECT * FROM fresh
), hold AS (
    INSERT INTO budget_reservations (id, account_id, period_start, amount_usd, input_usd, holder_host, holder_pid,
                                     holder_started, expires_at)
    SELECT :id, :account_id, period_start, amount, least(:input, amount), :host, :pid, :started,
           now() + make_interval(secs => :ttl)
    FROM window_row WHERE amount IS NOT NULL
    RETURNING amount_usd
)
SELECT budget.limit_usd, budget.period_start, budget.period_end,
       (SELECT amount_usd FROM hold) AS amount,
       (SELECT spent_usd FROM window_row) AS spent_usd, (SELECT reserved_usd FROM window_row) AS reserved_usd,
       (SELECT count(*) FROM window_row) AS touched
FROM quick, budget
""")

_RELEASE = text("""
WITH r AS (DELETE FROM budget_reservations WHERE id = :id RETURNING account_id, period_start, amount_usd)
UPDATE budget_periods AS p SET reserved_usd = greatest(p.reserved_usd - r.amount_usd, 0), updated_at = now()
FROM r WHERE p.account_id = r.account_id AND p.period_start = r.period_start
""")

_OPEN_WINDOW = text('SELECT pg_advisory_xact_lock(:key)')

# Whether the account has a budget (no row: none) and its window at :at a row.
_WINDOW_ROW = text(f"""
SELECT EXISTS (
    SELECT 1 FROM budget_periods AS p WHERE p.account_id = b.account_id AND p.period_start = {_START}
) FROM account_budgets AS b WHERE b.account_id = :account_id
""")

# The window's row created, holding nothing, when it has none (run under `WINDOW_LOCK` exclusive, as `_RESERVE`'s
# `fresh`): the ledger is summed only then.
_CREATE_WINDOW = text(f"""
WITH budget AS (
    SELECT b.account_id, {_START} AS period_start, {_END} AS period_end
    FROM account_budgets AS b WHERE b.account_id = :account_id
), missing AS MATERIALIZED (
    SELECT budget.* FROM budget
    WHERE NOT EXISTS (
        SELECT 1 FROM budget_periods AS p
        WHERE p.account_id = budget.account_id AND p.period_start = budget.period_start
    )
)
INSERT INTO budget_periods (account_id, period_start, period_end, spent_usd, spent_tokens)
SELECT budget.account_id, budget.period_start, budget.period_end, s.spent, s.tokens
FROM missing AS budget, LATERAL ({_LEDGER_SPENT}) AS s
ON CONFLICT DO NOTHING
""")

_HAS_BUDGET = text('SELECT 1 FROM account_budgets WHERE account_id = :account_id')


@dataclass(frozen=True)
class Hold:
    """What one admitted request holds: `amount_usd` of the window starting `period_start`."""

    id: uuid.UUID
    account_id: int
    amount_usd: Decimal
    period_start: datetime


@dataclass(frozen=True)
class Refusal:
    """Why a request was not admitted: the window's figures when it was refused."""

    limit_usd: Decimal
    spent_usd: Decimal | None
    reserved_usd: Decimal | None
    period_start: datetime
    period_end: datetime


async def reserve(
    *,
    request_id: uuid.UUID,
    account_id: int,
    full_usd: Decimal,
    minimum_usd: Decimal,
    input_usd: Decimal,
    at: datetime,
    ttl_seconds: float,
    holder: Holder | None = None,
    again: bool = False,
) -> Hold | Refusal | None:
    """Hold up to `full_usd` of the account's current window for request `request_id`, in one statement.

    Args:
        request_id: the ledger request id (the hold is settled by the ledger row with this id).
        account_id: the account.
        full_usd: what the request costs at most with the output tokens its settings ask for.
        minimum_usd: the least it may be admitted with (its input and the fewest output tokens it may be given).
        input_usd: what its input costs at most (charged when it fails without reporting usage).
        at: the moment that picks the window (the ledger row's `started_at`).
        ttl_seconds: how long the hold lasts if nothing settles it and its process cannot be checked.
        holder: the process holding it; this one by default.
        again: asked again after a refusal of this request's own (and the sweep that followed it): the window's
            refusal count counts the request once, refused or admitted this time.

    Returns:
        The `Hold` (`amount_usd` may be below `full_usd`, never below `minimum_usd`), a `Refusal`, or None when
        the account has no budget.
    """
    holder = holder or this_process()
    params: dict[str, Any] = {
        'id': request_id,
        'account_id': account_id,
        'full': full_usd,
        'minimum': minimum_usd,
        'input': min(input_usd, full_usd),
        'at': at,
        'ttl': float(ttl_seconds),
        'host': holder.host,
        'pid': holder.pid,
        'started': holder.started,
        'again': again,
    }
    # A hold committed as the caller is cancelled is given back (`undone_if_cancelled`), not left to its TTL.
    try:
        return await undone_if_cancelled(_reserve(request_id, account_id, params), _release_hold)
    except DatabaseDisconnectedError:
        # The connection was lost under the statement: it may have committed, and the request will not be sent.
        await give_back(request_id, account_id)
        raise


async def give_back(hold_id: uuid.UUID, account_id: int) -> bool:
    """Release the hold `hold_id` if it exists, now or (the database away) at this process's next sweep (`_orphans`).

    Returns:
        True when it was released now (or did not exist); False when it is left to the sweep. Never raises an
        `Exception`: a hold that cannot be released now is remembered (a cancellation meanwhile leaves it remembered).
    """
    orphan(hold_id)
    try:
        async with scoped_connection(account=account_id) as connection:
            await connection.execute(_RELEASE, {'id': hold_id})
    except Exception:  # the database is still away (or the release failed): the sweep does it
        return False
    released([hold_id])
    return True


async def _reserve(request_id: uuid.UUID, account_id: int, params: dict[str, Any]) -> Hold | Refusal | None:
    # One transaction as the account's request role (row-level security); its role and tenant ride on the BEGIN.
    async with scoped_connection(account=account_id) as connection:
        params['open'] = False
        for _ in range(3):  # another request created the window's row between our snapshot and our insert
            found = (await connection.execute(_RESERVE, params)).mappings().first()
            if found is None:
                return None
            row = found
            if row['amount'] is not None:
                return Hold(request_id, account_id, row['amount'], row['period_start'])
            if row['touched']:
                return Refusal(
                    row['limit_usd'], row['spent_usd'], row['reserved_usd'], row['period_start'], row['period_end']
                )
            if not params['open']:
                # The window has no row yet: create it once the ledger writes in flight committed (`WINDOW_LOCK`),
                # in a statement whose snapshot has them; writes that begin meanwhile wait, then see the row.
                await connection.execute(_OPEN_WINDOW, {'key': WINDOW_LOCK})
                params['open'] = True
    return Refusal(row['limit_usd'], None, None, row['period_start'], row['period_end'])


async def open_window(account_id: int, at: datetime) -> None:
    """Create the row of the account's budget window that `at` falls in, if it has a budget and the window no row,
    without holding anything: what a request admitted without a hold (an unpriced model counted) does, so budget
    reads and the ledger's settlements use the row rather than sum the window's ledger rows each time.

    One key lookup once the row exists; the first time, the row is built from the ledger as a window's first
    reservation builds it (under `WINDOW_LOCK` exclusive, so a ledger row written meanwhile counts once).
    """
    async with scoped_connection(account=account_id) as connection:
        params = {'account_id': account_id, 'at': at}
        if (await connection.execute(_WINDOW_ROW, params)).scalar_one_or_none() is not False:
            return  # no budget, or the row is there
        await connection.execute(_OPEN_WINDOW, {'key': WINDOW_LOCK})
        await connection.execute(_CREATE_WINDOW, params)


async def _release_hold(result: Hold | Refusal | None) -> None:
    # Through `give_back`: with `release`, a database that failed the undo (its error swallowed by
    # `undone_if_cancelled`) left the hold to its TTL (15 min), not remembered for this process's next sweep (QA).
    if isinstance(result, Hold):
        await give_back(result.id, result.account_id)


async def release(hold: Hold) -> None:
    """Give back a hold whose request was never sent (a hook skipped it); a no-op if it was settled already."""
    async with scoped_connection(account=hold.account_id) as connection:
        await connection.execute(_RELEASE, {'id': hold.id})


async def has_budget(account_id: int) -> bool:
    """Whether the account has a budget."""
    async with scoped_connection(account=account_id) as connection:
        return (await connection.execute(_HAS_BUDGET, {'account_id': account_id})).first() is not None
