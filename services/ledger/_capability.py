"""A pydantic-ai capability that records every model request of a run in the LLM ledger."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from typing import Any

from opentelemetry import trace
from pydantic_ai.capabilities import AbstractCapability, AgentNode
from pydantic_ai.exceptions import ModelAPIError, SkipModelRequest, UsageLimitExceeded
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models import Model, ModelRequestContext, StreamedResponse
from pydantic_ai.usage import RequestUsage, RunUsage

from agentrt.db.errors import BudgetExceededError
from agentrt.services.budgets import BudgetConfig, Hold, RequestSizes, give_back, kept, output_bound_usd
from agentrt.services.ledger._admission import admit
from agentrt.services.ledger._contents import RunBodies
from agentrt.services.ledger._error_usage import reported_in_error
from agentrt.services.ledger._flight import Cut, InFlight, StreamProbe
from agentrt.services.ledger._identity import LedgerIdentity, identity_of
from agentrt.services.ledger._options import check_option_names, check_options
from agentrt.services.ledger._plausible import SentBounds, inconsistent_counts, max_tokens_sent
from agentrt.services.ledger._pricing import priced_model
from agentrt.services.ledger._record import (
    TOKEN_FIELDS,
    ContentKind,
    LedgerRecord,
    RawBody,
    Status,
    implausible_amount,
    new_request_id,
    utc_now,
)
from agentrt.services.ledger._recorders import RunRecorders, run_recorders
from agentrt.services.ledger._tracker import LLMRequestTracker, WriteOutcome, get_request_tracker
from agentrt.services.run_tasks import note_run_task

logger = logging.getLogger('agentrt.ledger')
_IDENTITY_COLUMNS = tuple(f.name for f in fields(LedgerIdentity))

RIDER_HOOKS = ('for_run', 'before_node_run', 'before_model_request')
"""The hooks `LedgerCapability` calls on its `riders`."""


@dataclass(slots=True)
class _RunLedger:
    """Per-run state. Model requests of one run are sequential, so one in-flight slot is enough."""

    tracker: LLMRequestTracker
    identity: LedgerIdentity
    budget: BudgetConfig
    recorders: RunRecorders
    """The run's recording ledgers, this one counted in by its `wrap_run` unless it stands in (`stands_in`)."""
    current: InFlight | None = None
    cut: Cut | None = None
    acks: list[asyncio.Future[WriteOutcome]] = field(default_factory=list)
    bodies: RunBodies = field(default_factory=RunBodies)
    """The run's message bodies: each message dumped, redacted and serialised once however often it is resent."""
    sizes: RequestSizes = field(init=False)
    """The run's message sizes (the budget's input bound), each message measured once however often it is resent,
    from the text its body is stored by (`RunBodies.message_json`)."""
    no_budget: bool = False
    """The deps say the account had no budget when the turn started (`account_has_budget=False`): nothing to hold."""
    held: bool = False
    """A request of the run held part of a budget: the next one is admitted once its row settled it."""
    ended: bool = False
    """The run's `wrap_run` has recorded its cut stream (if any) and ended: a stream cut after that is recorded where
    its cancellation is seen (`LedgerCapability._cut`)."""
    run_error: BaseException | None = None
    """What the run ended with, once `ended`: what a stream cut after it is recorded against."""
    columns: dict[str, Any] = field(init=False)
    """The identity as row columns, for every record of the run."""

    def __post_init__(self) -> None:
        self.columns = {name: getattr(self.identity, name) for name in _IDENTITY_COLUMNS}  # scalars: no deep copy
        self.sizes = RequestSizes(self.bodies.message_json)


