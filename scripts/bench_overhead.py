"""Benchmark 3: runtime overhead. A bare pydantic-ai run against a full runtime turn, same agent, model and tools.

Bare: the directory agent (same instructions and toolset, no capabilities) run with `agent.run` /
`run_stream_events`, dependencies built once beforehand. Runtime: `simple_chat` / `simple_chat_stream` with
everything the runtime attaches (tenant lookup, conversation history loaded and saved, the ledger and its stored
content if attached, background post-turn work). The model is the demo planner (3 requests, 7 tool calls per turn)
with a fixed simulated latency per request. Turns alternate bare/runtime so machine noise hits both alike; reported:
median latency, CPU per turn (time.process_time, deferred ledger/background work included), time to first token.

First, the per-turn breakdown (issue 20) at 0 ms model latency: bare, the runtime, and the runtime with one part
turned off at a time (the ledger, its stored content, post-turn work, the conversation store, the claim and guard,
the tenant lookup) and with the ledger's commit delay at 0 (each row committed as soon as it is ready), interleaved
turn by turn; CPU per turn (median), and sessions (pool checkouts) and statements
(`before_cursor_execute`) per turn, counted from SQLAlchemy's events, and the runtime's sessions by kind (each
named by its first statement), and, as an extra line, the bare agent carrying the same history in memory (the
headline ratio stays against the bare turn without it). The parts are turned off by replacing names in
`agentrt.agents.chat_turn`; names a version does not have are skipped, so the same script measures earlier versions.

Run (embedded PostgreSQL unless DATABASE_URL is set):
    .venv/bin/python scripts/bench_overhead.py [--latencies 0,0.25] [--turns 15] [--breakdown-turns 30] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import statistics
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from bench_common import (
    bare_dependencies,
    bare_directory_agent,
    budgets_on,
    delete_ledger_rows,
    demo_planner_model,
    float_list,
    is_text_delta,
    machine_info,
    ms,
    non_negative_int,
    parser,
    positive_int,
    print_config,
    print_table,
    run_benchmark,
    run_clean_up,
    start_database,
    use_temporary_spool,
    write_results,
)
from pydantic_ai import Agent, Conversation
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models import Model
from sqlalchemy import event, text

from agentrt.agents import chat_turn
from agentrt.agents.simple_chat import create_simple_chat_agent, simple_chat, simple_chat_stream
from agentrt.db.engine import close_database, get_engine
from agentrt.db.errors import BudgetExceededError
from agentrt.db.roles import APP_ROLE, TENANT_SETTING
from agentrt.db.session import Unscoped, enter_account, get_db_session, row_security
from agentrt.services.background import drain_supervisor, get_supervisor
from agentrt.services.conversations import PostgresConversationStore, RecentConversation
from agentrt.services.demo_data import MEDICAL_ACCOUNT, seed_demo_data
from agentrt.services.ledger import LLMRequestTracker, get_request_tracker, ledger_capability, set_request_tracker
from agentrt.services.tenancy import lookup_tenant
from agentrt.tools.dependencies import SessionDependencies

try:  # names of this version; earlier ones (the before column) lack them and skip what uses them
    from agentrt.services.conversations import SavedTurn, TurnClaim
    from agentrt.services.tenancy import Tenant
except ImportError:  # pragma: no cover
    SavedTurn = TurnClaim = Tenant = None  # type: ignore[assignment,misc]
try:  # since the turn start runs on the driver connection
    from agentrt.agents.turn_hooks import TURN_LEDGER_ID
    from agentrt.db.driver import DriverStatement

    LEDGER_ID: dict[str, str] = {'id': TURN_LEDGER_ID}
    _ENTER_TENANT: Any = DriverStatement.of(
        text(f"SELECT set_config('role', '{APP_ROLE}', true), set_config('{TENANT_SETTING}', :account, true)")
    )
except ImportError:  # pragma: no cover
    LEDGER_ID, _ENTER_TENANT = {}, None

QUESTION = 'Find me cardiologists in Seattle who accept Medicare'
LEFT_BEHIND = text(
    'SELECT count(DISTINCT r.id), count(c.request_id), '
    '(SELECT count(*) FROM conversations WHERE conversation_id LIKE :p) FROM llm_requests r '
    'LEFT JOIN llm_request_contents c ON c.request_id = r.id WHERE r.chat_session_id LIKE :p'
)
MODEL_NOTE = 'demo planner (agents/demo_model.py) as a FunctionModel named gpt-4o-mini, priced by genai-prices'
CONVERSATIONS = text('SELECT conversation_id FROM conversations WHERE conversation_id LIKE :p')


async def settle() -> None:
    """Wait for work the runtime deferred past the turn (ledger contents, background tasks)."""
    await get_request_tracker().flush()
    await get_supervisor().join()


async def bare_turn(
    agent: Agent[SessionDependencies, str], deps: SessionDependencies, model: Model, streamed: bool
) -> float | None:
    """A bare pydantic-ai run; returns the time to the first text delta when streamed."""
    if not streamed:
        await agent.run(QUESTION, deps=deps, model=model)
        return None
    started, first = time.perf_counter(), None
    async with agent.run_stream_events(QUESTION, deps=deps, model=model) as events:
        async for event in events:
            if first is None and is_text_delta(event):
                first = time.perf_counter() - started
    return first


async def runtime_turn(session_id: str, model: Model, streamed: bool) -> float | None:
    """A runtime turn (`simple_chat` or `simple_chat_stream`); returns the time to the first delta when streamed."""
    if not streamed:
        await simple_chat(QUESTION, session_id=session_id, account=MEDICAL_ACCOUNT, model=model)
        return None
    started, first = time.perf_counter(), None
    async for _ in simple_chat_stream(QUESTION, session_id=session_id, account=MEDICAL_ACCOUNT, model=model):
        first = first or time.perf_counter() - started
    return first


async def count_rows(prefix: str) -> dict[str, int]:
    """What this run's runtime turns left behind: ledger rows, content rows, conversations, background tasks."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        ledger, contents, conversations = (await session.execute(LEFT_BEHIND, {'p': f'{prefix}-%'})).one()
    spawned = get_supervisor().stats().spawned
    return {
        'ledger_rows': ledger,
        'content_rows': contents,
        'conversations': conversations,
        'background_tasks': spawned,
    }


