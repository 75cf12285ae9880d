"""`simple_chat` and `simple_chat_stream`: one chat turn, in-process, with history kept in PostgreSQL.

Neither function holds a database session across a model request or the stream: loading the
tenant, loading the conversation, every tool call and saving the turn each use their own short
session. Both take extra toolsets and instructions for the turn, or a whole agent of your own
(`create_simple_chat_agent(toolsets=..., instructions=...)`): adding a tool never means changing a
module-level toolset.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import (
    FunctionToolCallEvent,
    FunctionToolResultEvent,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
)
from pydantic_ai.models import Model
from pydantic_ai.run import AgentRunResult, AgentRunResultEvent
from pydantic_ai.toolsets import AbstractToolset
from pydantic_ai.usage import UsageLimits

from agentrt.agents.chat_turn import ChatResult, check_turn_input, finish_turn, open_turn
from agentrt.agents.demo_model import NO_SCHEMAS, SCHEMAS_LINE
from agentrt.agents.model_resolution import resolve_model
from agentrt.agents.observability import turn_span
from agentrt.agents.run_errors import documented_errors
from agentrt.agents.turn_hooks import TURN_LEDGER_ID
from agentrt.agents.turn_input import TurnInput, validate_agent_arguments, validate_run_arguments
from agentrt.db.errors import InvalidInputError
from agentrt.services.ledger import ledger_capability
from agentrt.services.pg_text import storable, storable_text
from agentrt.services.tenancy import configured_schemas
from agentrt.tools.dependencies import SessionDependencies
from agentrt.tools.directory_tools import directory_toolset

__all__ = [
    'BASE_INSTRUCTIONS',
    'ChatResult',
    'ChatStream',
    'Instruction',
    'ToolEvent',
    'create_simple_chat_agent',
    'default_chat_agent',
    'simple_chat',
    'simple_chat_stream',
]

BASE_INSTRUCTIONS = (
    "You help people find entries in their organisation's directory. Use the search_directory tool, "
    'several searches at once when the question has several criteria, and get_directory_entry for details. '
    'Answer only from tool results; say so when nothing matches.'
)

Instruction = str | Callable[[RunContext[SessionDependencies]], str]
"""An instruction: text, or a function of the run's context (e.g. of `ctx.deps.account_slug`) returning text."""
Toolsets = Sequence[AbstractToolset[SessionDependencies]]


@dataclass(frozen=True)
class ToolEvent:
    """A tool call starting (`finished=False`) or finishing, for progress displays."""

    tool_name: str
    tool_call_id: str
    args: dict[str, Any] | str | None
    finished: bool
    duration_s: float | None = None
    outcome: str | None = None


def create_simple_chat_agent(
    model: Model | str | None = None,
    *,
    toolsets: Toolsets | None = (),
    instructions: Instruction | Sequence[Instruction] | None = (),
) -> Agent[SessionDependencies, str]:
    """Build the directory chat agent: instructions, the directory toolset and the ledger capability.

    Args:
        model: the default model of the agent; runs can still pass another one. A model string (`'demo'` too) stays
            a name on the agent, which each turn builds with the runtime's bounds on its provider
            (`AGENTRT_MODEL_TIMEOUT_SECONDS`, `AGENTRT_MODEL_MAX_RETRIES`), as it builds `AGENTRT_MODEL`; a `Model`
            is used as it is.
        toolsets: more toolsets for the agent, beside the directory toolset (None: none).
        instructions: more instructions, after the base ones (None: none).

    Raises:
        InvalidInputError: an argument of the wrong type (naming it; a turn of the agent would have failed on it), or
            two tools of one name among the directory toolset and `toolsets`.
        ConfigError: `model` is a string no model can be built from (an unknown provider, a missing API key...).
    """
    validate_agent_arguments(model=model, toolsets=toolsets, instructions=instructions)
    _check_tool_names([directory_toolset, *(toolsets or ())])
    if isinstance(model, str):
        # Checked now, as pydantic-ai would have built it now; kept as a name (`defer_model_check`): pydantic-ai
        # built a model of its own from it, which the runtime cannot tell from one a caller built and leaves alone,
        # so it had no timeout and the SDK's silent retries.
        resolve_model(model)
    agent: Agent[SessionDependencies, str] = Agent(
        model,
        defer_model_check=True,
        deps_type=SessionDependencies,
        name='simple_chat',
        instructions=[BASE_INSTRUCTIONS, *_instruction_list(instructions)],
        toolsets=[directory_toolset, *(toolsets or ())],
        capabilities=[ledger_capability(id=TURN_LEDGER_ID)],
    )

    # Async, though it awaits nothing: pydantic-ai runs a sync instruction function in a worker thread, a thread hop
    # (and its CPU) before every model request.
    @agent.instructions
    async def _tenant(ctx: RunContext[SessionDependencies]) -> str:
        schemas = ', '.join(configured_schemas(ctx.deps.config) or []) or NO_SCHEMAS
        return f'Account: {ctx.deps.account_slug}. {SCHEMAS_LINE} {schemas}.'

    return agent


