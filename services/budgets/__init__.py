"""Budgets: per-account spend limits that hold when model requests race.

Before every model request the ledger capability reserves what the request can cost at most (`reserve`: one conditional
statement on the account's window row; the request's `max_tokens` is capped to what was held), the ledger writer settles
the hold against the row's real cost in the statement that inserts the row (`settlement_ctes`, exactly once like the
ledger), `kept` renews a hold while its request is in flight, and `sweep_reservations` gives back the holds of processes
that died (or that nobody renewed). `set_budget`, `remove_budget`, `budget_statuses` are the administration
(`agentrt budget`, `GET /api/v1/budget`). The modules with a leading underscore are this wing's internals; README
"Budgets" has the semantics and the documented bound.
"""

from agentrt.db.processes import Holder, is_alive, this_process
from agentrt.services.budgets._admin import (
    MAX_LIMIT_USD,
    BudgetStatus,
    account_budget_status,
    budget_statuses,
    parse_limit,
    remove_budget,
    set_budget,
)
from agentrt.services.budgets._config import BudgetConfig, UnpricedMode
from agentrt.services.budgets._estimate import (
    Pricer,
    RequestSizes,
    output_bound_usd,
    pricer_for,
    size_class,
    supports_count_tokens,
)
from agentrt.services.budgets._renew import kept
from agentrt.services.budgets._reserve import Hold, Refusal, give_back, has_budget, open_window, release, reserve
from agentrt.services.budgets._settle import SETTLED_COLUMNS, WINDOW_LOCK, settlement_ctes
from agentrt.services.budgets._sweep import SweepReport, sweep_reservations, sweep_soon
from agentrt.services.budgets._windows import Period, default_anchor

__all__ = [
    'MAX_LIMIT_USD',
    'SETTLED_COLUMNS',
    'WINDOW_LOCK',
    'BudgetConfig',
    'BudgetStatus',
    'Hold',
    'Holder',
    'Period',
    'Pricer',
    'Refusal',
    'RequestSizes',
    'SweepReport',
    'UnpricedMode',
    'account_budget_status',
    'budget_statuses',
    'default_anchor',
    'give_back',
    'has_budget',
    'is_alive',
    'kept',
    'open_window',
    'output_bound_usd',
    'parse_limit',
    'pricer_for',
    'release',
    'remove_budget',
    'reserve',
    'set_budget',
    'settlement_ctes',
    'size_class',
    'supports_count_tokens',
    'sweep_reservations',
    'sweep_soon',
    'this_process',
]
