"""`TurnGuard`: a turn that lost its conversation stops before its next model request.

The race policy (README, "Turns on one conversation"): one turn at a time per conversation. A turn claims the
conversation before loading it (`conversation_claim`); a second turn finds the claim and fails at once, before any
model request. The guard covers what the claim cannot: before every model request it checks that the claim is
still this turn's (a lease that expired while the event loop was stuck can be taken over) and that the stored
revision is still the one loaded (a writer that does not claim, such as pydantic-ai's UI adapters on the same
store, may have saved). Either way the turn stops with `ConcurrentTurnError` before that request is sent, so it is
billed only for what it sent before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic_ai import ModelRequestNode, RunContext
from pydantic_ai.capabilities import AbstractCapability, AgentNode

from agentrt.services.conversations import ConcurrentTurnError, PostgresConversationStore, TurnClaim


@dataclass
class TurnGuard(AbstractCapability[Any]):
    """Stop a turn before its next model request once its conversation is no longer its own.

    It checks in `before_node_run`, before the model request's lifecycle starts, so the ledger has no row for the
    request that was not sent.
    """

    store: PostgresConversationStore
    conversation_id: str
    revision: str | None
    """The revision the turn loaded; None for a conversation that did not exist yet."""
    claim: TurnClaim | None = None
    """The turn's claim on the conversation, when it holds one."""

    async def before_node_run(self, ctx: RunContext[Any], *, node: AgentNode[Any]) -> AgentNode[Any]:
        """Raise `ConcurrentTurnError` (stage 'request') before a model request when the turn lost its conversation."""
        if isinstance(node, ModelRequestNode):
            lost = self.claim is not None and self.claim.lost
            if lost or await self.store.read_revision(self.conversation_id) != self.revision:
                raise ConcurrentTurnError(self.conversation_id, stage='request')
        return node
