"""Every error the runtime's public functions raise on purpose, in one place: catch `AgentRuntimeError` for all.

`simple_chat`, `simple_chat_stream`, the CLI and the HTTP API raise only these (never a driver error or an
undocumented pydantic-ai one); README.md lists them with what each means.
"""

from agentrt.db.errors import (
    AgentRuntimeError,
    BudgetExceededError,
    ConfigError,
    DatabaseDisconnectedError,
    DatabaseNotInitializedError,
    DatabaseUnavailableError,
    EmbeddedPostgresError,
    InvalidInputError,
    MigrationError,
    ModelBehaviorError,
    ModelProviderError,
    RuntimeBusyError,
    ShuttingDownError,
    TurnLimitExceededError,
)
from agentrt.services.conversations import ConcurrentTurnError
from agentrt.services.tenancy import UnknownTenantError

__all__ = [
    'AgentRuntimeError',
    'BudgetExceededError',
    'ConcurrentTurnError',
    'ConfigError',
    'DatabaseDisconnectedError',
    'DatabaseNotInitializedError',
    'DatabaseUnavailableError',
    'EmbeddedPostgresError',
    'InvalidInputError',
    'MigrationError',
    'ModelBehaviorError',
    'ModelProviderError',
    'RuntimeBusyError',
    'ShuttingDownError',
    'TurnLimitExceededError',
    'UnknownTenantError',
]
