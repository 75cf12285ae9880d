"""Benchmark 6: stored content. What the ledger's stored prompts cost per turn, and whether a hostile message stalls.

Part 1, CPU per demo turn: the bare directory agent with the demo planner (3 model requests, 7 tool calls) at 0 ms
model latency, run without the ledger, with ledger rows only (`store_content=False`) and with rows and content;
turns alternate. CPU is `time.process_time()` (every thread) from the start of the turn until the ledger has
flushed; sessions are pool checkouts. Reported: median CPU per turn, what the ledger and its content add, and
ledger sessions per turn.

Part 2, run length: a scripted run of N model requests (one tool call each, a 2 KB tool result), ledger rows only
against rows and content. The content's CPU per request must not grow with N (before issue 20 item 4 it did:
request N serialised and redacted all N - 1 earlier messages again).

Part 3, loop lag: W workers run `simple_chat` demo turns back to back (model latency --latency s per request)
while a probe sleeps 1 ms at a time and records how late it wakes. Phase `quiet`: --quiet s of that load alone.
Phase `hostile`: from the moment one more `simple_chat` turn sends a 1 MB hostile message (the slowest input
family of bench_redaction.py) until that turn has returned (its ledger rows and contents stored) and its title and
summary are written; repeated --hostile-runs times. Reported per phase: loop lag p99 and max (target p99 < 50 ms),
and the latency of the other workers' turns.

Run (embedded PostgreSQL unless DATABASE_URL is set):
    .venv/bin/python scripts/bench_ledger_content.py [--turns 30] [--lengths 3,10,30] [--workers 4] [--latency 0.1]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from bench_common import (
    PoolMeter,
    bare_dependencies,
    bare_directory_agent,
    delete_ledger_rows,
    demo_planner_model,
    int_list,
    machine_info,
    ms,
    non_negative_float,
    parser,
    percentile,
    positive_float,
    positive_int,
    print_config,
    print_table,
    run_benchmark,
    run_clean_up,
    start_database,
    use_temporary_spool,
    write_results,
)
from bench_overhead import delete_conversations
from bench_redaction import FAMILIES
from pydantic_ai import Agent, ModelResponse, RequestUsage, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from sqlalchemy import text

from agentrt.agents.simple_chat import simple_chat
from agentrt.db.engine import close_database
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.demo_data import MEDICAL_ACCOUNT, seed_demo_data
from agentrt.services.ledger import get_request_tracker, ledger_capability

QUESTION = 'Find me cardiologists in Seattle who accept Medicare'
HOSTILE_FAMILY = 'password: Ab1 repeated (accepted)'
TOOL_RESULT = (
    'Dr. Priya Morgan (#481): Cardiology, Seattle, accepts Medicare; office hours Mon-Thu 8-16; '
    'notes: uses the portal at https://portal.example.com/login?next=/home, api_key=Zq8fK2mP9xW4vL7nR3tY.\n'
) * 12  # about 2 KB, with one secret to redact


async def settle() -> None:
    """Wait for deferred work: ledger rows and contents, background tasks."""
    await get_request_tracker().flush()
    await get_supervisor().join()


# --- part 1: CPU per demo turn ----------------------------------------------------------------------------------

PATTERNS: dict[str, list[Any]] = {
    'no ledger': [],
    'ledger rows': [lambda: ledger_capability(store_content=False)],
    'ledger rows + content': [lambda: ledger_capability()],
}


async def cpu_per_turn(turns: int, meter: PoolMeter) -> list[dict[str, Any]]:
    agent = bare_directory_agent()
    model = demo_planner_model(0.0)
    deps = await bare_dependencies('bench-ledger-content', MEDICAL_ACCOUNT)
    tracker = get_request_tracker()
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in PATTERNS}
    for i in range(turns + 1):  # the first round warms up
        for name, capabilities in PATTERNS.items():
            await settle()
            meter.reset()
            cpu = time.process_time()
            await agent.run(QUESTION, deps=deps, model=model, capabilities=[make() for make in capabilities])
            await tracker.flush()
            if i:
                samples[name].append((time.process_time() - cpu, meter.checkouts))
    rows = []
    base_cpu = statistics.median(c for c, _ in samples['no ledger'])
    base_sessions = statistics.fmean(s for _, s in samples['no ledger'])
    for name, values in samples.items():
        cpu = statistics.median(c for c, _ in values)
        sessions = statistics.fmean(s for _, s in values)
        rows.append({
            'part': 'demo turn', 'pattern': name, 'turns': turns, 'cpu_ms': ms(cpu), 'added_cpu_ms': ms(cpu - base_cpu),
            'ledger_sessions_per_turn': round(sessions - base_sessions, 2),
        })  # fmt: skip
    return rows


# --- part 2: run length -------------------------------------------------------------------------------------------


def long_run_agent(requests: int) -> Agent[None, str]:
    """A run of `requests` model requests: one tool call per request, then the answer."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        done = sum(isinstance(p, ToolReturnPart) for m in messages for p in m.parts)
        if done >= requests - 1:
            return ModelResponse(parts=[TextPart(f'looked up {done} entries')])
        return ModelResponse(parts=[ToolCallPart('lookup', {'entry': done + 1}, tool_call_id=f'c{done}')])

    agent: Agent[None, str] = Agent(FunctionModel(respond, model_name='gpt-4o-mini'), instructions=QUESTION)

    @agent.tool_plain
    def lookup(entry: int) -> str:
        return f'entry {entry}:\n{TOOL_RESULT}'

    return agent


