"""`simple_chat` and `simple_chat_stream`: one chat turn, in-process, with history kept in PostgreSQL.

Neither function holds a database session across a model request or the stream: loading the
tenant, loading the conversation, every tool call and saving the turn each use their own short
session.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import (
    AgentStreamEvent,
    FunctionToolCallEvent,
    FunctionToolResultEvent,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
)
from pydantic_ai.models import Model
from pydantic_ai.run import AgentRunResult, AgentRunResultEvent
from pydantic_ai.usage import RunUsage, UsageLimits

from agentrt.agents.demo_model import SCHEMAS_LINE
from agentrt.agents.model_resolution import resolve_model
from agentrt.db.engine import current_settings, init_database
from agentrt.db.errors import ConfigError
from agentrt.db.session import get_read_only_session
from agentrt.services.conversations import PostgresConversationStore, load_conversation, save_turn
from agentrt.services.ledger import ledger_capability
from agentrt.services.post_turn import schedule_post_turn_work
from agentrt.services.tenancy import get_account, get_agent_instance
from agentrt.tools.dependencies import SessionDependencies
from agentrt.tools.directory_tools import directory_toolset

BASE_INSTRUCTIONS = (
    "You help people find entries in their organisation's directory. Use the search_directory tool, "
    'several searches at once when the question has several criteria, and get_directory_entry for details. '
    'Answer only from tool results; say so when nothing matches.'
)


@dataclass(frozen=True)
class ToolEvent:
    """A tool call starting (`finished=False`) or finishing, for progress displays."""

    tool_name: str
    tool_call_id: str
    args: dict[str, Any] | str | None
    finished: bool
    duration_s: float | None = None
    outcome: str | None = None


@dataclass(frozen=True)
class ChatResult:
    """The outcome of one chat turn."""

    output: str
    session_id: str
    run_id: str
    model_name: str
    usage: RunUsage
    duration_s: float

    @property
    def cost(self) -> Decimal | None:
        """The turn's cost in USD from genai-prices, or None when the model is unpriced."""
        return self.usage.cost


def create_simple_chat_agent(model: Model | str | None = None) -> Agent[SessionDependencies, str]:
    """Build the directory chat agent: instructions, the directory toolset and the ledger capability.

    Args:
        model: the default model of the agent; runs can still pass another one.
    """
    agent: Agent[SessionDependencies, str] = Agent(
        model,
        deps_type=SessionDependencies,
        name='simple_chat',
        instructions=BASE_INSTRUCTIONS,
        toolsets=[directory_toolset],
        capabilities=_runtime_capabilities(),
    )

    @agent.instructions
    def _tenant(ctx: RunContext[SessionDependencies]) -> str:
        schemas = ', '.join(ctx.deps.config.get('schemas') or []) or 'none configured'
        return f'Account: {ctx.deps.account_slug}. {SCHEMAS_LINE} {schemas}.'

    return agent


def _runtime_capabilities() -> list[Any]:
    return [ledger_capability()]


_agent: Agent[SessionDependencies, str] | None = None


def _default_agent() -> Agent[SessionDependencies, str]:
    global _agent
    if _agent is None:
        _agent = create_simple_chat_agent()
    return _agent


async def load_dependencies(session_id: str, account: str, agent_instance: str | None) -> SessionDependencies:
    """Look up the tenant in one short read-only session and build the run's dependencies.

    Raises:
        UnknownTenantError: the account or agent slug does not exist (the message lists what does).
    """
    async with get_read_only_session() as session:
        account_row = await get_account(account, session=session)
        instance = await get_agent_instance(account_row, agent_instance, session=session)
        return SessionDependencies(
            session_id=session_id,
            account_id=account_row.id,
            account_slug=account_row.slug,
            agent_instance_id=instance.id,
            agent_instance_slug=instance.slug,
            agent_type=instance.agent_type,
            config=dict(instance.config or {}),
        )


@dataclass
class _Turn:
    """Everything prepared before the model is called."""

    agent: Agent[SessionDependencies, str]
    model: Model
    deps: SessionDependencies
    store: PostgresConversationStore
    conversation: Any
    usage_before: RunUsage
    started: float


async def _prepare(
    session_id: str, account: str, agent_instance: str | None, model: Model | str | None, stream_delay: float = 0.0
) -> _Turn:
    started = time.perf_counter()
    await init_database()
    resolved = resolve_model(model, default=current_settings().model, stream_delay=stream_delay)
    deps = await load_dependencies(session_id, account, agent_instance)
    store = PostgresConversationStore(deps.account_id)
    conversation = await load_conversation(store, session_id)
    usage_before = conversation.usage
    return _Turn(_default_agent(), resolved, deps, store, conversation, usage_before, started)


async def _finish(turn: _Turn, result: AgentRunResult[str]) -> ChatResult:
    await save_turn(turn.store, result)
    _after_turn(turn, result)
    return ChatResult(
        output=result.output,
        session_id=turn.deps.session_id,
        run_id=result.run_id,
        model_name=turn.model.model_name,
        usage=result.usage - turn.usage_before,
        duration_s=time.perf_counter() - turn.started,
    )