_agent: Agent[SessionDependencies, str] | None = None


def default_chat_agent() -> Agent[SessionDependencies, str]:
    """The agent `simple_chat` runs when given none (built once per process): the HTTP API serves the same one."""
    global _agent
    if _agent is None:
        _agent = create_simple_chat_agent()
    return _agent


async def simple_chat(
    message: str,
    *,
    session_id: str,
    account: str,
    agent_instance: str | None = None,
    model: Model | str | None = None,
    usage_limits: UsageLimits | None = None,
    toolsets: Toolsets | None = (),
    instructions: Instruction | Sequence[Instruction] | None = (),
    agent: Agent[SessionDependencies, str] | None = None,
) -> ChatResult:
    """Run one chat turn and return its output, usage and cost.

    The conversation `session_id` of the account is loaded from PostgreSQL, continued, and saved.

    Args:
        message: the user's message.
        session_id: the conversation to continue (created on first use).
        account: the account slug; every query of the turn is scoped to it.
        agent_instance: the agent slug of that account; its first agent when omitted.
        model: a model or model name; when omitted, the agent's own model, else the configured one (`AGENTRT_MODEL`,
            default `demo`).
        usage_limits: usage limits for this turn (they count this turn only); `AGENTRT_TURN_*` when omitted.
        toolsets: more toolsets for this turn (each tool opens its own session; see `SessionDependencies`; None:
            none).
        instructions: more instructions for this turn (None: none).
        agent: the agent to run; `create_simple_chat_agent()`'s when omitted.

    Raises:
        InvalidInputError: the message or an identifier breaks the input rules, or another argument has the wrong
            type (nothing ran).
        ConfigError: the model cannot be used (unknown, or its API key is missing).
        UnknownTenantError: the account or agent does not exist.
        TurnLimitExceededError: the turn reached a per-turn usage limit; nothing was saved.
        ModelBehaviorError: the model's answer could not be used; nothing was saved.
        ConcurrentTurnError: another turn is running on this conversation (nothing was sent), or saved it meanwhile
            (this turn stopped before its next model request, or at save); nothing was saved.
        ModelProviderError: the model provider failed the request (HTTP error, dropped connection, corrupt answer);
            nothing was saved, and the ledger has the failed request with its status code and body.
        DatabaseUnavailableError: PostgreSQL could not be reached, or the connection was lost
            (`DatabaseDisconnectedError`); nothing was saved.
    """
    turn_input = check_turn_input(message, session_id=session_id, account=account, agent_instance=agent_instance)
    return await run_checked_turn(
        turn_input, model=model, usage_limits=usage_limits, toolsets=toolsets, instructions=instructions, agent=agent
    )


async def run_checked_turn(
    turn_input: TurnInput,
    *,
    model: Model | str | None = None,
    usage_limits: UsageLimits | None = None,
    toolsets: Toolsets | None = (),
    instructions: Instruction | Sequence[Instruction] | None = (),
    agent: Agent[SessionDependencies, str] | None = None,
) -> ChatResult:
    """`simple_chat` of an input already checked (`check_turn_input`), which may name the account's id too (an HTTP
    turn: its API key's account); the arguments and errors of `simple_chat`."""
    validate_run_arguments(
        model=model, usage_limits=usage_limits, toolsets=toolsets, instructions=instructions, agent=agent
    )
    with _turn_span(turn_input, streamed=False), documented_errors():
        async with open_turn(agent or default_chat_agent(), turn_input, model, usage_limits=usage_limits) as turn:
            # A provider error names the model asked for; a limit reached, the caller's usage_limits when given.
            with documented_errors(turn.model.model_name, limits_given=usage_limits is not None):
                result = await turn.agent.run(
                    turn_input.message,
                    deps=turn.deps,
                    conversation=turn.conversation,
                    model=turn.model,
                    usage_limits=turn.usage_limits,
                    toolsets=list(toolsets or ()) or None,
                    instructions=_instruction_list(instructions) or None,
                    capabilities=turn.capabilities,
                )
            return await finish_turn(turn, result)


