"""`TurnHooks`: a turn's `ContextWindow` and `TurnGuard` added to its run as one capability.

pydantic-ai calls every lifecycle hook of every capability of a run (about 95 calls in a demo turn of 3 model
requests and 7 tool calls), each with a copy of the run's context made for that capability, whether or not the
capability does anything in that hook. `ContextWindow` acts in one hook (`before_model_request`) and `TurnGuard` in
one (`before_node_run`): as one capability they cost the run one set of calls and copies instead of two. Each part
keeps its own module and its own tests; this only delegates the hooks they use, in the order they were added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic_ai import RunContext
from pydantic_ai.capabilities import AbstractCapability, AgentNode
from pydantic_ai.models import ModelRequestContext


@dataclass
class TurnHooks(AbstractCapability[Any]):
    """Delegates `for_run`, `before_node_run` and `before_model_request` to each of `parts`, in order.

    Only for parts that use no other hook (`ContextWindow`, `TurnGuard`): a part's other hooks are not called.
    """

    parts: tuple[AbstractCapability[Any], ...]

    async def for_run(self, ctx: RunContext[Any]) -> TurnHooks:
        """The parts' per-run copies."""
        return TurnHooks(tuple([await part.for_run(ctx) for part in self.parts]))

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


def turn_hooks(*parts: AbstractCapability[Any]) -> list[AbstractCapability[Any]]:
    """The capabilities a turn adds to its run: `parts` as one `TurnHooks`."""
    return [TurnHooks(parts)]
