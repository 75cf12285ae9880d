"""`TurnHooks`: a turn's `ContextWindow` and `TurnGuard`, and the agent's ledger, added to its run as one capability.

pydantic-ai calls every lifecycle hook of every capability of a run (about 95 calls in a demo turn of 3 model
requests and 7 tool calls), each with a copy of the run's context made for that capability, whether or not the
capability does anything in that hook. `ContextWindow` acts in one hook (`before_model_request`), `TurnGuard` in one
(`before_node_run`) and the ledger in five (`for_run`, `wrap_run`, `wrap_model_request`, `after_model_request`,
`get_wrapper_model`): as one capability they cost the run one set of calls and copies instead of three (285 context
copies a demo turn instead of 378; the bare agent's own capabilities make 186).

The ledger is the agent's own (`ledger_capability()`, given to `Agent(capabilities=...)`): it stays usable on its
own, and records every run of the agent that is not a runtime turn. For a turn, `turn_hooks(..., agent=agent)` finds
it and wraps it with the parts in a `LedgeredTurnHooks`, a transparent `WrapperCapability` that takes the ledger's
`id`: pydantic-ai lets a run's capability replace the agent's capability of the same `id` for that run ("a run-level
capability replaces its agent-level namesake, whole"; a transparent wrapper names the capability it wraps), so the
ledger is dispatched once, through the turn's hooks. An agent whose ledger has no `id` keeps it as a capability of its
own (correct, one more set of calls); `create_simple_chat_agent` gives it `TURN_LEDGER_ID`.

Each part keeps its own module and its own tests; this only delegates the hooks they use (`PART_HOOKS`), in the order
they were added, before the ledger's; `tests/agents/test_turn_hooks.py` fails if a part comes to override another
hook. The ledger's hooks are all delegated, whichever it defines (`WrapperCapability`).
"""

from __future__ import annotations

from copy import copy
from dataclasses import dataclass, replace
from typing import Any

from pydantic_ai import Agent, RunContext
from pydantic_ai.capabilities import AbstractCapability, AgentNode, WrapperCapability
from pydantic_ai.models import ModelRequestContext

from agentrt.services.ledger import LedgerCapability

TURN_LEDGER_ID = 'agentrt.ledger'
"""The `id` `create_simple_chat_agent` gives its ledger capability, so a turn's `TurnHooks` can stand in for it."""

PART_HOOKS = ('for_run', 'before_node_run', 'before_model_request')
"""The hooks `TurnHooks` delegates to its parts."""


@dataclass
class TurnHooks(AbstractCapability[Any]):
    """Delegates `for_run`, `before_node_run` and `before_model_request` to each of `parts`, in order.

    Only for parts that use no other hook (`ContextWindow`, `TurnGuard`): a part's other hooks are not called. With
    a `ledger`, build it with `turn_hooks` (which gives it the ledger's `id`): it is then a `LedgeredTurnHooks`.
    """

    parts: tuple[AbstractCapability[Any], ...]

    async def for_run(self, ctx: RunContext[Any]) -> TurnHooks:
        """The parts' per-run copies."""
        return replace(self, parts=await _parts_for_run(self.parts, ctx))

    async def before_node_run(self, ctx: RunContext[Any], *, node: AgentNode[Any]) -> AgentNode[Any]:
        """Each part's `before_node_run`, the node passed along."""
        for part in self.parts:
            node = await part.before_node_run(ctx, node=node)
        return node

    async def before_model_request(
        self, ctx: RunContext[Any], request_context: ModelRequestContext
    ) -> ModelRequestContext:
        """Each part's `before_model_request`, the request context passed along."""
        for part in self.parts:
            request_context = await part.before_model_request(ctx, request_context)
        return request_context


@dataclass
class LedgeredTurnHooks(WrapperCapability[Any]):
    """`TurnHooks` around the agent's ledger capability (`wrapped`): every hook is the ledger's, and `for_run`,
    `before_node_run` and `before_model_request` are also each part's (the parts' first).

    A transparent wrapper: it takes the ledger's `id`, so in a run of that agent it replaces the agent's ledger
    (see the module's text), and pydantic-ai's own `WrapperCapability` delegates to the ledger whatever hooks it
    defines now or later.
    """

    parts: tuple[AbstractCapability[Any], ...] = ()

    async def for_run(self, ctx: RunContext[Any]) -> LedgeredTurnHooks:
        """The ledger's and the parts' per-run copies."""
        rebound = copy(await super().for_run(ctx))  # a copy even when the ledger kept itself: `self` is shared
        assert isinstance(rebound, LedgeredTurnHooks)
        rebound.parts = await _parts_for_run(self.parts, ctx)
        return rebound

    async def before_node_run(self, ctx: RunContext[Any], *, node: AgentNode[Any]) -> AgentNode[Any]:
        """Each part's `before_node_run`, then the ledger's, the node passed along."""
        for part in self.parts:
            node = await part.before_node_run(ctx, node=node)
        return await self.wrapped.before_node_run(ctx, node=node)

    async def before_model_request(
        self, ctx: RunContext[Any], request_context: ModelRequestContext
    ) -> ModelRequestContext:
        """Each part's `before_model_request`, then the ledger's, the request context passed along."""
        for part in self.parts:
            request_context = await part.before_model_request(ctx, request_context)
        return await self.wrapped.before_model_request(ctx, request_context)


async def _parts_for_run(parts: tuple[AbstractCapability[Any], ...], ctx: RunContext[Any]) -> tuple[Any, ...]:
    return tuple([await part.for_run(ctx) for part in parts])


def agent_ledger(agent: Agent[Any, Any]) -> LedgerCapability | None:
    """The agent's ledger capability when a turn's `TurnHooks` can stand in for it: one with an `id`, among the
    agent's own capabilities."""
    for capability in agent.root_capability.capabilities:
        if isinstance(capability, LedgerCapability) and capability.id is not None:
            return capability
    return None


def turn_hooks(*parts: AbstractCapability[Any], agent: Agent[Any, Any] | None = None) -> list[AbstractCapability[Any]]:
    """The capabilities a turn adds to its run: `parts` as one `TurnHooks`, carrying `agent`'s ledger when it has
    one with an `id` (`agent_ledger`), so that the run dispatches the ledger through it, not as a second capability.
    """
    ledger = agent_ledger(agent) if agent is not None else None
    if ledger is None:
        return [TurnHooks(parts)]
    return [LedgeredTurnHooks(ledger, parts=parts)]