@dataclass
class LedgerCapability(AbstractCapability[Any]):
    """Records one ledger row per model request: plain, streamed, failed, cancelled or stopped early.

    The subclass form of pydantic-ai's `Hooks` capability (same lifecycle methods), because it needs
    per-run state (`for_run`) and a model wrapper for streams. `wrap_model_request` covers a request
    that succeeds, fails (`on_model_request_error` has re-raised by then) or is cancelled mid-stream;
    `after_model_request` keeps a response a later hook rejects. The request id is minted before the
    request is sent. Identity comes from `ctx.deps` through the `RunIdentity` protocol (deps without it
    give rows without identity). Rows are handed to the tracker, which
    writes them in its own side sessions (never a tool's or the caller's); the run waits for them
    to be durable at its end (committed, or spooled when the database is down), at most
    `ack_timeout` seconds, and never fails because of billing.

    Budgets: before the request is sent, what it can cost at most is held of its account's budget and its
    `max_tokens` capped to what was held (`_admission.py`); the writer settles the hold with the row. A request the
    budget refuses raises `BudgetExceededError` and is recorded as a `refused` row (cost 0); nothing is sent.
    """

    tracker: LLMRequestTracker | None = None
    """The tracker to write to; the process-wide `get_request_tracker()` when `None`."""
    store_content: bool = True
    """Store the full prompt and response (redacted) as content rows."""
    wait_for_durable: bool = True
    """Let the run end only once its rows (and their contents) are committed, or spooled."""
    ack_timeout: float = 10.0
    """The longest a run waits for that; past it the run goes on and the writes finish behind it."""
    measure_time_to_first_token: bool = True
    """Record the time to the first chunk of streamed requests."""
    budget: BudgetConfig | None = None
    """The budget knobs; `AGENTRT_BUDGET*` of the running settings when `None` (`BudgetConfig(enabled=False)`: none)."""
    riders: tuple[AbstractCapability[Any], ...] = ()
    """Capabilities dispatched through this one (`RIDER_HOOKS`, in order, before the ledger's own): a chat turn's
    window and guard ride on the agent's ledger (`agentrt.agents.turn_hooks`), so pydantic-ai, which calls every hook of
    every capability of a run, calls one capability's instead of two. Only for capabilities that use no other hook."""
    stands_in: bool = False
    """Record a run's requests (and hold the budget for them) only when no other ledger of the run does: the ledger a
    chat turn adds for an agent it found none on (`agentrt.agents.turn_hooks`), which may hold one the turn cannot see
    before the run (a `DynamicCapability`'s). Its riders run either way."""
    _run: _RunLedger | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A per-run copy (`for_run`) is of a capability already checked: no second check on every run.
        if self._run is None:
            check_options(self)

    async def for_run(self, ctx: Any) -> LedgerCapability:
        """A per-run copy, so concurrent runs never share in-flight state (and the riders' per-run copies)."""
        if not self.riders:
            return replace(self, _run=self._new_run(ctx))
        riders = tuple([await rider.for_run(ctx) for rider in self.riders])
        return replace(self, _run=self._new_run(ctx), riders=riders)

    async def before_node_run(self, ctx: Any, *, node: AgentNode[Any]) -> AgentNode[Any]:
        """The riders' `before_node_run`, the node passed along."""
        for rider in self.riders:
            node = await rider.before_node_run(ctx, node=node)
        return node

    async def before_model_request(self, ctx: Any, request_context: ModelRequestContext) -> ModelRequestContext:
        """The riders' `before_model_request`, the request context passed along."""
        for rider in self.riders:
            request_context = await rider.before_model_request(ctx, request_context)
        return request_context

    async def _messages_sent(self, ctx: Any, request_context: ModelRequestContext) -> list[ModelMessage] | None:
        """The messages the request will send as the riders leave them (a turn's `ContextWindow` folds older turns),
        for the budget's estimate; None without riders.

        pydantic-ai runs `before_model_request` inside `wrap_model_request`'s handler, after the budget is held, so
        the hold would otherwise be of the whole history loaded (up to three times the context budget). The riders
        run on a copy of the request context, their result used for the estimate only; pydantic-ai runs them again
        on the request (`ContextWindow` keeps its fit in its per-run memo).
        """
        state = self._state(ctx)
        if not self.riders or not state.budget.enabled or state.identity.account_id is None:
            return None
        probe = replace(request_context, messages=list(request_context.messages))
        for rider in self.riders:
            probe = await rider.before_model_request(ctx, probe)
        return list(probe.messages)

    def _state(self, ctx: Any) -> _RunLedger:
        if self._run is None:  # used outside `for_run` (a hand-driven capability): still record
            self._run = self._new_run(ctx)
        return self._run

    def _new_run(self, ctx: Any) -> _RunLedger:
        tracker = self.tracker or get_request_tracker()
        no_budget = getattr(ctx.deps, 'account_has_budget', None) is False
        recorders = run_recorders(getattr(ctx, 'run_id', None))
        budget = self.budget or BudgetConfig.current()
        return _RunLedger(tracker, identity_of(ctx.deps), budget, recorders, no_budget=no_budget)

    async def wrap_run(self, ctx: Any, *, handler: Any) -> Any:
        """Run, then have the run's ledger rows committed now (not after the writer's commit delay) and wait (bounded)
        until they are durable.

        A streamed request cut off meanwhile is recorded here, once the run's error says why (see `Cut`). The
        responses recorded since the last model request are sealed here (`RunBodies.seal`): their stored content is
        taken once pydantic-ai has stamped them. A run that is cancelled does not wait, but its rows are committed
        without delay all the same. The task it runs in is noted for the turn, which ends it if pydantic-ai leaves it
        waiting (`agentrt.services.run_tasks`). A ledger that records the run (`stands_in` False) is counted among the
        run's recorders here, which a stand-in asks before each request (`_recorders.py`).
        """
        note_run_task()
        if not self.stands_in:
            self._state(ctx).recorders.count += 1
        try:
            result = await handler()
        except BaseException as exc:
            self._record_cut(ctx, exc)
            state = self._state(ctx)
            state.ended, state.run_error = True, exc
            state.bodies.seal()
            if isinstance(exc, Exception):
                await self._settle(ctx)
            else:
                state.tracker.commit_now(state.acks)
            raise
        self._record_cut(ctx, None)
        state = self._state(ctx)
        state.ended = True
        state.bodies.seal()  # the last response, stamped by now
        await self._settle(ctx)
        return result

    def _record_cut(self, ctx: Any, run_error: BaseException | None) -> None:
        state = self._state(ctx)
        cut, state.cut = state.cut, None
        if cut is not None:
            # A model's own failure opening the stream counts as an error even when it is not a `ModelAPIError` (a
            # custom model, pydantic-ai's `UnexpectedModelBehavior` for a stream that ended before any content).
            opened = cut.flight.open_error
            error: BaseException | None = (
                run_error if isinstance(run_error, ModelAPIError) else opened or cut.cancellation
            )
            whole = _answered_whole(cut.flight) if error is cut.cancellation else None
            if whole is not None:
                # The provider's end (its finish reason) had arrived when the stream was stopped (by the caller, or
                # by the run: a token limit is checked on each chunk): the request was answered, complete, as the
                # same request is on the plain path.
                error = None
            elif error is cut.cancellation and isinstance(run_error, UsageLimitExceeded):
                error = run_error  # the run stopped the stream, not the caller (whom a cancellation names)
            self._record(ctx, state, cut.request_context, cut.flight, whole, error, ended=(cut.ended, cut.finished_at))

    def _cut(self, ctx: Any, state: _RunLedger, cut: Cut) -> None:
        """Keep a streamed request's cut for `wrap_run` to record once the run's error says why (`Cut`), or record it
        now if the run has ended already.

        `asyncio.run()` ending with the turn still streaming in a task of its own cancels every task at once: the
        run's `wrap_run` task can see its cancellation, record nothing and end before the request's task sees its own,
        which left the request sent and never recorded (QA: 5 of 5 streams). Recorded here, against the run's end, and
        not hurried (`commit_now`), its row goes the way a plain request's cut at the loop's end does: held for the
        commit delay, it is journaled, and the next process replays it if the loop ends first. Hurried, it was often in
        a write the loop's end cut off, in no journal (3 runs in 6).
        """
        state.current = None
        state.cut = cut
        if state.ended:
            self._record_cut(ctx, state.run_error)
            state.bodies.seal()

    async def _settle(self, ctx: Any) -> None:
        state = self._state(ctx)
        acks, state.acks = state.acks, []
        state.tracker.commit_now(acks)
        if not (self.wait_for_durable and acks):
            return
        _, pending = await asyncio.wait(acks, timeout=self.ack_timeout)
        if pending:
            logger.warning('ledger: %d row(s) not durable after %gs; the run goes on', len(pending), self.ack_timeout)

    def get_wrapper_model(self, model: Model) -> Model | None:
        """For a streamed request, a thin wrapper that notes the stream (time to first chunk, partial usage)."""
        flight = self._run.current if self._run is not None else None
        if flight is None or not flight.streamed:
            return None
        return StreamProbe(model, flight)

    async def wrap_model_request(self, ctx: Any, *, request_context: ModelRequestContext, handler: Any) -> Any:
        """Mint the ledger key, hold the budget, send the request, and record the outcome whatever it is; or only send
        it when this ledger stands in (`stands_in`) for another ledger of the run, which does all that."""
        state = self._state(ctx)
        if self.stands_in and state.recorders.count:
            return await handler(request_context)
        self._record_cut(ctx, None)  # an earlier stream was cut and the run went on: it was not fatal
        state.bodies.seal()  # the responses recorded so far: pydantic-ai has stamped them by now
        state.tracker.bodies_sealed()  # their rows can be prepared, and journaled while held for the commit delay
        request_id, started_at = new_request_id(), utc_now()
        if state.held:
            await self._earlier_holds_settled(state)
        try:
            hold = (
                None
                if state.no_budget
                else await admit(
                    state.identity,
                    request_context,
                    request_id,
                    started_at,
                    state.sizes,
                    state.budget,
                    await self._messages_sent(ctx, request_context),
                )
            )
        except BudgetExceededError as exc:
            self._record_refused(ctx, state, request_context, request_id, started_at, exc)
            raise
        state.held = state.held or hold is not None
        flight = InFlight(
            request_id,
            time.perf_counter(),
            started_at,
            bool(request_context.streaming),
            _current_trace_id(),
            run_step=ctx.run_step,
            sent=_sent_bounds(state, request_context),
        )
        state.current = flight
        cost_before = ctx.usage.cost  # the run's cost before this response's: exact, whatever the response claims
        # A chat turn's limits (`MeasuredUsageLimits`) read a stream's usage so far, to check no limit on a sum holding
        # amounts the ledger will record unmeasured (pydantic-ai checks on every chunk, before this hook sees it).
        watch = getattr(ctx.usage_limits, 'watch_request', None)
        if watch is not None:
            watch(flight)
        try:
            # However long the request runs (a slow reader holds a stream open), its hold does not expire under it.
            async with kept(hold, state.budget.reservation_ttl_seconds):
                response = await handler(request_context)
        except SkipModelRequest:
            state.current = None  # nothing was sent
            if hold is not None:
                await _release(hold)
            raise
        except asyncio.CancelledError as exc:
            if not flight.streamed:
                self._record(ctx, state, request_context, flight, None, exc)
                raise
            self._cut(ctx, state, Cut(request_context, flight, exc, time.perf_counter(), utc_now()))
            raise
        except BaseException as exc:
            self._record(ctx, state, request_context, flight, None, exc)
            raise
        finally:
            if watch is not None:
                watch(None)
        measured = self._record(ctx, state, request_context, flight, response, None)
        if not measured and not response.usage.unmeasured_requests:
            _counted_unmeasured(ctx.usage, response, cost_before=cost_before)
        return response

    async def _earlier_holds_settled(self, state: _RunLedger) -> None:
        """Have the run's earlier requests' rows written before the next request is admitted (waiting at most the
        ack timeout), once one of them held part of a budget.

        A row's insert settles its request's hold (`services/budgets/_settle.py`): until then the whole hold, the most
        the request could have cost, still counted against the budget. Held for the writer's commit delay, it made
        the turn's next request, near the limit, capped to a few output tokens or refused, the first one billed, and
        a retry of the message billed it again (QA). Nothing to wait for once they are written.
        """
        waiting = [ack for ack in state.acks if not ack.done()]
        if not waiting:
            return
        state.tracker.commit_now(waiting)
        await asyncio.wait(waiting, timeout=self.ack_timeout)

    async def after_model_request(
        self, ctx: Any, *, request_context: ModelRequestContext, response: ModelResponse
    ) -> ModelResponse:
        """Note the response before any later hook can reject it (its usage is billed either way)."""
        if self._run is not None and self._run.current is not None:
            self._run.current.response = response
        return response

    def _record(
        self,
        ctx: Any,
        state: _RunLedger,
        request_context: ModelRequestContext,
        flight: InFlight,
        response: ModelResponse | None,
        error: BaseException | None,
        ended: tuple[float, Any] | None = None,
    ) -> bool:
        """Record the request; whether its row is measured (`usage_reported`): a response's usage is counted in the
        run's as the row records it (`_counted_unmeasured`)."""
        state.current = None
        measured = response is not None and usage_measured(response.usage, flight.sent)
        try:
            record = self._build(ctx, state, request_context, flight, response, error, ended)
            measured = record.usage_reported  # read before the writer's thread has the record
            state.acks.append(state.tracker.submit(record))
        except Exception:  # billing must never fail the chat
            logger.exception('ledger: could not record model request %s', flight.id)
        return measured

    def _record_refused(
        self,
        ctx: Any,
        state: _RunLedger,
        request_context: ModelRequestContext,
        request_id: Any,
        started_at: Any,
        error: BudgetExceededError,
    ) -> None:
        """The ledger row of a request the budget refused: status `refused`, no tokens, cost 0, the error's text."""
        try:
            record = LedgerRecord(
                id=request_id,
                model=request_context.model.model_name,
                streamed=bool(request_context.streaming),
                status='refused',
                success=False,
                latency_ms=0.0,
                started_at=started_at,
                finished_at=utc_now(),
                run_id=ctx.run_id,
                run_step=ctx.run_step,
                conversation_id=ctx.conversation_id,
                agent_name=getattr(ctx.agent, 'name', None),
                provider=request_context.model.system,
                input_cost=Decimal(0),
                output_cost=Decimal(0),
                total_cost=Decimal(0),
                price_source='budget: refused, not sent',
                trace_id=_current_trace_id(),
                error_type=type(error).__qualname__,
                error_message=str(error),
                **state.columns,
            )
            state.acks.append(state.tracker.submit(record))
        except Exception:  # the refusal stands whether or not its row can be recorded
            logger.exception('ledger: could not record the refused model request %s', request_id)

    def _build(
        self,
        ctx: Any,
        state: _RunLedger,
        request_context: ModelRequestContext,
        flight: InFlight,
        response: ModelResponse | None,
        error: BaseException | None,
        ended: tuple[float, Any] | None = None,
    ) -> LedgerRecord:
        finished, finished_at = ended or (time.perf_counter(), utc_now())
        seen = response if response is not None else flight.response or _partial(flight.stream)
        status: Status
        if response is not None and response.state == 'incomplete' and _ended_by_provider(flight.stream):
            status = 'error'  # the stream ended before the provider's last event: cut off on the provider's side
        elif response is not None:
            status = 'complete' if _answered(response) else 'cancelled'
        elif isinstance(error, Exception):
            status = 'error'
        else:
            status = 'cancelled'
        record = LedgerRecord(
            id=flight.id,
            model=request_context.model.model_name,
            streamed=flight.streamed,
            status=status,
            success=status == 'complete',
            latency_ms=(finished - flight.started) * 1000,
            started_at=flight.started_at,
            finished_at=finished_at,
            run_id=ctx.run_id,
            run_step=flight.run_step,
            conversation_id=ctx.conversation_id,
            agent_name=getattr(ctx.agent, 'name', None),
            provider=request_context.model.system,
            trace_id=flight.trace_id,
            **state.columns,
        )
        if self.measure_time_to_first_token and flight.stream is not None and flight.stream_started is not None:
            first = flight.stream.time_to_first_chunk(flight.stream_started)
            record.time_to_first_token_ms = None if first is None else first * 1000
        # No response, but the error kept the provider's answer and the usage it billed (a completion without
        # choices): measured, though the contents keep no made-up response.
        billed = reported_in_error(request_context.model, error) if seen is None and error is not None else None
        if seen is not None:
            _apply_response(record, seen, flight.sent)
            if status != 'complete':
                record.output_bound_usd = _output_bound(request_context.model, seen, flight.started_at)
        elif billed is not None:
            _apply_response(record, billed, flight.sent)
        else:
            record.usage_reported = False
            record.price_source = 'unmeasured'
        if error is not None:
            record.error_type = type(error).__qualname__
            record.error_message = _error_text(error, flight.streamed)
            status_code = getattr(error, 'status_code', None)
            record.error_status_code = status_code if isinstance(status_code, int) else None
        elif status == 'cancelled':
            record.error_message = 'stream stopped before the response was complete'
        elif status == 'error':
            record.error_type = 'IncompleteStream'
            record.error_message = "the provider's stream ended before its last event: the answer may be cut off"
        if self.store_content:
            record.raw_contents = _contents(state.bodies, request_context, seen, error)
        return record


