"""`turn_hooks`: the turn's `ContextWindow` and `TurnGuard` as one capability (`TurnHooks`, or riding on the agent's
ledger) still do each part's job, and the ledger its own.

The guard's and the window's behaviour in real turns (through `simple_chat`, which puts them on the default agent's
ledger as its riders) are tested in `test_turn_race.py` and `test_long_conversation.py`, the ledger's
in `test_simple_chat.py` and `test_run_errors.py`; here, the delegation itself, on bare runs, with the ledger
writing to the real database.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic_ai import Agent, ModelRequestNode, RunContext
from pydantic_ai.capabilities import (
    AbstractCapability,
    AgentNode,
    CombinedCapability,
    DynamicCapability,
    WrapperCapability,
)
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.run import AgentRunResultEvent

from agentrt.agents.context_window import ContextWindow
from agentrt.agents.simple_chat import create_simple_chat_agent, simple_chat, simple_chat_stream
from agentrt.agents.turn_guard import TurnGuard
from agentrt.agents.turn_hooks import (
    PART_HOOKS,
    TURN_LEDGER_ID,
    TurnHooks,
    agent_ledger,
    turn_hooks,
)
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.budgets import budget_statuses
from agentrt.services.ledger import LedgerCapability, LLMRequestTracker, get_request_tracker, ledger_capability
from agentrt.tools.dependencies import SessionDependencies
from tests.agents.conftest import account_id
from tests.factories import chat_deps, content_rows, ledger_rows, scalar
from tests.services.budgets.helpers import give_budget
from tests.services.budgets.priced_model import PricedModel


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


async def test_each_run_of_the_ledger_gets_its_riders_own_copies() -> None:
    window = ContextWindow(1000)
    [ledger] = turn_hooks(window, agent=create_simple_chat_agent())
    assert isinstance(ledger, LedgerCapability)
    ctx = SimpleNamespace(deps=chat_deps())  # what the ledger's per-run state reads of a run's context
    first, second = await ledger.for_run(ctx), await ledger.for_run(ctx)
    assert isinstance(first.riders[0], ContextWindow) and isinstance(second.riders[0], ContextWindow)
    assert first.riders[0]._memo is not second.riders[0]._memo is not window._memo
    assert first._run is not second._run


# --- the agent's ledger carried by the turn's hooks -------------------------------------------------------------


def _tool_then_text(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """A tool call, then (once its result came back) the answer: two requests."""
    if any(isinstance(part, ToolReturnPart) for part in messages[-1].parts):
        return ModelResponse(parts=[TextPart('done')])
    return ModelResponse(parts=[ToolCallPart('echo', {'text': 'hi'})])


async def _words(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
    for word in ['one ', 'two ', 'three ', 'four ']:
        await asyncio.sleep(0.005)
        yield word


def _overloaded(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    raise ModelHTTPError(status_code=503, model_name='gpt-4o-mini', body={'error': 'overloaded'})


def _ledgered_agent(tracker: LLMRequestTracker, model: FunctionModel) -> Agent[Any, str]:
    agent: Agent[Any, str] = Agent(model, capabilities=[ledger_capability(tracker, id=TURN_LEDGER_ID)])

    @agent.tool_plain
    def echo(text: str) -> str:
        return text

    return agent


def test_a_turn_carries_the_simple_chat_agents_ledger_and_an_agent_without_one_keeps_it_apart() -> None:
    agent = create_simple_chat_agent()
    ledger = agent_ledger(agent)
    assert isinstance(ledger, LedgerCapability) and ledger.id == TURN_LEDGER_ID
    window, guard = ContextWindow(1000), Guard()
    [hooks] = turn_hooks(window, guard, agent=agent)
    # A copy of the agent's ledger (same type and id, so it replaces the agent's for the run) carrying the parts.
    assert type(hooks) is LedgerCapability and hooks is not ledger and hooks.id == TURN_LEDGER_ID
    assert hooks.riders == (window, guard) and ledger.riders == ()
    assert (hooks.tracker, hooks.store_content, hooks.budget) == (ledger.tracker, ledger.store_content, ledger.budget)
    # A ledger without an id cannot be replaced for a run: the turn's hooks leave it be.
    apart = Agent(FunctionModel(_overloaded), capabilities=[ledger_capability()])
    assert agent_ledger(apart) is None
    assert type(turn_hooks(Guard(), agent=apart)[0]) is TurnHooks


@pytest.mark.parametrize('outcome', ['plain', 'streamed', 'failed', 'cancelled'])
async def test_the_ledger_records_each_request_once_through_the_turns_hooks(
    tracker: LLMRequestTracker, outcome: str
) -> None:
    """Had the agent's ledger run beside the turn's hooks, or not at all, each request would have two rows, or none."""
    model = FunctionModel(
        _overloaded if outcome == 'failed' else _tool_then_text, stream_function=_words, model_name='gpt-4o-mini'
    )
    agent = _ledgered_agent(tracker, model)
    guard = Guard()
    capabilities = turn_hooks(ContextWindow(16_000), guard, agent=agent)
    if outcome == 'plain':
        result = await agent.run('go', deps=chat_deps(), capabilities=capabilities)
        assert result.output == 'done'
    elif outcome == 'failed':
        with pytest.raises(ModelHTTPError):
            await agent.run('go', deps=chat_deps(), capabilities=capabilities)
    elif outcome == 'streamed':
        async with agent.run_stream_events('go', deps=chat_deps(), capabilities=capabilities) as events:
            results = [event async for event in events if isinstance(event, AgentRunResultEvent)]
        assert results[0].result.output == 'one two three four '
    else:
        async with agent.run_stream('go', deps=chat_deps(), capabilities=capabilities) as stream:
            async for delta in stream.stream_text(delta=True, debounce_by=None):
                if delta.startswith('two'):
                    break
    await tracker.flush()
    rows = await ledger_rows()
    expected = {
        'plain': [('complete', False), ('complete', False)],
        'streamed': [('complete', True)],
        'failed': [('error', False)],
        'cancelled': [('cancelled', True)],
    }[outcome]
    assert [(row['status'], row['streamed']) for row in rows] == expected
    assert len(guard.seen) == len(rows)  # the guard saw each request the ledger recorded
    assert all(row['chat_session_id'] == 'chat-1' for row in rows)


async def test_the_ledger_records_what_the_window_sent_and_nothing_the_guard_stopped(
    tracker: LLMRequestTracker,
) -> None:
    sent: list[list[ModelMessage]] = []

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        sent.append(messages)
        return _tool_then_text(messages, info)

    agent = _ledgered_agent(tracker, FunctionModel(respond, model_name='gpt-4o-mini'))
    capabilities = turn_hooks(ContextWindow(300, title='a topic'), Guard(stop_at=2), agent=agent)
    with pytest.raises(Stop):
        await agent.run('now', deps=chat_deps(), message_history=_history(6), capabilities=capabilities)
    await tracker.flush()
    [row] = await ledger_rows()  # the request the guard stopped was never sent, nor recorded
    assert len(sent) == 1 and len(sent[0]) < 13
    bodies = {content['kind']: content['body'] for content in await content_rows(row['id'])}
    assert 'Earlier in this conversation' in bodies['prompt'] and 'question 0' not in bodies['prompt']


def _overridden(capability: type[Any], hooks: tuple[str, ...]) -> set[str]:
    """The lifecycle hooks of `AbstractCapability` that `capability` overrides, outside `hooks`."""
    names = {
        name
        for name, value in vars(AbstractCapability).items()
        if callable(value) and not name.startswith('_') and name not in ('apply', 'visit_and_replace', 'combine')
    }
    return {name for name in names if getattr(capability, name) is not getattr(AbstractCapability, name)} - set(hooks)


def test_every_hook_of_the_parts_is_delegated() -> None:
    """A hook a part comes to override must be delegated too, by `TurnHooks` and by the ledger to its riders."""
    assert _overridden(ContextWindow, PART_HOOKS) == set()
    assert _overridden(TurnGuard, PART_HOOKS) == set()
    assert _overridden(TurnGuard, ()) == {'before_node_run'}  # the check sees an override


# --- an agent's ledger wherever its capabilities hold it ----------------------------------------------------------


def _shaped(shape: str) -> list[AbstractCapability[Any]]:
    """An agent's capabilities holding one ledger (or none) in the shape named. `-id`: the ledger named as a turn's
    (`TURN_LEDGER_ID`); a dynamic one so named is replaced by the turn's for the run (pydantic-ai: a run's capability
    replaces its agent-level namesake), which then must not stand down for it."""
    if shape == 'none':
        return []
    if shape == 'dynamic-none':
        return [DynamicCapability(lambda ctx: None)]
    ledger = ledger_capability(id=TURN_LEDGER_ID) if shape.endswith('-id') else ledger_capability()
    return {
        'plain': [ledger],
        'plain-id': [ledger],
        'combined': [CombinedCapability([ledger])],
        'wrapper': [WrapperCapability(ledger)],
        'wrapper-id': [WrapperCapability(ledger)],
        'dynamic': [DynamicCapability(lambda ctx: ledger)],
        'dynamic-id': [DynamicCapability(lambda ctx: ledger)],
        'nested': [CombinedCapability([WrapperCapability(CombinedCapability([WrapperCapability(ledger)]))])],
        'dynamic-nested': [WrapperCapability(DynamicCapability(lambda ctx: WrapperCapability(ledger)))],
    }[shape]


SHAPES = [
    'none',
    'dynamic-none',
    'plain',
    'plain-id',
    'combined',
    'wrapper',
    'wrapper-id',
    'dynamic',
    'dynamic-id',
    'nested',
    'dynamic-nested',
]


@pytest.mark.parametrize('shape', SHAPES)
async def test_a_turn_records_and_charges_each_request_once_wherever_the_agent_holds_its_ledger(
    demo_data: None, shape: str
) -> None:
    """A ledger in a wrapper or a dynamic capability was not seen by the turn, which added its own: every request had
    two rows, was held twice at admission and charged twice to the budget (QA)."""
    account = 'acme-health'
    await give_budget(account, '1000')
    gate = asyncio.Event()
    model = PricedModel(gate=gate)
    agent: Agent[SessionDependencies, str] = Agent(model, deps_type=SessionDependencies, capabilities=_shaped(shape))
    spent_before = await _spent(account)
    turn = asyncio.create_task(
        simple_chat('How many cardiologists?', session_id=f'shape-{shape}', account=account, agent=agent)
    )
    try:
        while model.arrived == 0 and not turn.done():  # noqa: ASYNC110 - the model counts arrivals
            await asyncio.sleep(0.005)
        holds = await scalar('SELECT count(*) FROM budget_reservations')
    finally:
        gate.set()
        result = await turn
    assert holds == 1, 'the request is held once'
    await get_request_tracker().flush()
    await get_supervisor().join()
    rows = await ledger_rows(chat_session_id=f'shape-{shape}')
    assert [row['status'] for row in rows] == ['complete'] and result.usage.requests == 1
    assert rows[0]['total_cost'] > 0
    assert await _spent(account) - spent_before == rows[0]['total_cost'], 'the request is charged once'
    assert await scalar('SELECT count(*) FROM budget_reservations') == 0


@pytest.mark.parametrize('shape', ['none', 'dynamic', 'wrapper'])
async def test_a_streamed_turn_records_each_request_once_wherever_the_agent_holds_its_ledger(
    demo_data: None, shape: str
) -> None:
    agent: Agent[SessionDependencies, str] = Agent(
        PricedModel(), deps_type=SessionDependencies, capabilities=_shaped(shape)
    )
    session_id = f'streamed-{shape}'
    async with simple_chat_stream(
        'How many cardiologists?', session_id=session_id, account='acme-health', agent=agent
    ) as stream:
        assert ''.join([delta async for delta in stream]) == 'ok'
    await get_request_tracker().flush()
    rows = await ledger_rows(chat_session_id=session_id)
    assert [(row['status'], row['streamed']) for row in rows] == [('complete', True)]


async def _spent(account: str) -> Decimal:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        (status,) = await budget_statuses(session=session, account_id=await account_id(account))
    return status.spent_usd
