"""`turn_hooks`: a turn's `ContextWindow` and `TurnGuard` added to its run as one capability, the agent's ledger.

pydantic-ai calls every lifecycle hook of every capability of a run (about 95 calls in a demo turn of 3 model
requests and 7 tool calls), each with a copy of the run's context made for that capability, whether or not the
capability does anything in that hook. `ContextWindow` acts in one hook (`before_model_request`), `TurnGuard` in one
(`before_node_run`) and the ledger in five (`for_run`, `wrap_run`, `wrap_model_request`, `after_model_request`,
`get_wrapper_model`): as one capability they cost the run one set of calls and copies instead of three.

The ledger is the agent's own (`ledger_capability()`, given to `Agent(capabilities=...)`): it stays usable on its
own, and records every run of the agent that is not a runtime turn. For a turn, `turn_hooks(..., agent=agent)` finds
it and returns a copy of it with the parts as its `riders` (`LedgerCapability.riders`: their `for_run`,
`before_node_run` and `before_model_request` run inside the ledger's, before its own). pydantic-ai lets a run's
capability replace the agent's capability of the same `id` and type for that run ("a run-level capability replaces
its agent-level namesake, whole"), so the ledger is dispatched once, carrying the parts. An agent whose ledger has no
`id` keeps it as a capability of its own (correct, one more set of calls), and the parts go in a `TurnHooks`, as they
do beside a ledger the agent holds in another capability (`WrapperCapability(ledger_capability())`, a group, however
deep: `has_ledger` walks them); `create_simple_chat_agent` gives its ledger `TURN_LEDGER_ID`. An agent without a ledger
the turn can see (a user's own `Agent`, or one whose ledger a `DynamicCapability` makes only as the run starts) gets
one for the turn, carrying the parts, which stands in (`LedgerCapability.stands_in`): it records and holds the budget
only when no other ledger of the run does. Every model request of a turn is billed and admitted against the budget
once: a wrapped or dynamic ledger beside the turn's gave each request two rows, two holds and two charges (QA).

Each part keeps its own module and its own tests; `tests/agents/test_turn_hooks.py` fails if a part comes to
override a hook that is not delegated (`PART_HOOKS`).

Measured (issue 20, BENCHMARKS 3b): the riders cost a turn about 0.6 ms of CPU less than the same parts in a
`WrapperCapability` around the ledger, which doubled the frames of every hook pydantic-ai called on it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pydantic_ai import Agent, RunContext
from pydantic_ai.capabilities import AbstractCapability, AgentNode
from pydantic_ai.models import ModelRequestContext

from agentrt.services.ledger import RIDER_HOOKS, LedgerCapability, ledger_capability

TURN_LEDGER_ID = 'agentrt.ledger'
"""The `id` `create_simple_chat_agent` gives its ledger capability, so a turn can replace it with a copy carrying
the turn's parts (`turn_hooks`)."""

PART_HOOKS = RIDER_HOOKS
"""The hooks `TurnHooks`, and the ledger carrying the parts as its riders, delegate to the parts."""


@dataclass
class TurnHooks(AbstractCapability[Any]):
    """Delegates `for_run`, `before_node_run` and `before_model_request` to each of `parts`, in order.

    Only for parts that use no other hook (`ContextWindow`, `TurnGuard`): a part's other hooks are not called. For
    an agent with a ledger that has an `id`, `turn_hooks` puts the parts on the ledger instead (its `riders`).
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


async def _parts_for_run(parts: tuple[AbstractCapability[Any], ...], ctx: RunContext[Any]) -> tuple[Any, ...]:
    return tuple([await part.for_run(ctx) for part in parts])


def agent_ledger(agent: Agent[Any, Any]) -> LedgerCapability | None:
    """The agent's ledger capability when a turn can replace it for its run with a copy carrying the turn's parts: one
    with an `id`, among the agent's own capabilities."""
    for capability in agent.root_capability.capabilities:
        if isinstance(capability, LedgerCapability) and capability.id is not None:
            return capability
    return None


def has_ledger(capability: AbstractCapability[Any]) -> bool:
    """Whether `capability` is a ledger or holds one: in a wrapper (`wrapped`: `WrapperCapability` and its subclasses)
    or a group (`capabilities`: `CombinedCapability`), however deep, in pydantic-ai 2.68 and 2.78 alike. A
    `DynamicCapability`'s is made only as the run starts: the turn's ledger stands in for it (`turn_hooks`)."""
    if isinstance(capability, LedgerCapability):
        return True
    wrapped = getattr(capability, 'wrapped', None)
    if isinstance(wrapped, AbstractCapability) and has_ledger(wrapped):
        return True
    children = getattr(capability, 'capabilities', None)
    return isinstance(children, list | tuple) and any(
        isinstance(child, AbstractCapability) and has_ledger(child) for child in children
    )


def turn_hooks(*parts: AbstractCapability[Any], agent: Agent[Any, Any] | None = None) -> list[AbstractCapability[Any]]:
    """The capabilities a turn adds to its run: `agent`'s ledger carrying `parts` as its riders when it has one with
    an `id` (`agent_ledger`), which replaces the agent's for the run; `parts` as one `TurnHooks` beside the agent's own
    ledger when it has another (`has_ledger`: without an `id`, or in another capability); else a ledger carrying them
    that stands in for any the agent's run makes (`LedgerCapability.stands_in`: a `DynamicCapability`'s), so a turn is
    billed, and held against the account's budget, once, whatever agent runs it."""
    if agent is None:
        return [TurnHooks(parts)]
    ledger = agent_ledger(agent)
    if ledger is not None:
        return [replace(ledger, riders=(*ledger.riders, *parts))]
    if has_ledger(agent.root_capability):
        return [TurnHooks(parts)]
    return [ledger_capability(id=TURN_LEDGER_ID, riders=parts, stands_in=True)]
