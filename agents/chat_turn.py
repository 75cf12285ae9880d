"""One chat turn around the model call: tenant, model and conversation before it; save and post-turn work after.

Each step opens its own short session; none is held across the model request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal

from pydantic_ai import Agent, Conversation
from pydantic_ai.models import Model
from pydantic_ai.run import AgentRunResult
from pydantic_ai.usage import RunUsage, UsageLimits

from agentrt.agents.model_resolution import resolve_model
from agentrt.db.engine import current_settings, init_database
from agentrt.db.errors import ConfigError
from agentrt.db.session import get_read_only_session
from agentrt.services.conversations import PostgresConversationStore, load_conversation, save_turn
from agentrt.services.post_turn import schedule_post_turn_work
from agentrt.services.tenancy import get_account, get_agent_instance
from agentrt.tools.dependencies import SessionDependencies


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


@dataclass(frozen=True)
class TurnSetup:
    """What a chat turn runs with, whichever path runs it: `simple_chat`, `simple_chat_stream` or the HTTP API.

    The HTTP API hands these to pydantic-ai's UI adapters (which load and save the conversation through `store`
    themselves); `prepare_turn` adds the loaded conversation for the in-process paths.
    """

    agent: Agent[SessionDependencies, str]
    model: Model
    deps: SessionDependencies
    store: PostgresConversationStore
    usage_limits: UsageLimits | None


async def set_up_turn(
    agent: Agent[SessionDependencies, str],
    session_id: str,
    account: str,
    agent_instance: str | None,
    model: Model | str | None,
    *,
    usage_limits: UsageLimits | None = None,
    stream_delay: float = 0.0,
) -> TurnSetup:
    """Start the database if needed, resolve the model, load the tenant: everything a turn needs but its history.

    Args:
        agent: the agent to run.
        session_id: the conversation (its id in the account's store).
        account: the account slug.
        agent_instance: the agent slug of that account; its first agent when None.
        model: a model or model name; the configured model (`AGENTRT_MODEL`) when None.
        usage_limits: the limits the caller asked for.
        stream_delay: seconds between the demo model's streamed words.

    Raises:
        ConfigError: the model cannot be used. UnknownTenantError: the account or agent does not exist.
    """
    await init_database()
    resolved = resolve_model(model, default=current_settings().model, stream_delay=stream_delay)
    deps = await load_dependencies(session_id, account, agent_instance)
    return TurnSetup(agent, resolved, deps, PostgresConversationStore(deps.account_id), usage_limits)


def schedule_after_turn(deps: SessionDependencies, run_id: str) -> None:
    """Hand a saved turn's post-turn work (title and summary, usage rollup) to the background, by id only."""
    schedule_post_turn_work(deps.account_id, deps.session_id, run_id=run_id)


@dataclass
class Turn:
    """Everything prepared before the model is called."""

    agent: Agent[SessionDependencies, str]
    model: Model
    deps: SessionDependencies
    store: PostgresConversationStore
    conversation: Conversation
    usage_before: RunUsage
    started: float


async def prepare_turn(
    agent: Agent[SessionDependencies, str],
    session_id: str,
    account: str,
    agent_instance: str | None,
    model: Model | str | None,
    stream_delay: float = 0.0,
) -> Turn:
    """Set the turn up (`set_up_turn`) and load its conversation.

    Raises:
        ConfigError: the model cannot be used. UnknownTenantError: the account or agent does not exist.
    """
    started = time.perf_counter()
    setup = await set_up_turn(agent, session_id, account, agent_instance, model, stream_delay=stream_delay)
    conversation = await load_conversation(setup.store, session_id)
    return Turn(setup.agent, setup.model, setup.deps, setup.store, conversation, conversation.usage, started)


async def finish_turn(turn: Turn, result: AgentRunResult[str]) -> ChatResult:
    """Save the turn, hand post-turn work (title and summary, usage rollup) to the background, by id only.

    Raises:
        ConcurrentTurnError: another turn saved this conversation meanwhile; nothing was saved.
    """
    await save_turn(turn.store, result)
    schedule_after_turn(turn.deps, result.run_id)
    return ChatResult(
        output=result.output,
        session_id=turn.deps.session_id,
        run_id=result.run_id,
        model_name=turn.model.model_name,
        usage=result.usage - turn.usage_before,
        duration_s=time.perf_counter() - turn.started,
    )


def check_message(message: str) -> None:
    """Refuse an empty message before anything runs.

    Raises:
        ConfigError: the message is empty or not text.
    """
    if not isinstance(message, str) or not message.strip():
        raise ConfigError('the chat message is empty')
