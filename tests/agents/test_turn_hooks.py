"""`TurnHooks`: the turn's `ContextWindow` and `TurnGuard` as one capability still do each part's job.

The guard's and the window's behaviour in real turns (through `simple_chat`, which adds them as one `TurnHooks`) are
tested in `test_turn_race.py` and `test_long_conversation.py`; here, the delegation itself, on a bare run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic_ai import Agent, ModelRequestNode, RunContext
from pydantic_ai.capabilities import AbstractCapability, AgentNode
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, TextPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agentrt.agents.context_window import ContextWindow
from agentrt.agents.turn_hooks import TurnHooks, turn_hooks


class Stop(Exception):
    pass


@dataclass
class Guard(AbstractCapability[Any]):
    """Counts the model request nodes it saw; raises before the request numbered `stop_at`."""

    stop_at: int | None = None
    seen: list[str] = field(default_factory=list)

    async def before_node_run(self, ctx: RunContext[Any], *, node: AgentNode[Any]) -> AgentNode[Any]:
        if isinstance(node, ModelRequestNode):
            self.seen.append('request')
            if len(self.seen) == self.stop_at:
                raise Stop
        return node


def _history(turns: int) -> list[ModelMessage]:
    messages: list[ModelMessage] = []
    for i in range(turns):
        messages.append(ModelRequest(parts=[UserPromptPart(f'question {i} ' + 'x' * 400)]))
        messages.append(ModelResponse(parts=[TextPart(f'answer {i} ' + 'y' * 400)]))
    return messages


async def test_the_window_folds_each_request_and_the_guard_sees_each_one() -> None:
    sent: list[list[ModelMessage]] = []

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        sent.append(messages)
        return ModelResponse(parts=[TextPart('ok')])

    guard = Guard()
    agent = Agent(FunctionModel(respond))
    hooks = turn_hooks(ContextWindow(300, title='a topic'), guard)
    assert len(hooks) == 1 and isinstance(hooks[0], TurnHooks)
    result = await agent.run('now', message_history=_history(6), capabilities=hooks)
    assert guard.seen == ['request']
    # The window kept the latest turns within 300 tokens and put a summary in front; the run's history stays whole.
    first = sent[0][0]
    assert isinstance(first, ModelRequest) and 'Earlier in this conversation' in str(first.parts[0].content)
    assert len(sent[0]) < 13
    assert len(result.all_messages()) == 14


async def test_a_part_that_raises_stops_the_run_before_the_request() -> None:
    calls = 0

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        nonlocal calls
        calls += 1
        return ModelResponse(parts=[TextPart('ok')])

    with pytest.raises(Stop):
        await Agent(FunctionModel(respond)).run('now', capabilities=turn_hooks(ContextWindow(1000), Guard(stop_at=1)))
    assert calls == 0


async def test_each_run_gets_its_parts_own_copies() -> None:
    """`for_run` is delegated: a `ContextWindow` keeps its estimates per run, not shared between runs."""
    window = ContextWindow(1000)
    hooks = TurnHooks((window, Guard()))
    first, second = await hooks.for_run(None), await hooks.for_run(None)  # type: ignore[arg-type]
    assert isinstance(first.parts[0], ContextWindow) and isinstance(second.parts[0], ContextWindow)
    assert first.parts[0]._memo is not second.parts[0]._memo is not window._memo
