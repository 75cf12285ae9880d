"""One chat turn around the model call: input checks, tenant, model and conversation before it; save after.

No session is held across the model request. Before it, one short transaction looks up the tenant, claims the
conversation (one turn at a time) and loads its tail: two statements, the claim and the load in one. After it, one
statement saves the turn, releases the claim and, when due, stores the conversation's title and summary (a history
the run rewrote goes through pydantic-ai's comparing save, the claim released after it, unawaited). Both run on
the driver connection (`agentrt.db.driver`: a few fixed statements need none of SQLAlchemy's statement machinery).
The run has per-turn usage limits (`turn_usage_limits`), a bounded context (`ContextWindow`) and the race guard
(`TurnGuard`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pydantic_ai import Agent, Conversation
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models import Model
from pydantic_ai.run import AgentRunResult
from pydantic_ai.usage import RunUsage, UsageLimits

from agentrt.agents.context_window import ContextWindow
from agentrt.agents.model_resolution import resolve_model
from agentrt.agents.observability import name_turn_agent
from agentrt.agents.sendable_text import SendableText
from agentrt.agents.turn_admission import turn_admission
from agentrt.agents.turn_guard import TurnGuard
from agentrt.agents.turn_hooks import turn_hooks
from agentrt.agents.turn_input import TurnInput, validate_turn_input
from agentrt.agents.turn_limits import measured_limits, turn_usage_limits
from agentrt.agents.turns_in_progress import turn_in_progress
from agentrt.db.cancellation import finished_if_started, undone_if_cancelled
from agentrt.db.driver import driver_transaction
from agentrt.db.engine import current_settings, init_database
from agentrt.db.errors import DatabaseNotInitializedError, InvalidInputError
from agentrt.db.session import Unscoped, retry_on_disconnect
from agentrt.db.settings import Settings, get_settings
from agentrt.services.conversations import (
    CANCELLED_TAKE_WAIT_S,
    ConcurrentTurnError,
    PostgresConversationStore,
    RecentConversation,
    TurnClaim,
    append_turn,
    load_recent_conversation,
    summary_due,
    summary_source,
)
from agentrt.services.ledger import remember_message_json
from agentrt.services.ledger.redaction import reread_configured_secrets
from agentrt.services.pg_text import storable
from agentrt.services.post_turn import schedule_post_turn_work
from agentrt.services.run_tasks import turn_runs
from agentrt.services.tenancy import (
    Tenant,
    UnknownTenantError,
    lookup_tenant_on,
    unknown_tenant_error,
)
from agentrt.tools.dependencies import SessionDependencies

CANCELLED_START_WAIT_S = CANCELLED_TAKE_WAIT_S
"""How long a turn cancelled during its start (the tenant, the claim, the history: one transaction) waits for the start
to end before the cancellation goes on: about what the rest of a cancelled turn takes on a database that does not
answer (a statement gives its connection up in about 2 s, then `RELEASE_WAIT_S`), where the start's own wait is its
statement's, 35 s (QA: a caller's 5 s timeout ended after 35 s). The start runs on, and its claim is released once it
ends (`TurnClaim.left_by_its_start`). The same wait as `conversation_claim`'s, one value."""

ENDING_TURN_WAIT_S = 3.0
"""How long a turn's start waits for the conversation's previous turn in this process to let go of it when that turn
is ending (cancelled) but has not handed its claim to its release yet (`ConcurrentTurnError.ending_here`)."""


@dataclass(frozen=True)
class ChatResult:
    """The outcome of one chat turn."""

    output: str
    session_id: str
    run_id: str
    model_name: str
    usage: RunUsage
    """This turn's usage (the per-turn limits apply to it)."""
    duration_s: float
    conversation_usage: RunUsage = field(default_factory=RunUsage)
    """The conversation's lifetime usage, this turn included (what the conversation record stores)."""
    finish_reason: str | None = None
    """Why the model's last response ended (pydantic-ai's `FinishReason`): `'stop'`, or `'length'` when the answer was
    cut off at its output token limit (`max_tokens`: a budget near its limit lowers it), `'content_filter'` when the
    provider's filter cut it off; None when the provider did not say. A cut-off answer is saved as it is."""

    @property
    def cost(self) -> Decimal | None:
        """The turn's cost in USD from genai-prices, or None when the model is unpriced."""
        return self.usage.cost