async def cpu_by_run_length(lengths: list[int], turns: int) -> list[dict[str, Any]]:
    tracker = get_request_tracker()
    rows = []
    for requests in lengths:
        agent = long_run_agent(requests)
        samples: dict[str, list[float]] = {'ledger rows': [], 'ledger rows + content': []}
        for i in range(turns + 1):
            for name in samples:
                await settle()
                cpu = time.process_time()
                await agent.run('go', capabilities=[make() for make in PATTERNS[name]])
                await tracker.flush()
                if i:
                    samples[name].append(time.process_time() - cpu)
        rows_only = statistics.median(samples['ledger rows'])
        with_content = statistics.median(samples['ledger rows + content'])
        rows.append({
            'part': 'run length', 'pattern': f'{requests} requests', 'turns': turns, 'cpu_ms': ms(with_content),
            'content_cpu_ms': ms(with_content - rows_only),
            'content_cpu_ms_per_request': round((with_content - rows_only) * 1000 / requests, 2),
        })  # fmt: skip
    return rows


# --- part 3: loop lag with a hostile message -----------------------------------------------------------------------


def echo_model() -> FunctionModel:
    """Answers at once, quoting the start of the message. It reports its usage, as a provider does: FunctionModel's
    own estimate splits the whole message into words on the event loop, which is not what is measured here."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        answer = 'You sent a long message; it starts with: ' + _prompt(messages)[:60]
        return ModelResponse(parts=[TextPart(answer)], usage=RequestUsage(input_tokens=250_000, output_tokens=20))

    return FunctionModel(respond, model_name='gpt-4o-mini')


def _prompt(messages: list[ModelMessage]) -> str:
    for part in messages[-1].parts:
        content = getattr(part, 'content', None)
        if isinstance(content, str):
            return content
    return ''


class LagProbe:
    """Sleeps 1 ms at a time and records (when, how late) for every wake-up."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            begin = time.perf_counter()
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.samples.append((now, now - begin - 0.001))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def between(self, start: float, end: float) -> list[float]:
        return [lag for when, lag in self.samples if start <= when <= end]


async def title_written(session_id: str, wait_s: float = 30.0) -> None:
    """Wait until the conversation's summary reflects its head (post-turn work done)."""
    query = text(
        'SELECT head_id IS NOT NULL AND summary_head_id = head_id FROM conversations WHERE conversation_id = :c'
    )
    deadline = time.perf_counter() + wait_s
    while time.perf_counter() < deadline:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            if (await session.execute(query, {'c': session_id})).scalar():
                return
        await asyncio.sleep(0.02)