async def delete_conversations(prefix: str) -> None:
    """Remove what this run stored: its conversations (and their entries) and its ledger rows."""
    store = PostgresConversationStore((await bare_dependencies('cleanup', MEDICAL_ACCOUNT)).account_id)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        ids = list((await session.execute(CONVERSATIONS, {'p': f'{prefix}-%'})).scalars())
        await delete_ledger_rows(session, 'r.chat_session_id LIKE :p', {'p': f'{prefix}-%'})
    for conversation_id in ids:
        if (record := await store.read_record(conversation_id)) is not None:
            await store.delete_record(conversation_id, expected_revision=record.revision)


async def measure(latency: float, streamed: bool, turns: int, prefix: str) -> list[dict]:
    """`turns` bare and `turns` runtime turns, alternating; conversations of 4 turns for the runtime."""
    model = demo_planner_model(latency)
    agent = bare_directory_agent()
    deps = await bare_dependencies('bench-bare', MEDICAL_ACCOUNT)
    samples = {'bare': [], 'runtime': []}
    for i in range(turns + 1):  # the first pair warms up and is not counted
        for pattern in ('bare', 'runtime'):
            await settle()
            started, cpu = time.perf_counter(), time.process_time()
            if pattern == 'bare':
                first = await bare_turn(agent, deps, model, streamed)
            else:
                first = await runtime_turn(f'{prefix}-{latency}-{streamed}-{i // 4}', model, streamed)
            wall = time.perf_counter() - started
            await settle()
            if i:
                samples[pattern].append((wall, time.process_time() - cpu, first))
    rows = []
    for pattern, values in samples.items():
        walls, cpus, firsts = zip(*values, strict=True)
        rows.append(
            {'model_latency_ms': latency * 1000, 'mode': 'streamed' if streamed else 'plain', 'pattern': pattern}
            | {'turns': turns, 'median_ms': ms(statistics.median(walls)), 'mean_ms': ms(statistics.fmean(walls))}
            | {'cpu_ms': ms(statistics.median(cpus))}
            | {'ttft_ms': ms(statistics.median(firsts)) if streamed else None}
        )
    bare, runtime = rows
    for key in ('median_ms', 'cpu_ms', 'ttft_ms'):
        if bare[key] is not None:
            runtime[f'added_{key}'] = round(runtime[key] - bare[key], 1)
            runtime[f'added_{key.removesuffix("_ms")}_pct'] = round(100 * (runtime[key] - bare[key]) / bare[key], 1)
    return rows


