"""`TurnGuard`: the race policy for turns on one conversation, lose early.

Turns on one conversation are not queued (a queue across processes would need a lock held across model calls).
They race optimistically: each loads the conversation at some revision and the first to save wins (compare-and-swap
in the store). `TurnGuard` makes the losers find out early: before every model request of the turn it reads the
stored revision (one key lookup) and, if another turn saved meanwhile, stops the turn with `ConcurrentTurnError`
before that request is sent, so a lost turn is billed only for the requests it sent before the winner saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic_ai import ModelRequestNode, RunContext
from pydantic_ai.capabilities import AbstractCapability, AgentNode

from agentrt.services.conversations import ConcurrentTurnError, PostgresConversationStore


@dataclass
class TurnGuard(AbstractCapability[Any]):
    """Stop a turn before its next model request once another turn has saved its conversation.

    It checks in `before_node_run`, before the model request's lifecycle starts, so the ledger has no row for the
    request that was not sent.
    """

    store: PostgresConversationStore
    conversation_id: str
    revision: str | None
    """The revision the turn loaded; None for a conversation that did not exist yet."""

    async def before_node_run(self, ctx: RunContext[Any], *, node: AgentNode[Any]) -> AgentNode[Any]:
        """Raise `ConcurrentTurnError` before a model request when the stored revision moved on."""
        if isinstance(node, ModelRequestNode):
            if await self.store.read_revision(self.conversation_id) != self.revision:
                raise ConcurrentTurnError(self.conversation_id, stopped_early=True)
        return node