def _error_text(error: BaseException, streamed: bool) -> str:
    """A row's `error_message` for `error`: its text, but a plain statement for a cancellation, whose text is Python's
    (anyio's `Cancelled via cancel scope 7fb89731ac00 by <Task cancelling name='Task-4175' coro=<run_checked_turn(...`
    for a JSON turn whose client hung up, `CancelledError()` for a stream; QA): who stopped the turn (its client, a
    signal, the caller) is not the request's to know; that it was stopped is what the row says, as a cut stream's
    row without an error does."""
    if isinstance(error, asyncio.CancelledError):
        return f'{"stream" if streamed else "request"} stopped before the response was complete'
    return str(error) or repr(error)


async def _release(hold: Hold) -> None:
    """Give back the hold of a request that was never sent; this process's next sweep does it if this cannot."""
    if not await asyncio.shield(give_back(hold.id, hold.account_id)):
        logger.warning('ledger: could not release the budget hold of %s now; the next sweep will', hold.id)


def _output_bound(model: Model, response: ModelResponse, at: Any) -> Decimal | None:
    """What the output a cut-off or failed request received can cost at most (its budget hold is settled at no less);
    None when it cannot be told (the row is recorded all the same)."""
    try:
        return output_bound_usd(model, response.parts, at)
    except Exception:
        logger.exception('ledger: could not bound the cost of the output a cut-off request received')
        return None