def _after_turn(turn: _Turn, result: AgentRunResult[str]) -> None:
    """Hand post-turn work (title and summary, usage rollup) to the background supervisor, by id only."""
    schedule_post_turn_work(turn.deps.account_id, turn.deps.session_id, run_id=result.run_id)


async def simple_chat(
    message: str,
    *,
    session_id: str,
    account: str,
    agent_instance: str | None = None,
    model: Model | str | None = None,
    usage_limits: UsageLimits | None = None,
) -> ChatResult:
    """Run one chat turn and return its output, usage and cost.

    The conversation `session_id` of the account is loaded from PostgreSQL, continued, and saved.

    Args:
        message: the user's message.
        session_id: the conversation to continue (created on first use).
        account: the account slug; every query of the turn is scoped to it.
        agent_instance: the agent slug of that account; its first agent when omitted.
        model: a model or model name; the configured model (`AGENTRT_MODEL`, default `demo`) when omitted.
        usage_limits: pydantic-ai usage limits for the run.

    Raises:
        ConfigError: the model cannot be used (unknown, or its API key is missing).
        UnknownTenantError: the account or agent does not exist.
        ConcurrentTurnError: another turn changed this conversation meanwhile; nothing was saved.
    """
    _check_message(message)
    turn = await _prepare(session_id, account, agent_instance, model)
    result = await turn.agent.run(
        message, deps=turn.deps, conversation=turn.conversation, model=turn.model, usage_limits=usage_limits
    )
    return await _finish(turn, result)


class ChatStream:
    """An async iterator of text deltas; `result` holds the `ChatResult` once the stream is exhausted.

    Use it as `async with simple_chat_stream(...) as stream:` (or call `aclose()`), so a consumer that stops
    early cancels the run at once, and its ledger row is recorded, rather than when the generator is collected.
    """

    def __init__(self, make_events: Callable[[ChatStream], AsyncGenerator[str, None]]) -> None:
        self.result: ChatResult | None = None
        self._events = make_events(self)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._events

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the stream; a turn stopped before its end is cancelled and not saved."""
        await self._events.aclose()


def simple_chat_stream(
    message: str,
    *,
    session_id: str,
    account: str,
    agent_instance: str | None = None,
    model: Model | str | None = None,
    usage_limits: UsageLimits | None = None,
    on_tool_event: Callable[[ToolEvent], None] | None = None,
    stream_delay: float = 0.0,
) -> ChatStream:
    """Run one chat turn, yielding text deltas as the model produces them.

    Takes the same arguments as `simple_chat`, plus `on_tool_event`, called when each tool call starts
    and finishes, and `stream_delay`, a pause between the demo model's words. After the last delta,
    `stream.result` holds the same `ChatResult` `simple_chat` would return. A consumer that stops early
    (`aclose()`, or leaving `async with`) cancels the run: nothing is saved, and the ledger records the
    request it cut off as cancelled.
    """
    _check_message(message)
    return ChatStream(
        lambda stream: _stream_turn(
            stream, message, session_id, account, agent_instance, model, usage_limits, on_tool_event, stream_delay
        )
    )


async def _stream_turn(
    stream: ChatStream,
    message: str,
    session_id: str,
    account: str,
    agent_instance: str | None,
    model: Model | str | None,
    usage_limits: UsageLimits | None,
    on_tool_event: Callable[[ToolEvent], None] | None,
    stream_delay: float,
) -> AsyncGenerator[str, None]:
    turn = await _prepare(session_id, account, agent_instance, model, stream_delay)
    started: dict[str, float] = {}
    result: AgentRunResult[str] | None = None
    async with turn.agent.run_stream_events(
        message, deps=turn.deps, conversation=turn.conversation, model=turn.model, usage_limits=usage_limits
    ) as events:
        async for event in events:
            if isinstance(event, AgentRunResultEvent):
                result = event.result
            elif (delta := _text_delta(event)) is not None:
                yield delta
            elif on_tool_event is not None:
                _report_tool(event, started, on_tool_event)
    assert result is not None, 'run_stream_events ended without a result'
    stream.result = await _finish(turn, result)


def _text_delta(event: AgentStreamEvent | Any) -> str | None:
    if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
        return event.part.content or None
    if isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
        return event.delta.content_delta or None
    return None


def _report_tool(event: Any, started: dict[str, float], callback: Callable[[ToolEvent], None]) -> None:
    if isinstance(event, FunctionToolCallEvent):
        started[event.part.tool_call_id] = time.perf_counter()
        callback(ToolEvent(event.part.tool_name, event.part.tool_call_id, event.part.args, finished=False))
    elif isinstance(event, FunctionToolResultEvent):
        part = event.part
        begin = started.pop(part.tool_call_id, None)
        duration = time.perf_counter() - begin if begin is not None else None
        outcome = getattr(part, 'outcome', None) or ('retried' if part.part_kind == 'retry-prompt' else 'success')
        callback(ToolEvent(part.tool_name or '?', part.tool_call_id, None, True, duration, str(outcome)))


def _check_message(message: str) -> None:
    if not isinstance(message, str) or not message.strip():
        raise ConfigError('the chat message is empty')