def _dependencies(session_id: str, tenant: Tenant) -> SessionDependencies:
    """The turn's deps, saying whether the account had a budget when the turn started (the tenant lookup read it)."""
    return SessionDependencies(
        session_id=session_id,
        account_id=tenant.account_id,
        account_slug=tenant.account_slug,
        agent_instance_id=tenant.agent_instance_id,
        agent_instance_slug=tenant.agent_instance_slug,
        agent_type=tenant.agent_type,
        config=tenant.config,
        account_has_budget=tenant.has_budget,
    )


@dataclass
class Turn:
    """Everything prepared before the model is called."""

    agent: Agent[SessionDependencies, str]
    model: Model
    deps: SessionDependencies
    store: PostgresConversationStore
    conversation: Conversation
    """The loaded tail of the conversation, its usage set to zero so the usage limits count this turn only."""
    usage_before: RunUsage
    """The conversation's lifetime usage before this turn."""
    usage_limits: UsageLimits
    capabilities: list[AbstractCapability[Any]]
    """The turn's `ContextWindow` and `TurnGuard`, added to the run as one capability (`TurnHooks`) that also carries
    the agent's ledger when it has an `id` (`create_simple_chat_agent`'s does)."""
    started: float
    recent: RecentConversation
    """What was loaded: the save appends to it without reading the conversation again."""
    claim: TurnClaim
    """The turn's claim on the conversation, released by the save (or when the turn ends)."""
    settings: Settings


def input_settings() -> Settings:
    """The settings input is checked against: the running database's, else the environment's (nothing started)."""
    try:
        return current_settings()
    except DatabaseNotInitializedError:
        return get_settings()


def check_turn_input(message: object, *, session_id: object, account: object, agent_instance: object) -> TurnInput:
    """`validate_turn_input` against `input_settings()`: before the database, the model or the ledger is touched.

    Raises:
        InvalidInputError: the message or an identifier breaks the input rules.
    """
    return validate_turn_input(
        message, session_id=session_id, account=account, agent_instance=agent_instance, settings=input_settings()
    )


@asynccontextmanager
async def open_turn(
    agent: Agent[SessionDependencies, str],
    turn_input: TurnInput,
    model: Model | str | None,
    *,
    usage_limits: UsageLimits | None = None,
    stream_delay: float = 0.0,
) -> AsyncIterator[Turn]:
    """Start the database if needed, resolve the model, wait for admission, then load the tenant, claim the
    conversation and load its tail.

    The model is `model`, else the agent's own, else the configured one (`AGENTRT_MODEL`).

    The claim (one turn at a time per conversation) is held until the block exits, however it exits.

    Raises:
        ConfigError: the model cannot be used. UnknownTenantError: the account or agent does not exist.
        ConcurrentTurnError: another turn is running on the conversation (nothing was sent).
        RuntimeBusyError: the process is at the limit of what its event loop keeps up with, and the turn waited
            longer than `AGENTRT_TURN_QUEUE_SECONDS` (nothing was sent).
    """
    started = time.perf_counter()
    with turn_in_progress():  # from its first step: `shutdown_runtime()` waits for it, claimed or not
        await init_database()
        settings = current_settings()
        # The credentials this turn's provider is built with are redacted as literals wherever they would show (a
        # provider's error echoing a key of no known shape: `Incorrect API key provided: vllm-local-...`; QA); read
        # again only when the environment changed since, a few microseconds otherwise.
        reread_configured_secrets((settings.database_url, settings.migration_database_url, settings.queue_database_url))
        resolved = resolve_model(
            # The agent's own model (`create_simple_chat_agent(model)`, `Agent(model)`) before the configured one: a run
            # passes its model explicitly, which in pydantic-ai would override the agent's.
            agent.model if model is None else model,
            default=settings.model,
            stream_delay=stream_delay,
            timeout_s=settings.model_timeout_seconds,
            max_retries=settings.model_max_retries,
        )
        admission = turn_admission(max_lag_s=settings.turn_admission_lag_ms / 1000, queue_s=settings.turn_queue_seconds)
        async with admission.turn():
            async with _claimed_turn(agent, turn_input, resolved, settings, usage_limits, started) as turn:
                yield turn