def _current_trace_id() -> str | None:
    """The trace the request is made in (the run's, when pydantic-ai is instrumented), as 32 hex digits."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid and context.trace_flags.sampled else None


def _apply_response(record: LedgerRecord, response: ModelResponse, sent: SentBounds | None = None) -> None:
    usage = response.usage
    if response.state != 'complete' and not usage.has_values():
        # A stream cut off before the provider reported usage: not a measured zero. What it reported before the
        # cut (a usage chunk, cumulative usage stats) has values and is kept below.
        record.response_model = response.model_name
        record.provider = response.provider_name or record.provider
        record.finish_reason = response.finish_reason  # when it came before the cut: the answer had ended
        record.provider_response_id = response.provider_response_id
        record.usage_reported = False
        record.price_source = 'unmeasured'
        return
    record.response_model = response.model_name
    record.provider = response.provider_name or record.provider
    record.finish_reason = response.finish_reason
    record.provider_response_id = response.provider_response_id
    record.input_tokens = usage.input_tokens
    record.output_tokens = usage.output_tokens
    record.cache_read_tokens = usage.cache_read_tokens
    record.cache_write_tokens = usage.cache_write_tokens
    record.reasoning_tokens = usage.output_reasoning_tokens or usage.details.get('reasoning_tokens', 0)
    record.total_tokens = usage.total_tokens
    record.usage_reported = _reported(usage)
    record.total_cost = usage.cost if record.usage_reported else None  # genai-prices' $0 for the zeros included
    problem = _implausible(record, sent)
    if problem is None and record.usage_reported and usage.cost is None and response.state == 'complete':
        if priced_model(response):
            # pydantic-ai prices every complete answer: a model with a price whose usage could not be priced reported
            # counts genai-prices refuses. Filed as unpriced, it cost $0 against any budget (QA).
            problem = 'usage its price cannot be worked out from'
    if problem is not None:
        # A count no request has (past 64 bits, a trillion, negative, cached tokens past the input's): a provider's
        # nonsense, not a measurement. The row is written unmeasured; it was refused by PostgreSQL, spooled, and at
        # replay moved to `.rejected` (the request gone from the ledger), or, just under 64 bits, it overflowed every
        # sum of the counts (QA).
        logger.warning(
            'ledger: %s reported token counts or a cost no request has (%s; input %s, output %s, cache read %s, '
            'total %s, cost %s); the request is recorded unmeasured',
            record.model,
            problem,
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.total_tokens,
            usage.cost,
        )
        record.unmeasured()
    if not record.usage_reported:
        record.price_source = 'unmeasured'
    elif usage.cost is None and response.state == 'complete':
        record.price_source = 'unpriced'  # pydantic-ai's genai-prices lookup already found no price (`priced_model`)
    else:
        # The writer prices the input/output split (and a cut-off stream's total) off the request's path.
        record.price_source = 'genai-prices' if usage.cost is not None else 'unpriced'
        record.pricing = response


def usage_measured(usage: RequestUsage, sent: SentBounds | None = None) -> bool:
    """Whether a response's usage is a measurement, as the ledger records it: reported, some tokens counted, and counts
    and cost a request has (`implausible_amount`, `inconsistent_counts` with what the request was `sent` with)."""
    return _reported(usage) and usage_plausible(usage, sent)


def usage_plausible(usage: RequestUsage, sent: SentBounds | None = None) -> bool:
    """Whether every count and the cost of a response's usage (so far, for one still streaming) are amounts a request
    has (`implausible_amount`), and its counts agree with each other and with what its request was `sent` with
    (`inconsistent_counts`); one that is not makes the ledger record the response unmeasured."""
    reasoning = usage.output_reasoning_tokens or usage.details.get('reasoning_tokens', 0)
    amounts = {name: getattr(usage, name, 0) for name in TOKEN_FIELDS if name != 'reasoning_tokens'}
    if implausible_amount({**amounts, 'reasoning_tokens': reasoning, 'total_cost': usage.cost}) is not None:
        return False
    return inconsistent_counts(amounts, sent) is None


def _counted_unmeasured(run_usage: RunUsage, response: ModelResponse, *, cost_before: Any) -> None:
    """Count `response` in the run's usage as the ledger recorded it, unmeasured, not as what it claimed.

    pydantic-ai adds a response's usage to the run's before the hooks see it: a proxy's 2^70 tokens then ended every
    later request of the turn over its token limit, a gateway's 10^15 USD was the turn's cost in `agentrt chat`'s
    summary and the HTTP turn, and the conversation's lifetime usage kept both, where the ledger had set them aside
    (QA). Taken back out here, so the turn's limits, figures and saved usage read what its ledger rows record; the
    cost is put back to `cost_before`, the run's before the response.
    """
    claimed = response.usage
    for name, value in vars(claimed).items():
        if name != 'unmeasured_requests' and _number(value) and _number(getattr(run_usage, name, None)):
            setattr(run_usage, name, _whole(getattr(run_usage, name) - value))
    for key, value in claimed.details.items():
        if _number(value) and _number(run_usage.details.get(key)):
            run_usage.details[key] = _whole(run_usage.details[key] - value)
    # The cost as it was before the response (None: no response priced, not a measured $0; QA): subtracting the claim
    # lost the measured part to pydantic-ai's 28 digits ($0.0000045 beside a claimed $1e30 came back $0; QA).
    run_usage.cost = cost_before
    run_usage.unmeasured_requests += 1
    response.usage = RequestUsage(unmeasured_requests=1)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value: float) -> Any:
    """A count back to a whole number once a fraction a provider claimed is taken out of it (10.5 - 10.5)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _reported(usage: RequestUsage) -> bool:
    # No count at all in an answer: pydantic-ai's reading of the provider's usage failed (null, negative or
    # non-numeric counts: a warning, then zeros), for no request sends nothing; charged as a measured free request,
    # a budget was spent by $0 (QA).
    return not usage.unmeasured_requests and bool(usage.input_tokens or usage.output_tokens)


