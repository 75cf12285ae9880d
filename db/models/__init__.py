"""ORM models. Importing this package registers every table on `Base.metadata`."""

from agentrt.db.models.api_keys import API_KEY_SCOPES, ApiKey
from agentrt.db.models.base import Base
from agentrt.db.models.budgets import (
    BUDGET_PERIODS,
    AccountBudget,
    BudgetCharge,
    BudgetPeriod,
    BudgetReservation,
    BudgetSettlement,
)
from agentrt.db.models.conversations import ConversationEntryRow, ConversationRow, ConversationTurnRow
from agentrt.db.models.directory import DirectoryEntry
from agentrt.db.models.ledger import LLMRequestContentRow, LLMRequestRow  # noqa: F401 - registers the ledger tables
from agentrt.db.models.tenancy import Account, AgentInstance
from agentrt.db.models.usage_rollups import (  # noqa: F401 - registers the rollup tables
    UsageDailyRollup,
    UsagePendingRequest,
    UsageRolledUpRequest,
)

__all__ = [
    'API_KEY_SCOPES',
    'BUDGET_PERIODS',
    'Account',
    'AccountBudget',
    'AgentInstance',
    'ApiKey',
    'Base',
    'BudgetCharge',
    'BudgetPeriod',
    'BudgetReservation',
    'BudgetSettlement',
    'ConversationEntryRow',
    'ConversationRow',
    'ConversationTurnRow',
    'DirectoryEntry',
]