@asynccontextmanager
async def _claimed_turn(
    agent: Agent[SessionDependencies, str],
    turn_input: TurnInput,
    resolved: Model,
    settings: Settings,
    usage_limits: UsageLimits | None,
    started: float,
) -> AsyncIterator[Turn]:
    conversation_id = turn_input.session_id
    claim_id = uuid.uuid4().hex  # minted once: a repeated start finds its own claim taken, not a concurrent turn
    claims: list[TurnClaim] = []  # the claim the start takes, once it has one (a repeated start: the same claim id)

    async def start() -> tuple[Tenant, TurnClaim, RecentConversation] | None:
        # On the driver connection (`driver_transaction`): two fixed statements need none of SQLAlchemy's session.
        async with driver_transaction(account=Unscoped.TENANT_LOOKUP) as transaction:
            # The same statement makes the rest of the transaction the found tenant's (`enter=True`).
            tenant = await lookup_tenant_on(transaction, turn_input.account, turn_input.agent_instance, enter=True)
            if tenant is None:
                return None
            if turn_input.account_id is not None and tenant.account_id != turn_input.account_id:
                # Rolled back with the transaction before anything of the other account was read or claimed.
                raise UnknownTenantError(
                    f'account {turn_input.account!r} is no longer the account {turn_input.account_id} this turn was '
                    'asked for (the account was deleted or renamed since its key was checked)'
                )
            claim = TurnClaim(tenant.account_id, conversation_id, claim_id, settings.turn_lease_seconds)
            claims.append(claim)
            store = PostgresConversationStore(tenant.account_id)
            # The claim and the tail in one statement: a second turn on the conversation fails here, sent nothing.
            recent = await load_recent_conversation(
                store, conversation_id, max_tokens=settings.context_max_tokens, transaction=transaction, claim=claim
            )
            if not claim.acquired:  # a loader that left it (a replaced one): taken all the same before anything is sent
                await claim.take(session=transaction)
        return tenant, claim, recent

    async def give_back(opened: tuple[Tenant, TurnClaim, RecentConversation] | None) -> None:
        if opened is not None:
            async with opened[1].held():  # released as the block ends
                pass

    def left_running(task: asyncio.Future[object]) -> None:
        # Its caller is gone: the claim it took (or may have, or may still take: known by its id from now, not from
        # the start's end, which let the next turn be refused by a claim committed meanwhile) is released once it has
        # ended, and this process's next turn of the conversation takes it over until then.
        TurnClaim.left_by_its_start(claim_id, task, lambda: claims[-1] if claims else None)

    async def opened_start() -> tuple[Tenant, TurnClaim, RecentConversation] | None:
        # A claim committed as the turn is cancelled is released, not left to its lease (`undone_if_cancelled`); a
        # start the database does not answer is waited for at most CANCELLED_START_WAIT_S once the turn is cancelled.
        return await undone_if_cancelled(
            retry_on_disconnect(start, what='turn start'),
            give_back,
            wait_s=CANCELLED_START_WAIT_S,
            left=left_running,
        )

    # Safe to repeat on a fresh connection: reads, and a claim that is already this turn's counts as taken.
    try:
        opened = await opened_start()
    except ConcurrentTurnError as exc:
        if exc.ending_here is None:
            raise
        # The conversation's last turn in this process is ending (its client went away, a timeout cut it) and has not
        # handed its claim over yet: a retry sent right after a hang-up was refused as concurrent, "one running now
        # holds it" (QA). Once it has, a start takes the claim over; a turn still not ending by then is refused.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ENDING_TURN_WAIT_S):
                await exc.ending_here.wait()
        opened = await opened_start()
    if opened is None:  # after the transaction: the error's own session lists what exists (a read: repeatable)
        raise await retry_on_disconnect(
            lambda: unknown_tenant_error(turn_input.account, turn_input.agent_instance), what='tenant lookup'
        )
    tenant, claim, recent = opened
    name_turn_agent(tenant.agent_instance_slug)
    claim.loaded(recent.conversation.revision)
    if recent.stored_json:  # the ledger stores the loaded history as it is stored, without dumping it again
        remember_message_json(recent.stored, recent.stored_json)
    # The run tasks pydantic-ai left waiting are ended inside the claim: their cut-off requests reach the ledger before
    # the conversation is released (what a stopping server waits for before it closes the ledger).
    async with claim.held(), turn_runs():
        conversation = recent.conversation
        check_continuable(conversation_id, conversation.messages)
        deps = _dependencies(conversation_id, tenant)
        store = PostgresConversationStore(tenant.account_id)
        usage_before, conversation.usage = conversation.usage, RunUsage()
        capabilities = turn_hooks(
            SendableText(),  # first: the window and the ledger see the messages as they are sent
            ContextWindow(settings.context_max_tokens, recent.title, recent.earlier_omitted),
            TurnGuard(store, conversation_id, conversation.revision, claim, check_after_s=settings.turn_check_seconds),
            agent=agent,
        )
        limits = measured_limits(usage_limits) if usage_limits is not None else turn_usage_limits(settings)
        yield Turn(
            agent,
            resolved,
            deps,
            store,
            conversation,
            usage_before,
            limits,
            capabilities,
            started,
            recent,
            claim,
            settings,
        )