async def loop_lag(workers: int, latency: float, quiet: float, hostile_runs: int, size: int, prefix: str) -> list[dict]:
    model = demo_planner_model(latency)
    hostile_text = FAMILIES[HOSTILE_FAMILY](size)
    turns: list[tuple[float, float]] = []
    stop = asyncio.Event()

    async def worker(i: int) -> None:
        n = 0
        while not stop.is_set():
            begin = time.perf_counter()
            await simple_chat(QUESTION, session_id=f'{prefix}-w{i}-{n // 4}', account=MEDICAL_ACCOUNT, model=model)
            turns.append((begin, time.perf_counter()))
            n += 1

    probe = LagProbe()
    probe.start()
    tasks = [asyncio.create_task(worker(i)) for i in range(workers)]
    phases: list[tuple[str, float, float, float | None]] = []
    try:
        await asyncio.sleep(min(1.0, quiet))  # warm-up
        start = time.perf_counter()
        await asyncio.sleep(quiet)
        phases.append(('quiet', start, time.perf_counter(), None))
        for run in range(hostile_runs):
            session_id = f'{prefix}-hostile-{run}'
            start = time.perf_counter()
            await simple_chat(hostile_text, session_id=session_id, account=MEDICAL_ACCOUNT, model=echo_model())
            returned = time.perf_counter()
            await title_written(session_id)
            phases.append(('hostile', start, time.perf_counter(), returned - start))
            await asyncio.sleep(min(0.5, quiet))
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        probe.stop()
    rows = []
    for name in ('quiet', 'hostile'):
        spans = [(s, e) for n, s, e, _ in phases if n == name]
        lags = [lag for s, e in spans for lag in probe.between(s, e)]
        durations = [end - begin for begin, end in turns if any(begin < e and end > s for s, e in spans)]
        hostile_turns = [d for n, _, _, d in phases if n == name and d is not None]
        rows.append({
            'part': 'loop lag', 'pattern': name, 'workers': workers, 'phases': len(spans),
            'seconds': round(sum(e - s for s, e in spans), 2), 'lag_samples': len(lags),
            'lag_p99_ms': ms(percentile(lags, 99)), 'lag_max_ms': ms(max(lags, default=None)),
            'other_turns': len(durations), 'other_turn_p50_ms': ms(percentile(durations, 50)),
            'other_turn_p99_ms': ms(percentile(durations, 99)),
            'hostile_turn_ms': ms(statistics.median(hostile_turns)) if hostile_turns else None,
        })  # fmt: skip
    return rows


async def delete_rows(prefix: str, since: datetime) -> None:
    """Remove what this run stored: its conversations and ledger rows (parts 1 and 2 have no conversation)."""
    await delete_conversations(prefix)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await delete_ledger_rows(
            session,
            "r.started_at >= :since AND (r.chat_session_id IS NULL OR r.chat_session_id = 'bench-ledger-content')",
            {'since': since},
        )


COLUMNS = [
    ('part', 'part'), ('pattern', 'pattern'), ('CPU ms', 'cpu_ms'), ('added CPU ms', 'added_cpu_ms'),
    ('ledger sessions', 'ledger_sessions_per_turn'), ('content CPU ms', 'content_cpu_ms'),
    ('content ms/request', 'content_cpu_ms_per_request'),
]  # fmt: skip
LAG_COLUMNS = [
    ('phase', 'pattern'), ('s', 'seconds'), ('lag p99 ms', 'lag_p99_ms'), ('lag max ms', 'lag_max_ms'),
    ('other turns', 'other_turns'), ('their p50 ms', 'other_turn_p50_ms'), ('their p99 ms', 'other_turn_p99_ms'),
    ('hostile turn ms', 'hostile_turn_ms'),
]  # fmt: skip


