"""Settling holds against ledger rows, in the ledger writer's statement that inserts those rows.

The writer inserts rows with `ON CONFLICT DO NOTHING ... RETURNING` and settles only the rows it inserted, in the
same statement (`settlement_ctes`, on what the insert returned), so a retried write or a replayed spool line settles
nothing twice: a row is new exactly once. For each new row that names an account:

- with a reservation (the ledger id is the reservation id): the reservation is deleted; its amount is to leave
  `reserved_usd` and the row's cost to join `spent_usd`;
- without one (its hold was swept after its process died or the hold expired, or it came from a process with
  budgets off): its cost is to join `spent_usd` of the account's window that its `started_at` falls in, if that
  window row exists (a window row created later sums the ledger rows already there).

"Is to": the writer appends one settlement row per window (`budget_settlements`) and never updates the window row
itself, so its commit (which waits for the disk) never holds the row that admissions of the account queue on. The
window's next admission folds the settlements into the row in its own statement (`_reserve.py`), as does the sweeper;
every reader of a window adds the settlements not folded yet (`budget_statuses`).

The cost charged is the ledger's `total_cost`. When the row has none: 0 for an unpriced model whose usage was
reported (its tokens still count in `spent_tokens`; a priced model's usage that cannot be priced is recorded
unmeasured, never as this), 0 for a request the provider answered with an HTTP error
(providers do not bill those), the whole hold for a complete response whose usage was never reported, and the
input's share of the hold for a failed or cancelled one (what was sent is billed). A failed or cancelled request
that had received output (a stream cut off before its end, where providers report usage) is charged at least its
input's share and what that output can cost at most (`output_bound_usd`, its UTF-8 size as tokens), within its hold,
whatever else it says: the provider bills the output it streamed, and a caller could otherwise read an answer and
hang up before its usage arrived, over and over, its answers free against the budget.

What a row is charged beyond its `total_cost` is also recorded (`budget_charges`, one row per such ledger row), so a
window's row built from the ledger later (its first admission, or after `budget set` changed the period) charges what
the settlement did: `total_cost` alone left these amounts out.
"""

from __future__ import annotations

WINDOW_LOCK = int.from_bytes(b'agentrtW', 'big')
"""The advisory lock between ledger writes and the creation of a budget window's row.

A ledger row without a hold (a turn that started before its account had a budget, a process with budgets off, a hold
swept) joins its window only if the writer's statement sees the window's row; a window's row is created (its first
admission, `_reserve.py`) with the ledger rows committed before it. A row whose writer's statement began before the
window's row existed and that committed after the window's row was created would be in neither. So every ledger
write transaction takes this lock shared before its statement (`TransactionSetup.shared_lock`, on its BEGIN), and a
window's row is created under it exclusive, in a statement that begins once the writes in flight committed: every
row is then summed into the new window's row or sees it and is settled into it, once."""

SETTLED_COLUMNS = ('id', 'account_id', 'started_at', 'total_cost', 'total_tokens', 'usage_reported', 'status',
                   'error_status_code', 'output_bound_usd')  # fmt: skip
"""The columns of the new ledger rows that settling reads (what the writer's insert returns)."""


def settlement_ctes(new: str) -> str:
    """Common table expressions that settle the holds of the ledger rows in the relation `new` (a CTE with
    `SETTLED_COLUMNS`, the rows the same statement has just inserted), to follow it in a `WITH` list: each starts
    with a comma, and the last, `settled`, appends the settlement rows.

    Only for rows inserted by the same statement: a row is new exactly once, so nothing is settled twice.
    """
    return f"""
, holds AS (
    DELETE FROM budget_reservations AS h USING {new} WHERE h.id = {new}.id AND {new}.account_id IS NOT NULL
    RETURNING h.id, h.account_id, h.period_start, h.amount_usd, h.input_usd
), charges AS (
    SELECT n.id, n.started_at, n.total_cost, h.account_id, h.period_start, h.amount_usd AS held,
           CASE WHEN n.output_bound_usd IS NOT NULL
                    THEN greatest(coalesce(n.total_cost, 0), least(h.amount_usd, h.input_usd + n.output_bound_usd))
                WHEN n.total_cost IS NOT NULL THEN n.total_cost
                WHEN n.usage_reported THEN 0
                WHEN n.status = 'complete' THEN h.amount_usd
                WHEN n.status = 'error' AND n.error_status_code IS NOT NULL THEN 0
                ELSE h.input_usd END AS cost,
           n.total_tokens AS tokens
    FROM holds AS h JOIN {new} AS n ON n.id = h.id
    UNION ALL
    SELECT n.id, n.started_at, n.total_cost, p.account_id, p.period_start, 0, coalesce(n.total_cost, 0),
           n.total_tokens
    FROM {new} AS n JOIN budget_periods AS p
        ON p.account_id = n.account_id AND p.period_start <= n.started_at AND n.started_at < p.period_end
    WHERE n.status <> 'refused' AND NOT EXISTS (SELECT 1 FROM holds AS h WHERE h.id = n.id)
), extras AS (
    -- What a window built from the ledger later (`_reserve.py`, `_admin.py`) adds to the rows' `total_cost`.
    INSERT INTO budget_charges (id, account_id, started_at, extra_usd)
    SELECT id, account_id, started_at, cost - coalesce(total_cost, 0) FROM charges
    WHERE cost > coalesce(total_cost, 0)
), settled AS (
    INSERT INTO budget_settlements (account_id, period_start, held_usd, spent_usd, tokens)
    SELECT account_id, period_start, sum(held), sum(cost), sum(tokens)
    FROM charges GROUP BY account_id, period_start
)"""
