"""The LLM ledger: a billing and audit row for every model request, written so it is never lost nor counted twice.

Write path: `ledger_capability()` (on an agent or a run) builds a `LedgerRecord` per model request and hands it to
the process-wide `LLMRequestTracker`, which group-commits rows in side sessions (a run's rows together, with a short
commit delay: `LedgerConfig.commit_delay_ms`), retries, spools to a file when the database is down and replays it.
Read path: `list_requests`, `get_request`, `summarise_costs` (from the ledger or the daily rollup kept by
`roll_up_pending`; `catch_up_rollup` before a read of it). Retention: `prune_contents` deletes stored bodies, keeping
the billing rows. Secrets are redacted (`agentrt.services.ledger.redaction`) from every string of the messages before
any body is stored or spooled, once per message per run (in worker threads, unless a body is small and holds no
possible secret). The modules with a leading underscore are this wing's internals.
"""

from typing import TYPE_CHECKING, Any

from agentrt.services.ledger._config import LedgerConfig, default_spool_path
from agentrt.services.ledger._costs import COST_GROUPINGS, COST_SOURCES, CostGrouping, CostSummary, summarise_costs
from agentrt.services.ledger._filters import CostSource, LedgerFilters, RollupCannotAnswer
from agentrt.services.ledger._identity import LedgerIdentity, RunIdentity, identity_of
from agentrt.services.ledger._prune import (
    PRUNE_BATCH_REQUESTS,
    PruneReport,
    account_count,
    conversation_accounts,
    ledger_knows_account,
    prune_contents,
)
from agentrt.services.ledger._queries import (
    MAX_PAGE_SIZE,
    AmbiguousRequestIdError,
    LedgerDetail,
    LedgerPage,
    agent_is_known,
    agent_slugs,
    get_request,
    list_requests,
    request_position,
)
from agentrt.services.ledger._retry import RetryPolicy, is_transient_db_error
from agentrt.services.ledger._rollups import (
    catch_up_rollup,
    recompute_usage_rollups,
    roll_up_account_usage,
    roll_up_pending,
)
from agentrt.services.ledger._spool import LedgerSpool

if TYPE_CHECKING:
    from agentrt.services.ledger._capability import RIDER_HOOKS, LedgerCapability, ledger_capability, usage_plausible
    from agentrt.services.ledger._known_json import dumped_message_json, is_as_loaded, remember_message_json
    from agentrt.services.ledger._queues import TrackerStats, WriteOutcome
    from agentrt.services.ledger._record import (
        MAX_COST_USD,
        MAX_TOKENS,
        ContentKind,
        LedgerRecord,
        Status,
        implausible_amount,
        new_request_id,
        utc_now,
    )
    from agentrt.services.ledger._replay import ReplayReport
    from agentrt.services.ledger._tracker import (
        LLMRequestTracker,
        existing_request_tracker,
        get_request_tracker,
        set_request_tracker,
    )

# The write path imports pydantic-ai (its message types), about 0.7 s of CPU: it is imported when first used, so
# the commands that only read the ledger (`agentrt costs`, `agentrt audit`) start without it.
_WRITE_PATH = {
    'LedgerCapability': '_capability',
    'RIDER_HOOKS': '_capability',
    'ledger_capability': '_capability',
    'usage_plausible': '_capability',
    'dumped_message_json': '_known_json',
    'is_as_loaded': '_known_json',
    'remember_message_json': '_known_json',
    'TrackerStats': '_queues',
    'WriteOutcome': '_queues',
    'ContentKind': '_record',
    'MAX_COST_USD': '_record',
    'MAX_TOKENS': '_record',
    'LedgerRecord': '_record',
    'Status': '_record',
    'implausible_amount': '_record',
    'new_request_id': '_record',
    'utc_now': '_record',
    'ReplayReport': '_replay',
    'LLMRequestTracker': '_tracker',
    'existing_request_tracker': '_tracker',
    'get_request_tracker': '_tracker',
    'set_request_tracker': '_tracker',
}


def __getattr__(name: str) -> Any:
    """Import a name of the write path on first use (PEP 562)."""
    module = _WRITE_PATH.get(name)
    if module is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    from importlib import import_module

    value = getattr(import_module(f'{__name__}.{module}'), name)
    globals()[name] = value  # the next lookup does not come here
    return value


__all__ = [
    'COST_GROUPINGS',
    'COST_SOURCES',
    'MAX_COST_USD',
    'MAX_PAGE_SIZE',
    'MAX_TOKENS',
    'PRUNE_BATCH_REQUESTS',
    'RIDER_HOOKS',
    'AmbiguousRequestIdError',
    'ContentKind',
    'CostGrouping',
    'CostSource',
    'CostSummary',
    'LLMRequestTracker',
    'LedgerCapability',
    'LedgerConfig',
    'LedgerDetail',
    'LedgerFilters',
    'LedgerIdentity',
    'LedgerPage',
    'LedgerRecord',
    'LedgerSpool',
    'PruneReport',
    'ReplayReport',
    'RetryPolicy',
    'RollupCannotAnswer',
    'RunIdentity',
    'Status',
    'TrackerStats',
    'WriteOutcome',
    'account_count',
    'agent_is_known',
    'agent_slugs',
    'catch_up_rollup',
    'conversation_accounts',
    'default_spool_path',
    'dumped_message_json',
    'existing_request_tracker',
    'get_request',
    'get_request_tracker',
    'identity_of',
    'implausible_amount',
    'is_as_loaded',
    'is_transient_db_error',
    'ledger_capability',
    'ledger_knows_account',
    'list_requests',
    'new_request_id',
    'prune_contents',
    'recompute_usage_rollups',
    'remember_message_json',
    'request_position',
    'roll_up_account_usage',
    'roll_up_pending',
    'set_request_tracker',
    'summarise_costs',
    'usage_plausible',
    'utc_now',
]
