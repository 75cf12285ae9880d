"""Settling holds against ledger rows, in the transaction of the ledger writer that inserts those rows.

The writer inserts rows with `ON CONFLICT DO NOTHING ... RETURNING id` and passes only the ids it inserted, so a
retried write or a replayed spool line settles nothing twice: a row is new exactly once. For each new row:

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
reported (its tokens still count in `spent_tokens`), 0 for a request the provider answered with an HTTP error
(providers do not bill those), the whole hold for a complete response whose usage was never reported, and the
input's share of the hold for a failed or cancelled one (what was sent is billed; what it produced is unknown).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

_SETTLE = text("""
WITH new AS (
    SELECT id, account_id, started_at, total_cost, total_tokens, usage_reported, status, error_status_code
    FROM llm_requests WHERE id = ANY(CAST(:ids AS uuid[])) AND account_id IS NOT NULL
), r AS (
    DELETE FROM budget_reservations AS h USING new WHERE h.id = new.id
    RETURNING h.id, h.account_id, h.period_start, h.amount_usd, h.input_usd
), charges AS (
    SELECT r.account_id, r.period_start, r.amount_usd AS held,
           CASE WHEN new.total_cost IS NOT NULL THEN new.total_cost
                WHEN new.usage_reported THEN 0
                WHEN new.status = 'complete' THEN r.amount_usd
                WHEN new.status = 'error' AND new.error_status_code IS NOT NULL THEN 0
                ELSE r.input_usd END AS cost,
           new.total_tokens AS tokens
    FROM r JOIN new ON new.id = r.id
    UNION ALL
    SELECT p.account_id, p.period_start, 0, coalesce(new.total_cost, 0), new.total_tokens
    FROM new JOIN budget_periods AS p
        ON p.account_id = new.account_id AND p.period_start <= new.started_at AND new.started_at < p.period_end
    WHERE new.status <> 'refused' AND NOT EXISTS (SELECT 1 FROM r WHERE r.id = new.id)
)
INSERT INTO budget_settlements (account_id, period_start, held_usd, spent_usd, tokens)
SELECT account_id, period_start, sum(held), sum(cost), sum(tokens)
FROM charges GROUP BY account_id, period_start
""")


async def settle_ledger_rows(session: AsyncSession, request_ids: Sequence[uuid.UUID]) -> None:
    """Settle the holds of the ledger rows `request_ids`, which this transaction has just inserted.

    Call it in the inserting transaction, with only the ids the insert returned (new rows), after the rows.
    """
    if request_ids:
        await session.execute(_SETTLE, {'ids': list(request_ids)})