class ChatStream:
    """An async iterator of text deltas; `result` holds the `ChatResult` once the stream is exhausted.

    Use it as `async with simple_chat_stream(...) as stream:` (or call `aclose()`), so a consumer that stops
    early cancels the run at once, and its ledger row is recorded, rather than when the generator is collected.
    """

    def __init__(self, make_events: Callable[[_Outcome], AsyncGenerator[str, None]]) -> None:
        # The generator gets the outcome, not the stream: a generator referring to its stream would be a reference
        # cycle, freed only by the cyclic GC, which finalises the generator and the ones it is inside of all at once
        # (each an `aclose()` task: "Task exception was never retrieved ... already running" for a stream left
        # without `aclose()`). Without the cycle, the stream's last reference going closes the run in order.
        self._outcome = _Outcome()
        self._events = make_events(self._outcome)

    @property
    def result(self) -> ChatResult | None:
        """The turn's `ChatResult` once the stream is exhausted; None before, or when it stopped early."""
        return self._outcome.result

    def __aiter__(self) -> AsyncIterator[str]:
        return self._events

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the stream; a turn stopped before its end is cancelled and not saved."""
        await self._events.aclose()


@dataclass
class _Outcome:
    """Where a streamed turn leaves its result."""

    result: ChatResult | None = None


@dataclass(frozen=True)
class _StreamRequest:
    """What `simple_chat_stream` was asked to run."""

    turn_input: TurnInput
    model: Model | str | None
    usage_limits: UsageLimits | None
    toolsets: list[AbstractToolset[SessionDependencies]]
    instructions: list[Instruction]
    agent: Agent[SessionDependencies, str] | None
    on_tool_event: Callable[[ToolEvent], None] | None
    stream_delay: float


def simple_chat_stream(
    message: str,
    *,
    session_id: str,
    account: str,
    agent_instance: str | None = None,
    model: Model | str | None = None,
    usage_limits: UsageLimits | None = None,
    toolsets: Toolsets | None = (),
    instructions: Instruction | Sequence[Instruction] | None = (),
    agent: Agent[SessionDependencies, str] | None = None,
    on_tool_event: Callable[[ToolEvent], None] | None = None,
    stream_delay: float = 0.0,
) -> ChatStream:
    """Run one chat turn, yielding text deltas as the model produces them.

    Takes the same arguments as `simple_chat`, plus `on_tool_event`, called when each tool call starts
    and finishes, and `stream_delay`, a pause between the demo model's words. After the last delta,
    `stream.result` holds the same `ChatResult` `simple_chat` would return. A consumer that stops early
    (`aclose()`, or leaving `async with`) cancels the run: nothing is saved, and the ledger records the
    request it cut off as cancelled. Deltas and tool events carry text as the store saves it: NUL and lone
    surrogates (`"\\ud83d"` in a provider's JSON) as U+FFFD.

    Raises:
        InvalidInputError: at once, when the message, an identifier or another argument is refused (nothing ran); the
            others of `simple_chat` when iteration starts.
    """
    turn_input = check_turn_input(message, session_id=session_id, account=account, agent_instance=agent_instance)
    validate_run_arguments(
        model=model,
        usage_limits=usage_limits,
        toolsets=toolsets,
        instructions=instructions,
        agent=agent,
        on_tool_event=on_tool_event,
        stream_delay=stream_delay,
    )
    request = _StreamRequest(
        turn_input,
        model,
        usage_limits,
        list(toolsets or ()),
        _instruction_list(instructions),
        agent,
        on_tool_event,
        stream_delay,
    )
    return ChatStream(lambda outcome: _stream_turn(outcome, request))


async def _stream_turn(outcome: _Outcome, request: _StreamRequest) -> AsyncGenerator[str, None]:
    with _turn_span(request.turn_input, streamed=True), documented_errors():
        async with open_turn(
            request.agent or default_chat_agent(),
            request.turn_input,
            request.model,
            usage_limits=request.usage_limits,
            stream_delay=request.stream_delay,
        ) as turn:
            started: dict[str, float] = {}
            result: AgentRunResult[str] | None = None
            with documented_errors(turn.model.model_name, limits_given=request.usage_limits is not None):
                async with turn.agent.run_stream_events(
                    request.turn_input.message,
                    deps=turn.deps,
                    conversation=turn.conversation,
                    model=turn.model,
                    usage_limits=turn.usage_limits,
                    toolsets=request.toolsets or None,
                    instructions=request.instructions or None,
                    capabilities=turn.capabilities,
                ) as events:
                    async for event in events:
                        if isinstance(event, AgentRunResultEvent):
                            result = event.result
                        elif (delta := _text_delta(event)) is not None:
                            yield delta
                        elif request.on_tool_event is not None:
                            _report_tool(event, started, request.on_tool_event)
            assert result is not None, 'run_stream_events ended without a result'
            outcome.result = await finish_turn(turn, result)


def _turn_span(turn_input: TurnInput, *, streamed: bool) -> AbstractContextManager[None]:
    return turn_span(
        session_id=turn_input.session_id,
        account=turn_input.account,
        agent_instance=turn_input.agent_instance,
        streamed=streamed,
    )


def _check_tool_names(toolsets: Sequence[object]) -> None:
    """Refuse two tools of one name among the toolsets whose tools are known before a run (function toolsets; an MCP
    server's are listed only by a run): the agent was built and its first turn failed on it (QA).

    Raises:
        InvalidInputError: naming the tool and the toolsets that both have it.
    """
    owners: dict[str, str] = {}
    for index, toolset in enumerate(toolsets):
        tools = getattr(toolset, 'tools', None)
        if not isinstance(tools, dict):
            continue
        where = 'the directory toolset' if index == 0 else f'toolsets[{index - 1}]'
        for name, tool in tools.items():
            if index and getattr(tool, 'prepare', None) is not None:
                # A caller's tool whose `prepare` may hide or rename it per run: the run's own check sees what it
                # lists (QA). The directory's own `prepare` keeps its tools' names.
                continue
            if name in owners:
                raise InvalidInputError(
                    f'toolsets: tool {name!r} of {where} conflicts with the tool of that name in {owners[name]}; '
                    'rename one (pydantic-ai needs tool names unique in an agent)',
                    field='toolsets',
                )
            owners[name] = where


def _instruction_list(instructions: Instruction | Sequence[Instruction] | None) -> list[Instruction]:
    if instructions is None:
        return []
    if not isinstance(instructions, Sequence) or isinstance(instructions, str):  # one instruction
        return [instructions]
    return list(instructions)


def _text_delta(event: object) -> str | None:
    # A lone surrogate (`"\ud83d"` in a provider's JSON) or a NUL goes out as U+FFFD, as the store saves it: a caller
    # writing the deltas to a UTF-8 file or socket failed on it (the HTTP stream and the CLI show the same).
    if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
        return storable_text(event.part.content) or None
    if isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
        return storable_text(event.delta.content_delta) or None
    return None


def _report_tool(event: object, started: dict[str, float], callback: Callable[[ToolEvent], None]) -> None:
    # Started and finished calls are matched on the id as the model gave it; the event carries what the store saves.
    if isinstance(event, FunctionToolCallEvent):
        part = event.part
        started[part.tool_call_id] = time.perf_counter()
        args = storable(part.args)
        _called(callback, ToolEvent(storable_text(part.tool_name), storable_text(part.tool_call_id), args, False))
    elif isinstance(event, FunctionToolResultEvent):
        result = event.part
        begin = started.pop(result.tool_call_id, None)
        duration = time.perf_counter() - begin if begin is not None else None
        name, call_id = storable_text(result.tool_name or '?'), storable_text(result.tool_call_id)
        _called(callback, ToolEvent(name, call_id, None, True, duration, result.outcome))


def _called(callback: Callable[[ToolEvent], None], event: ToolEvent) -> None:
    """Call `on_tool_event`; one that hands back an awaitable other than a task or a future (a plain function
    returning a coroutine, which the up-front check cannot see) is refused: it was never awaited, with only Python's
    RuntimeWarning to say so (QA)."""
    returned: object = callback(event)  # type: ignore[func-returns-value]  # typed None; it may not be
    # A task or a future is already scheduled (`lambda event: asyncio.create_task(log(event))`): its work runs.
    if inspect.isawaitable(returned) and not isinstance(returned, asyncio.Future):
        if inspect.iscoroutine(returned):
            returned.close()  # not awaited, and no RuntimeWarning for it
        raise InvalidInputError(
            'on_tool_event returned an awaitable, which is never awaited: it must do its work when called (to do '
            'async work, hand the event to a task or a queue from it)',
            field='on_tool_event',
        )
