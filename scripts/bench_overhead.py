"""Benchmark 3: runtime overhead. A bare pydantic-ai run against a full runtime turn, same agent, model and tools.

Bare: the directory agent (same instructions and toolset, no capabilities) run with `agent.run` /
`run_stream_events`, dependencies built once beforehand. Runtime: `simple_chat` / `simple_chat_stream` with
everything the runtime attaches (tenant lookup, conversation history loaded and saved, the ledger and its stored
content if attached, background post-turn work). The model is the demo planner (3 requests, 7 tool calls per turn)
with a fixed simulated latency per request. Turns alternate bare/runtime so machine noise hits both alike; reported:
median latency, CPU per turn (time.process_time, deferred ledger/background work included), time to first token.

Run (embedded PostgreSQL unless DATABASE_URL is set):
    .venv/bin/python scripts/bench_overhead.py [--latencies 0,0.25] [--turns 15]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid

from bench_common import (
    bare_directory_agent,
    demo_planner_model,
    is_text_delta,
    machine_info,
    ms,
    parser,
    print_config,
    print_table,
    start_database,
    write_results,
)
from pydantic_ai import Agent
from pydantic_ai.models import Model
from sqlalchemy import text

from agentrt.agents.simple_chat import load_dependencies, simple_chat, simple_chat_stream
from agentrt.db.engine import close_database
from agentrt.db.session import get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.conversations import PostgresConversationStore
from agentrt.services.demo_data import MEDICAL_ACCOUNT, seed_demo_data
from agentrt.services.ledger import get_request_tracker
from agentrt.tools.dependencies import SessionDependencies

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
    async with get_db_session() as session:
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
    store = PostgresConversationStore((await load_dependencies('cleanup', MEDICAL_ACCOUNT, None)).account_id)
    async with get_db_session() as session:
        ids = list((await session.execute(CONVERSATIONS, {'p': f'{prefix}-%'})).scalars())
        await session.execute(text('DELETE FROM llm_requests WHERE chat_session_id LIKE :p'), {'p': f'{prefix}-%'})
    for conversation_id in ids:
        if (record := await store.read_record(conversation_id)) is not None:
            await store.delete_record(conversation_id, expected_revision=record.revision)


async def measure(latency: float, streamed: bool, turns: int, prefix: str) -> list[dict]:
    """`turns` bare and `turns` runtime turns, alternating; conversations of 4 turns for the runtime."""
    model = demo_planner_model(latency)
    agent = bare_directory_agent()
    deps = await load_dependencies('bench-bare', MEDICAL_ACCOUNT, None)
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


COLUMNS = [
    ('model ms/request', 'model_latency_ms'), ('mode', 'mode'), ('pattern', 'pattern'), ('median ms', 'median_ms'),
    ('added ms', 'added_median_ms'), ('added %', 'added_median_pct'), ('CPU ms', 'cpu_ms'),
    ('added CPU ms', 'added_cpu_ms'), ('TTFT ms', 'ttft_ms'), ('added TTFT ms', 'added_ttft_ms'),
]  # fmt: skip


async def main() -> None:
    args = parser(__doc__.splitlines()[0], 'overhead')
    args.add_argument('--latencies', type=lambda v: [float(x) for x in v.split(',')], default=[0.0, 0.25])
    args.add_argument('--turns', type=int, default=15, help='measured turns per pattern, mode and latency')
    opts = args.parse_args()
    if opts.quick:
        opts.latencies, opts.turns = [0.0], 2
    os.environ.setdefault('AGENTRT_LEDGER_SPOOL', str(tempfile.mkdtemp(prefix='bench-spool-')) + '/ledger.jsonl')
    await start_database(pool_size=20, max_overflow=10, pool_timeout=10)
    prefix = f'bench-ovh-{uuid.uuid4().hex[:8]}'
    config = {'model_latency_s_per_request': opts.latencies, 'turns': opts.turns, 'model': MODEL_NOTE}
    config |= {'model_requests_per_turn': 3, 'tool_calls_per_turn': 7, 'runtime_conversation_turns': 4}
    try:
        async with get_db_session() as session:
            await seed_demo_data(session=session)
        machine = await machine_info()
        print_config('Benchmark 3: overhead of a runtime turn over a bare pydantic-ai run', config | machine)
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
        print('summary:', summary)
        write_results(opts.out, 'overhead', config, machine, rows, summary)
    finally:
        await settle()
        await delete_conversations(prefix)
        await close_database()


if __name__ == '__main__':
    asyncio.run(main())