# ---- Per-turn breakdown (issue 20): CPU by part, sessions and statements per turn ---------------------------------

BUDGET = {'cpu_x_bare': 1.3, 'sessions': 10, 'statements': 20}
WITH_HISTORY = 'bare pydantic-ai, the same history in memory'
"""An extra line: the bare agent run with the history the runtime's turn carries (conversations of 4 turns, kept in
memory as `message_history`), so what pydantic-ai itself spends on a history shows apart from the runtime's own work.
The headline ratio (`x bare`) stays against the bare turn without history."""


PERIODIC_KINDS = ('usage rollup',)
"""Sessions that run on a clock, not per turn: the account's usage roll-up runs at most once per 5 s
(`services/post_turn.py`, `DEFAULT_ROLLUP_INTERVAL_S`), whatever the number of turns. Their share per turn is printed
apart (0.02 in this benchmark's sequential turns, less the more turns a second); the sessions target is read on the
turn's own sessions."""


# A session's kind, from its first statement (as in tests/agents/test_turn_budget.py).
SESSION_KINDS = (
    ('SELECT accounts.id', 'turn start'),
    ('WITH swapped AS', 'turn save'),
    ('INSERT INTO llm_requests', 'ledger'),
    ('directory_entries', 'tool call'),
    ('UPDATE conversations SET title', 'summary'),
    ('usage_rolled_up_requests', 'usage rollup'),
    ('pg_advisory_xact_lock_shared($1, $2)', 'usage rollup'),
    ('UPDATE conversation_turns', 'turn check'),
    ('budget_reservations', 'budget hold'),
)


@dataclass
class StatementMeter:
    """Counts pool checkouts (one per session) and statements sent (`before_cursor_execute`) on the engine, and
    sessions by kind (named by their first statement)."""

    sessions: int = 0
    statements: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    _unnamed: set[int] = field(default_factory=set)

    def attach(self) -> StatementMeter:
        engine = get_engine().sync_engine
        event.listen(engine, 'checkout', self._checkout)
        event.listen(engine, 'before_cursor_execute', self._statement)
        return self

    def snapshot(self) -> tuple[int, int]:
        return self.sessions, self.statements

    def _checkout(self, dbapi_connection: Any, *args: Any) -> None:
        self.sessions += 1
        self._unnamed.add(id(dbapi_connection))

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements += 1
        dbapi_connection = id(conn.connection.dbapi_connection)
        if dbapi_connection in self._unnamed:
            self._unnamed.discard(dbapi_connection)
            self.kinds[next((kind for text, kind in SESSION_KINDS if text in statement), 'other')] += 1


def _patched(**replacements: Any) -> contextlib.AbstractContextManager[None]:
    """Replace names in `agentrt.agents.chat_turn` for one turn; names this version does not have are skipped, so the
    breakdown also runs against earlier versions (for the before column)."""
    stack = contextlib.ExitStack()
    for name, value in replacements.items():
        if hasattr(chat_turn, name):
            original = getattr(chat_turn, name)
            setattr(chat_turn, name, value)
            stack.callback(setattr, chat_turn, name, original)
    return stack


def _no_ledger() -> contextlib.AbstractContextManager[None]:
    """The turn's window and guard without a ledger: a turn adds one to an agent that has none (so every turn is
    billed); for this variant it adds the two as they are."""
    try:
        from agentrt.agents.turn_hooks import TurnHooks
    except ImportError:  # pragma: no cover - earlier versions added no ledger to an agent without one
        return contextlib.nullcontext()
    return _patched(turn_hooks=lambda *parts, agent=None: [TurnHooks(parts)])


def _no_post_turn() -> contextlib.AbstractContextManager[None]:
    return _patched(schedule_post_turn_work=lambda *args, **kwargs: [])


