"""`SessionDependencies`: what every tool of a chat run can see through `ctx.deps`.

It lives in the tools layer because tools are typed against it (`RunContext[SessionDependencies]`) and tools must
not import agents; the agents build it (`agentrt.agents.chat_turn`, one per turn). The ledger reads its
identity through the `RunIdentity` protocol, which this class satisfies (checked by the type checker below).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentrt.services.ledger import RunIdentity


@dataclass(frozen=True)
class SessionDependencies:
    """Configuration and identity for one chat turn. Deliberately holds no database session.

    Pydantic AI runs the tool calls of one model response concurrently, one asyncio task each, and
    they all share this object. An `AsyncSession` here would be used by several tasks at once and
    fail ("This session is provisioning a new connection; concurrent operations are not permitted"),
    taking the cost-tracking write down with it. Tools open their own `async with get_db_session(account=...)`
    instead; this object only says *who* is asking, so every query can be scoped to the account.
    """

    session_id: str
    account_id: int
    account_slug: str
    agent_instance_id: int
    agent_instance_slug: str
    agent_type: str
    config: dict[str, Any] = field(default_factory=dict)
    account_has_budget: bool | None = None
    """Whether the account had a budget when the turn started (read with the tenant, no statement of its own).
    False: the ledger holds none of the run's requests against a budget (a budget set meanwhile applies from the next
    turn; the run's costs still count against it). None: not known, each request checks."""


if TYPE_CHECKING:

    def _ledger_reads_identity_from(deps: SessionDependencies) -> RunIdentity:
        """Fails type checking if `SessionDependencies` stops providing what the ledger reads."""
        return deps
