"""`TurnGuard`: a turn that lost its conversation stops before its next model request.

The race policy (README, "Turns on one conversation"): one turn at a time per conversation. A turn claims the
conversation before loading it (`conversation_claim`); a second turn finds the claim and fails at once, before any
model request. The guard covers what the claim cannot: before every model request it checks that the claim is
still this turn's (a lease that expired while the event loop was stuck can be taken over) and that the stored
revision is still the one loaded (a writer that does not claim, such as pydantic-ai's UI adapters on the same
store, may have saved). Either way the turn stops with `ConcurrentTurnError` before that request is sent, so it is
billed only for what it sent before.

The check costs a statement, so it is made only once `check_after_s` (`AGENTRT_TURN_CHECK_SECONDS`) passed since the
turn last knew: the claim was taken with the load, and each check (or the claim's heartbeat) renews the lease and
reads the revision in one statement. A claim confirmed less than a lease ago cannot have been taken over, so no
takeover is missed (the setting may not exceed the lease); a writer that does not claim and saves within that
time is found by the save's compare-and-swap instead (stage 'save'). 0 checks before every request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pydantic_ai import CallToolsNode, ModelRequestNode, RunContext
from pydantic_ai.capabilities import AbstractCapability, AgentNode
from pydantic_ai.exceptions import UnexpectedModelBehavior

from agentrt.agents.run_errors import STREAM_ENDED_EARLY
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
    """The turn's claim on the conversation, when it holds one (it then knows when it was last confirmed)."""
    check_after_s: float = 0.0
    """Trust what was last confirmed this long before checking again (0: check before every request)."""
    _confirmed_at: float = field(default_factory=time.monotonic, repr=False, compare=False)

    async def before_node_run(self, ctx: RunContext[Any], *, node: AgentNode[Any]) -> AgentNode[Any]:
        """Raise `ConcurrentTurnError` (stage 'request') before a model request when the turn lost its conversation;
        and stop a turn before it acts on a streamed answer that ended before the provider's last event.

        pydantic-ai marks such an answer `incomplete` (the Responses API's stream without `response.completed`,
        Anthropic's, Google's, Mistral's without their last event: a proxy's idle timeout, a dropped connection that
        closed cleanly) and runs on with it: the turn was saved with an answer that may be cut off. It stops here, as
        a stream cut with an error does: `UnexpectedModelBehavior`, a `ModelProviderError` to the caller, nothing
        saved (the ledger's row says `error`).
        """
        if isinstance(node, ModelRequestNode) and not await self._still_ours():
            raise ConcurrentTurnError(self.conversation_id, stage='request')
        if isinstance(node, CallToolsNode) and node.model_response.state == 'incomplete':
            raise UnexpectedModelBehavior(STREAM_ENDED_EARLY)
        return node

    async def _still_ours(self) -> bool:
        claim = self.claim
        if claim is None:
            if time.monotonic() - self._confirmed_at < self.check_after_s:
                return True
            started = time.monotonic()
            revision = await self.store.read_revision(self.conversation_id)
            self._confirmed_at = started
            return revision == self.revision
        stale = time.monotonic() - claim.confirmed_at >= self.check_after_s
        if not claim.lost and (stale or not claim.knows_revision):
            await claim.check()
        return not claim.lost and claim.revision == self.revision