async def main() -> None:
    args = parser(__doc__.splitlines()[0], 'bench_ledger_content')
    args.add_argument('--turns', type=positive_int, default=30, help='measured turns per pattern (parts 1 and 2)')
    args.add_argument('--lengths', type=int_list, default=[3, 10, 30])
    args.add_argument('--workers', type=positive_int, default=4, help='concurrent simple_chat workers (part 3)')
    args.add_argument('--latency', type=non_negative_float, default=0.1, help='model latency per request in part 3 (s)')
    args.add_argument('--quiet', type=positive_float, default=3.0, help='seconds of load without the hostile message')
    args.add_argument('--hostile-runs', type=positive_int, default=3)
    args.add_argument('--size', type=positive_int, default=1_000_000, help='characters of the hostile message')
    opts = args.parse_args()
    if opts.quick:
        opts.turns, opts.lengths, opts.workers, opts.quiet, opts.hostile_runs, opts.size = 2, [3], 2, 0.2, 1, 20_000
    use_temporary_spool()
    # The chat's input limits (message size, context and tokens per turn) refuse a 1 MB message by default; this
    # benchmark is about storing one, so they are raised for this process (settings that do not exist are ignored).
    os.environ.setdefault('AGENTRT_MESSAGE_MAX_CHARS', str(2 * opts.size))
    os.environ.setdefault('AGENTRT_CONTEXT_MAX_TOKENS', str(2 * opts.size))
    os.environ.setdefault('AGENTRT_TURN_TOTAL_TOKENS_LIMIT', str(max(10 * opts.size, 1_000_000)))  # echo: 250,000 in
    await start_database(pool_size=20, max_overflow=10, pool_timeout=10)
    prefix = f'bench-lc-{uuid.uuid4().hex[:8]}'
    since = datetime.now(UTC)
    config = {
        'turns': opts.turns, 'run_lengths': opts.lengths, 'workers': opts.workers, 'latency_s': opts.latency,
        'quiet_s': opts.quiet, 'hostile_runs': opts.hostile_runs, 'hostile_chars': opts.size,
        'hostile_family': HOSTILE_FAMILY,
    }  # fmt: skip
    try:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await seed_demo_data(session=session)
        machine = await machine_info()
        print_config('Benchmark 6: stored content (ledger CPU per turn, loop lag, hostile message)', config | machine)
        meter = PoolMeter().attach()
        rows = await cpu_per_turn(opts.turns, meter)
        rows += await cpu_by_run_length(opts.lengths, max(opts.turns // 3, 2))
        print_table(rows, COLUMNS)
        lag_rows = await loop_lag(opts.workers, opts.latency, opts.quiet, opts.hostile_runs, opts.size, prefix)
        print_table(lag_rows, LAG_COLUMNS)
        by_pattern = {row['pattern']: row for row in rows}
        hostile = next(row for row in lag_rows if row['pattern'] == 'hostile')
        summary = {
            'ledger_added_cpu_ms_per_demo_turn': by_pattern['ledger rows + content']['added_cpu_ms'],
            'content_cpu_ms_per_demo_turn': ms(
                (by_pattern['ledger rows + content']['cpu_ms'] - by_pattern['ledger rows']['cpu_ms']) / 1000
            ),
            'ledger_sessions_per_demo_turn': by_pattern['ledger rows + content']['ledger_sessions_per_turn'],
            'content_ms_per_request_by_run_length': {
                row['pattern']: row['content_cpu_ms_per_request'] for row in rows if row['part'] == 'run length'
            },
            'hostile_lag_p99_ms': hostile['lag_p99_ms'],
            'hostile_lag_p99_target_50_ms_met': (hostile['lag_p99_ms'] or 0) < 50,
        }
        print('summary:', summary)
        write_results(opts.out, 'bench_ledger_content', config, machine, rows + lag_rows, summary)
    finally:
        await run_clean_up(settle, lambda: delete_rows(prefix, since), close_database)


if __name__ == '__main__':
    run_benchmark(lambda: asyncio.run(main()))