def _implausible(record: LedgerRecord, sent: SentBounds | None) -> str | None:
    """What in `record`'s token counts and cost no request has (`implausible_amount`, as a replay checks spooled rows:
    what the ledger's columns, and the sums over them, hold), or where its counts disagree with each other or with
    what the request was `sent` with (`inconsistent_counts`), described; None when they are a measurement."""
    amounts = {name: getattr(record, name) for name in TOKEN_FIELDS}
    return implausible_amount({**amounts, 'total_cost': record.total_cost}) or inconsistent_counts(amounts, sent)


def _sent_bounds(state: _RunLedger, request_context: ModelRequestContext) -> SentBounds:
    """What the request goes with (its `max_tokens` as the budget capped it), for reading its usage; its input's size
    bound is worked out from the messages only if an input count comes near it (`SentBounds.input_exceeds`).

    The messages are the run's before a turn's window folds them (`_messages_sent`): a bound of more than was sent.
    """
    messages, parameters = request_context.messages, request_context.model_request_parameters
    return SentBounds(
        max_tokens_sent(request_context.model_settings),
        native_tools=len(getattr(parameters, 'native_tools', None) or ()),
        input_size=lambda: state.sizes.input_tokens_bound(messages, parameters),
    )


def _answered_whole(flight: InFlight) -> ModelResponse | None:
    """The response of a streamed request that received the provider's whole answer (finished, or its finish reason
    received before the run stopped reading), as complete; else None."""
    seen = flight.response or _partial(flight.stream)
    return seen if seen is not None and _answered(seen) else None