def check_continuable(conversation_id: str, messages: list[ModelMessage]) -> None:
    """Refuse a new message on a history that ends where pydantic-ai takes none: a response whose tool calls have no
    results (a fork or branch cut between a call and its result: `store.fork(..., at=2)`), or one a provider suspended.

    pydantic-ai raises a `UserError` for it after the turn started (an HTTP 500 with a traceback, on every later turn of
    that conversation too); this says so before anything is sent.

    Raises:
        InvalidInputError: naming `session_id`.
    """
    last = messages[-1] if messages else None
    if not isinstance(last, ModelResponse):
        return
    if last.state == 'suspended':
        problem = 'a response its provider suspended'
    elif last.tool_calls and last.state != 'interrupted':  # an interrupted one's calls are closed out by pydantic-ai
        problem = 'tool calls without their results (a fork or branch cut it there)'
    else:
        return
    raise InvalidInputError(
        f'conversation {conversation_id!r} ends with {problem}, so a new message cannot continue it; nothing was '
        'sent. Fork or branch it at the end of a turn (after a response without tool calls) and continue that',
        field='session_id',
    )


async def finish_turn(turn: Turn, result: AgentRunResult[str]) -> ChatResult:
    """Save the turn (releasing its claim, with the title and summary when due), hand the rest of the post-turn work
    (the usage rollup; a title and summary the save could not make) to the background.

    Raises:
        ConcurrentTurnError: another turn saved this conversation meanwhile; nothing was saved.
    """
    settings = turn.settings
    every = (settings.summary_every_turns, settings.summary_every_tokens)
    # Once sent, the save runs to its end, and the turn returns its result though its caller was cancelled meanwhile:
    # the caller's CancelledError means nothing was saved (a save cancelled with its COMMIT's reply in flight was
    # saved all the same, and the caller, told "cancelled", sent the message again).
    saved = await finished_if_started(
        append_turn(
            turn.store, result, turn.recent, usage_before=turn.usage_before, claim=turn.claim, summary_every=every
        )
    )
    # Due titles and summaries are stored by the save when the turn's messages can make them; else the post-turn
    # work does it (reading the history when it must).
    summarise = not saved.summarised and summary_due(
        turn.recent, saved.stored_chars, every_turns=every[0], every_tokens=every[1]
    )
    source = None
    if summarise and saved.entries:
        source = summary_source(
            saved.entries[-1].id,
            result.all_messages(),
            title=turn.recent.title,
            whole=not turn.recent.earlier_omitted,
        )
    schedule_post_turn_work(
        turn.deps.account_id,
        turn.deps.session_id,
        run_id=result.run_id,
        summarise=summarise,
        summary=source,
        rollup_interval_s=settings.usage_rollup_seconds,
    )
    return ChatResult(
        output=storable(result.output),  # as the store saved it (NUL and lone surrogates as U+FFFD)
        session_id=turn.deps.session_id,
        run_id=result.run_id,
        model_name=turn.model.model_name,
        usage=result.usage,
        duration_s=time.perf_counter() - turn.started,
        # What the save stored (the lifetime usage it computed), not a second sum.
        conversation_usage=saved.usage if saved.usage is not None else turn.usage_before + result.usage,
        finish_reason=result.response.finish_reason,
    )