def _no_store() -> contextlib.AbstractContextManager[None]:
    """No history: nothing loaded (a new, empty conversation every turn), nothing saved."""

    async def load(store: Any, conversation_id: str, **kwargs: Any) -> Any:
        return RecentConversation(Conversation(conversation_id=conversation_id), None, False)

    async def save(*args: Any, **kwargs: Any) -> Any:
        return SavedTurn([], 0) if SavedTurn is not None else []

    return _patched(load_recent_conversation=load, append_turn=save, save_turn=save)


def _no_claim() -> contextlib.AbstractContextManager[None]:
    """No claim on the conversation and no guard before each request."""

    class Unguarded(AbstractCapability[Any]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

    @contextlib.asynccontextmanager
    async def no_claim(*args: Any, **kwargs: Any) -> AsyncIterator[None]:
        yield None

    replacements: dict[str, Any] = {'TurnGuard': Unguarded, 'conversation_claim': no_claim}
    if TurnClaim is not None:

        class Unclaimed(TurnClaim):  # type: ignore[misc,valid-type]
            async def take(self, *, session: Any) -> None:
                self.acquired = True  # counted as taken: the turn takes no claim of its own

            @contextlib.asynccontextmanager
            async def held(self) -> AsyncIterator[Any]:
                yield self

        replacements['TurnClaim'] = Unclaimed
    if 'claim' in inspect.signature(chat_turn.load_recent_conversation).parameters:
        # The claim rides in the tail load's statement since 7e8878d: the load without it.
        load = chat_turn.load_recent_conversation

        async def unclaimed_load(*args: Any, claim: Any = None, **kwargs: Any) -> Any:
            return await load(*args, **kwargs)

        replacements['load_recent_conversation'] = unclaimed_load
    return _patched(**replacements)


def _no_tenant_lookup(deps: SessionDependencies, known: Any = None) -> contextlib.AbstractContextManager[None]:
    """The tenant known in advance (no lookup query): `known`, what the real lookup found once before the turns."""

    async def dependencies(*args: Any, **kwargs: Any) -> SessionDependencies:
        return deps

    async def tenant(*args: Any, session: Any = None, enter: bool = False, **kwargs: Any) -> Any:
        if enter:  # the transaction goes on as the tenant (row-level security), as the real lookup's statement does
            await enter_account(session, deps.account_id)
        if known is not None:
            return known
        return Tenant(
            deps.account_id,
            deps.account_slug,
            deps.agent_instance_id,
            deps.agent_instance_slug,
            deps.agent_type,
            dict(deps.config),
        )

    async def tenant_on(transaction: Any, *args: Any, enter: bool = False, **kwargs: Any) -> Any:
        if enter and row_security():  # as the real lookup's statement does, on the driver connection
            await transaction.fetch(_ENTER_TENANT, {'account': str(deps.account_id)})
        return await tenant()

    return _patched(load_dependencies=dependencies, lookup_tenant=tenant, lookup_tenant_on=tenant_on)


async def _looked_up_tenant() -> Any:
    """The demo account's tenant as the lookup finds it (whether it has a budget included), for the variant that
    skips the lookup; None for versions without `lookup_tenant_on` (their fake builds one from the dependencies)."""
    if not hasattr(chat_turn, 'lookup_tenant_on'):
        return None
    async with get_db_session(account=Unscoped.TENANT_LOOKUP) as session:
        return await lookup_tenant(MEDICAL_ACCOUNT, None, session=session)


@contextlib.contextmanager
def _commit_delay(milliseconds: float) -> Iterator[None]:
    """The process's ledger tracker with another commit delay (0: each row committed as soon as it is ready, as before
    the delay existed); skipped by versions without it."""
    config = get_request_tracker().config
    if not hasattr(config, 'commit_delay_ms'):
        yield
        return
    previous = set_request_tracker(LLMRequestTracker(replace(config, commit_delay_ms=milliseconds)))
    try:
        yield
    finally:
        set_request_tracker(previous)


async def breakdown(turns: int, prefix: str) -> list[dict]:
    """CPU, sessions and statements per demo turn at 0 ms model latency: bare, the runtime, and the runtime with one
    part turned off at a time; variants interleaved turn by turn, medians of CPU, means of the counts."""
    model = demo_planner_model(0.0)
    bare = bare_directory_agent()
    deps = await bare_dependencies('bench-bare', MEDICAL_ACCOUNT)
    without_ledger = bare_directory_agent()
    # The ledger's id as the runtime's agent has it: the turn's hooks then carry it (one capability, not two).
    without_content = bare_directory_agent([ledger_capability(store_content=False, **LEDGER_ID)])
    runtime_agent = create_simple_chat_agent()
    known_tenant = await _looked_up_tenant()
    variants: dict[str, tuple[Agent[SessionDependencies, str] | str | None, Callable[[], Any]]] = {
        'bare pydantic-ai': (None, contextlib.nullcontext),
        WITH_HISTORY: (WITH_HISTORY, contextlib.nullcontext),
        'runtime': (runtime_agent, contextlib.nullcontext),
        'runtime without the ledger': (without_ledger, _no_ledger),
        'runtime without stored content': (without_content, contextlib.nullcontext),
        'runtime without post-turn work': (runtime_agent, _no_post_turn),
        'runtime without the conversation store': (runtime_agent, _no_store),
        'runtime without claim and guard': (runtime_agent, _no_claim),
        'runtime without the tenant lookup': (runtime_agent, lambda: _no_tenant_lookup(deps, known_tenant)),
        'runtime, ledger commit delay 0': (runtime_agent, lambda: _commit_delay(0)),
    }
    meter = StatementMeter().attach()
    samples: dict[str, list[tuple[float, int, int]]] = {name: [] for name in variants}
    positions: dict[str, list[int]] = {name: [] for name in variants}  # each turn's place in its conversation
    runtime_kinds: Counter[str] = Counter()
    history: list[ModelMessage] = []
    for i in range(turns + 1):  # the first round warms up
        if i % 4 == 0:  # conversations of 4 turns, as the runtime's
            history = []
        for n, (name, (agent, patch)) in enumerate(variants.items()):
            await settle()
            kinds_before = Counter(meter.kinds)
            before, cpu = meter.snapshot(), time.process_time()
            with patch():
                if agent is None:
                    await bare.run(QUESTION, deps=deps, model=model)
                elif agent == WITH_HISTORY:
                    history = (await bare.run(QUESTION, deps=deps, model=model, message_history=history)).all_messages()
                else:
                    session_id = f'{prefix}-b{n}-{i // 4}'
                    await simple_chat(
                        QUESTION, session_id=session_id, account=MEDICAL_ACCOUNT, model=model, agent=agent
                    )
                await settle()
            cpu = time.process_time() - cpu
            after = meter.snapshot()
            if i:
                samples[name].append((cpu, after[0] - before[0], after[1] - before[1]))
                positions[name].append(i % 4)
                if name == 'runtime':
                    runtime_kinds += meter.kinds - kinds_before
    rows = []
    for name, values in samples.items():
        cpus, sessions, statements = zip(*values, strict=True)
        rows.append(
            {
                'variant': name,
                'turns': len(values),
                'cpu_ms': ms(statistics.median(cpus)),
                'sessions_per_turn': round(statistics.fmean(sessions), 2),
                'statements_per_turn': round(statistics.fmean(statements), 2),
            }
        )
    with_history = rows.pop(1)  # an extra line, not a variant of the runtime: the headline ratio stays against bare
    bare_cpu, full_cpu = rows[0]['cpu_ms'], rows[1]['cpu_ms']
    for row in rows:
        row['x_bare'] = round(row['cpu_ms'] / bare_cpu, 2)
        if row['variant'].startswith('runtime without'):
            row['part_cpu_ms'] = round(full_cpu - row['cpu_ms'], 1)
    rows[1]['sessions_by_kind'] = {kind: round(n / turns, 2) for kind, n in runtime_kinds.most_common()}
    periodic = sum(runtime_kinds[kind] for kind in PERIODIC_KINDS) / turns
    rows[1]['periodic_sessions_per_turn'] = round(periodic, 2)
    rows[1]['turn_sessions_per_turn'] = round(rows[1]['sessions_per_turn'] - periodic, 2)
    with_history['x_bare'] = round(with_history['cpu_ms'] / bare_cpu, 2)
    rows[1]['x_bare_with_history'] = round(full_cpu / with_history['cpu_ms'], 2)
    rows[1]['by_position'] = _by_position(samples, positions)
    return [*rows, with_history]


def _by_position(samples: dict[str, list[tuple[float, int, int]]], positions: dict[str, list[int]]) -> dict[str, dict]:
    """The runtime's CPU on a conversation's first turn (no history to carry: the demo chat's one question) and on its
    later turns, against the bare turn and the bare turn carrying the same history, medians of the same run."""

    def cpus_at(name: str, first: bool) -> list[float]:
        return [cpu for (cpu, _, _), at in zip(samples[name], positions[name], strict=True) if (at == 0) == first]

    split = {}
    for label, first in (('first turn', True), ('later turns', False)):
        if not cpus_at('runtime', first):  # too few turns (--quick) to have both
            continue
        bare, history, runtime = (
            statistics.median(cpus_at(name, first)) for name in ('bare pydantic-ai', WITH_HISTORY, 'runtime')
        )
        split[label] = {
            'bare_cpu_ms': ms(bare),
            'bare_with_history_cpu_ms': ms(history),
            'runtime_cpu_ms': ms(runtime),
            'x_bare': round(runtime / bare, 2),
            'x_bare_with_history': round(runtime / history, 2),
        }
    return split


BREAKDOWN_COLUMNS = [
    ('variant (0 ms model latency, plain)', 'variant'), ('CPU ms/turn', 'cpu_ms'), ('x bare', 'x_bare'),
    ('part CPU ms', 'part_cpu_ms'), ('sessions/turn', 'sessions_per_turn'), ('statements/turn', 'statements_per_turn'),
]  # fmt: skip


COLUMNS = [
    ('model ms/request', 'model_latency_ms'), ('mode', 'mode'), ('pattern', 'pattern'), ('median ms', 'median_ms'),
    ('added ms', 'added_median_ms'), ('added %', 'added_median_pct'), ('CPU ms', 'cpu_ms'),
    ('added CPU ms', 'added_cpu_ms'), ('TTFT ms', 'ttft_ms'), ('added TTFT ms', 'added_ttft_ms'),
]  # fmt: skip


def options() -> argparse.Namespace:
    """The command line's options."""
    args = parser(__doc__.splitlines()[0], 'overhead')
    args.add_argument('--latencies', type=float_list, default=[0.0, 0.25])
    args.add_argument('--turns', type=positive_int, default=15, help='measured turns per pattern, mode and latency')
    args.add_argument(
        '--breakdown-turns', type=non_negative_int, default=30, help='measured turns per breakdown variant (0: none)'
    )
    args.add_argument(
        '--loop',
        choices=('asyncio', 'uvloop'),
        default='asyncio',
        help='the event loop both patterns run on (uvloop: what `agentrt serve` runs on; the http extra installs it)',
    )
    return args.parse_args()


async def main(opts: argparse.Namespace) -> None:
    if opts.quick:
        opts.latencies, opts.turns, opts.breakdown_turns = [0.0], 2, 1
    use_temporary_spool()
    await start_database(pool_size=20, max_overflow=10, pool_timeout=10)
    prefix = f'bench-ovh-{uuid.uuid4().hex[:8]}'
    config = {'model_latency_s_per_request': opts.latencies, 'turns': opts.turns, 'model': MODEL_NOTE}
    config |= {'model_requests_per_turn': 3, 'tool_calls_per_turn': 7, 'runtime_conversation_turns': 4}
    config |= {'breakdown_turns': opts.breakdown_turns, 'event_loop': opts.loop}
    try:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await seed_demo_data(session=session)
        machine = await machine_info()
        config['budgets_on_the_account'] = await budgets_on(MEDICAL_ACCOUNT)
        print_config('Benchmark 3: overhead of a runtime turn over a bare pydantic-ai run', config | machine)
        if config['budgets_on_the_account']:
            print(
                f'warning: {MEDICAL_ACCOUNT} has a budget in this database: each model request takes a hold (one more '
                'session and statement), so these figures are not those of the demo turn, and the budget keeps what '
                'the benchmark spends; run with a fresh AGENTRT_DATA_DIR, or remove it '
                f'(`agentrt budget remove --account {MEDICAL_ACCOUNT}`)'
            )
        parts: list[dict] = []
        if opts.breakdown_turns:
            parts = await breakdown(opts.breakdown_turns, prefix)
            print_table(parts, BREAKDOWN_COLUMNS)
            print('runtime sessions per turn, by kind:', parts[1]['sessions_by_kind'])
            print(
                f"runtime sessions per turn: {parts[1]['turn_sessions_per_turn']} the turn's own, "
                f'+ {parts[1]["periodic_sessions_per_turn"]} periodic ({", ".join(PERIODIC_KINDS)}, on a clock)'
            )
            print(f'runtime / bare with the same history in memory: {parts[1]["x_bare_with_history"]}x')
            for label, split in parts[1]['by_position'].items():
                print(
                    f'  {label} of a conversation: runtime {split["runtime_cpu_ms"]} ms, {split["x_bare"]}x bare, '
                    f'{split["x_bare_with_history"]}x bare with the same history'
                )
        before = await count_rows(prefix)
        rows = []
        for latency in opts.latencies:
            for streamed in (False, True):
                rows += await measure(latency, streamed, opts.turns, prefix)
                print(f'  {latency * 1000:.0f} ms/request, {rows[-1]["mode"]}: +{rows[-1]["added_median_ms"]} ms')
        after = await count_rows(prefix)
        print_table(rows, COLUMNS)
        runtime_turns = (opts.turns + 1) * 2 * len(opts.latencies)
        attached = {key: after[key] - before[key] for key in after}
        attached |= {'runtime_turns': runtime_turns, 'model_requests': 3 * runtime_turns}
        target = [r for r in rows if r['pattern'] == 'runtime' and r['model_latency_ms'] == max(opts.latencies) * 1000]
        summary = {'what_was_on': attached, 'ledger_attached': attached['ledger_rows'] > 0}
        summary['ledger_rows_match_requests'] = attached['ledger_rows'] == 3 * runtime_turns
        summary['target_latency_ms_per_request'] = max(opts.latencies) * 1000
        summary['added_pct_at_target'] = {r['mode']: r['added_median_pct'] for r in target}
        summary['target_25_pct_met'] = all(r['added_median_pct'] <= 25 for r in target)
        if parts:
            runtime = parts[1]
            summary['breakdown'] = parts
            summary['runtime_cpu_x_bare'] = runtime['x_bare']
            summary['runtime_cpu_x_bare_with_history'] = runtime['x_bare_with_history']
            summary['runtime_cpu_by_position'] = runtime['by_position']
            summary['runtime_sessions_per_turn'] = runtime['sessions_per_turn']
            summary['runtime_statements_per_turn'] = runtime['statements_per_turn']
            summary['runtime_sessions_by_kind'] = runtime['sessions_by_kind']
            summary['runtime_turn_sessions_per_turn'] = runtime['turn_sessions_per_turn']
            summary['runtime_periodic_sessions_per_turn'] = runtime['periodic_sessions_per_turn']
            summary['budget'] = BUDGET
            summary['budget_met'] = {
                'cpu_x_bare': runtime['x_bare'] <= BUDGET['cpu_x_bare'],
                'sessions': runtime['turn_sessions_per_turn'] <= BUDGET['sessions'],
                'statements': runtime['statements_per_turn'] <= BUDGET['statements'],
            }
        print('summary:', summary)
        write_results(opts.out, 'overhead', config, machine, rows, summary)
    except BudgetExceededError as exc:  # a budget on the account, nearly spent: said in one line, not a traceback (QA)
        raise SystemExit(f'stopped: {exc}') from None
    finally:
        # drain_supervisor: and the usage roll-up still pending, which would race the ledger rows deleted next
        await run_clean_up(settle, drain_supervisor, lambda: delete_conversations(prefix), close_database)


if __name__ == '__main__':
    chosen = options()
    if chosen.loop == 'uvloop':
        import uvloop

        run_benchmark(lambda: uvloop.run(main(chosen)))
    else:
        run_benchmark(lambda: asyncio.run(main(chosen)))
