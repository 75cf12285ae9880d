"""ORM models. Importing this package registers every table on `Base.metadata`."""

from db.models.base import Base
from db.models.conversations import ConversationEntryRow, ConversationRow
from db.models.directory import DirectoryEntry
from db.models.ledger import LLMRequestContentRow, LLMRequestRow  # noqa: F401 - registers the ledger tables
from db.models.tenancy import Account, AgentInstance
from db.models.usage_rollups import UsageDailyRollup, UsageRolledUpRequest  # noqa: F401 - registers the rollup tables

__all__ = ['Account', 'AgentInstance', 'Base', 'ConversationEntryRow', 'ConversationRow', 'DirectoryEntry']