def _ended_by_provider(stream: StreamedResponse | None) -> bool:
    """Whether a stream whose response is `incomplete` ran to its end (the provider closed it before its last event:
    a proxy's idle timeout), rather than being left by its reader (`break`, a run that stopped reading: `cancelled`).

    pydantic-ai tells the two apart only by its stream's private `_finished` (set on a natural end, in 2.68 and 2.78
    alike); without it, the row is `cancelled` as before (tests/agents/test_provider_faults.py would say so).
    """
    return stream is not None and getattr(stream, '_finished', False) is True


def _answered(response: ModelResponse) -> bool:
    """Whether the provider's whole answer is in `response`: complete (or suspended), or its finish reason received
    (a stream the run stopped reading after its last chunk is 'interrupted' all the same)."""
    return response.state in ('complete', 'suspended') or response.finish_reason is not None


def _partial(stream: StreamedResponse | None) -> ModelResponse | None:
    """What a stream received before it was cut off, with the usage reported so far."""
    if stream is None:
        return None
    try:
        return stream.get()
    except Exception:
        return None


def _contents(
    bodies: RunBodies, request_context: ModelRequestContext, response: ModelResponse | None, error: BaseException | None
) -> list[tuple[ContentKind, RawBody]]:
    """Take the prompt (messages sent, with instructions), the response and the error now, before any later hook
    can change the messages; redaction, serialisation and the size cap run in the tracker's worker thread.
    A body that cannot be taken is left out: the row is recorded all the same."""
    parts = getattr(request_context.model_request_parameters, 'instruction_parts', None) or []
    instructions = '\n\n'.join(part.content for part in parts) or None
    try:
        return list(bodies.request_contents(instructions, request_context.messages, response, error))
    except Exception:
        logger.exception('ledger: could not take the contents of a model request; the row is recorded without')
        return []


def ledger_capability(tracker: LLMRequestTracker | None = None, **options: Any) -> LedgerCapability:
    """The capability to add to an agent (`Agent(..., capabilities=[ledger_capability()])`) or to one run.

    Args:
        tracker: where rows go; the process-wide `get_request_tracker()` when omitted.
        **options: `LedgerCapability` fields (`store_content`, `wait_for_durable`, `ack_timeout`, ...).

    Raises:
        InvalidInputError: an option it does not have, or one of the wrong type or value (`ack_timeout` negative,
            NaN or infinite; a flag that is not `True` or `False`), naming it.
    """
    check_option_names(options, (f.name for f in fields(LedgerCapability)))
    return LedgerCapability(tracker=tracker, **options)
