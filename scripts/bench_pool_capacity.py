"""Benchmark 2: pool capacity. C concurrent chats, 1 s model latency, 3 tools per turn, pool 20 + overflow 10.

Side by side at each C: the runtime pattern (a session per operation: load, each tool, save; none held across a
model call) against the request-scoped pattern (one session opened for the whole turn, as a web framework dependency
would, used by the tools under a lock), both a stripped turn (no ledger, history or post-turn work); and the
product: `simple_chat` with the demo planner (3 model requests of 1 s each, 7 tool calls with real directory
searches, the conversation claimed, loaded and saved, ledger rows with stored content, post-turn work), the row the
capacity target is read on. Each chat runs turns back to back for a window; reported: completed turns/s, p50/p95
latency, pool timeouts (sqlalchemy TimeoutError), `simple_chat` turns refused after waiting for admission
(`busy`: RuntimeBusyError, AGENTRT_TURN_QUEUE_SECONDS), peak connections checked out, and connection-seconds held
per turn against the database's own busy time (pg_stat_database.active_time). AGENTRT_TURN_ADMISSION_LAG_MS=0 in the
environment runs `simple_chat` without admission, for comparison.

Run (embedded PostgreSQL unless DATABASE_URL is set):
    .venv/bin/python scripts/bench_pool_capacity.py [--chats 25,50,100,200,400] [--window 5] [--pool-timeout 5]
        [--patterns runtime,request-scoped,simple_chat]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench_common import (
    PoolMeter,
    closed_loop,
    delete_chats,
    demo_planner_model,
    int_list,
    machine_info,
    ms,
    non_negative_float,
    parser,
    percentile,
    positive_float,
    print_config,
    print_table,
    run_benchmark,
    run_clean_up,
    scripted_model,
    server_busy_s,
    start_database,
    use_temporary_spool,
    warm_pool,
    write_results,
)
from pydantic_ai import Agent, RunContext
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.agents.simple_chat import simple_chat
from agentrt.db.engine import close_database
from agentrt.db.errors import BudgetExceededError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import drain_supervisor, get_supervisor
from agentrt.services.demo_data import MEDICAL_ACCOUNT, seed_demo_data
from agentrt.services.ledger import get_request_tracker

TOOL_QUERY = text('SELECT pg_sleep(:s)')
LOAD = text('SELECT count(*) FROM bench_turns WHERE chat = :c')
SAVE = text('INSERT INTO bench_turns (chat) VALUES (:c)')
tool_s = 0.01


@dataclass
class ScopedDeps:
    session: AsyncSession
    lock: asyncio.Lock  # one AsyncSession must never be used by two tasks at once


async def lookup(n: int) -> int:
    """The runtime's tool: its own session, back to the pool when it returns."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(TOOL_QUERY, {'s': tool_s})
    return n


async def scoped_lookup(ctx: RunContext[ScopedDeps], n: int) -> int:
    """The request-scoped tool: the turn's session, one call at a time."""
    async with ctx.deps.lock:
        await ctx.deps.session.execute(TOOL_QUERY, {'s': tool_s})
    return n


async def runtime_turn(agent: Agent, chat: str) -> None:
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(LOAD, {'c': chat})
    await agent.run('go')
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(SAVE, {'c': chat})


async def scoped_turn(agent: Agent, chat: str) -> None:
    async with get_db_session(account=Unscoped.OWNER) as session:  # what `Depends(get_db)` gives a request handler
        await session.execute(LOAD, {'c': chat})
        await agent.run('go', deps=ScopedDeps(session, asyncio.Lock()))
        await session.execute(SAVE, {'c': chat})


QUESTION = 'Find me cardiologists in Seattle who accept Medicare'
CHAT_PREFIX = f'bench-pool-{uuid.uuid4().hex[:8]}'


def simple_chat_turn(model: Any) -> Callable[[Any, str], Awaitable[None]]:
    """The product's turn: `simple_chat` on the chat's own conversation, with the demo planner."""

    async def turn(agent: Any, chat: str) -> None:
        await simple_chat(QUESTION, session_id=f'{CHAT_PREFIX}-{chat}', account=MEDICAL_ACCOUNT, model=model)

    return turn


async def run_level(
    pattern: str, turn: Callable[[Any, str], Awaitable[None]], agent: Any, chats: int, window: float, spread: float,
    meter: PoolMeter,
) -> dict:  # fmt: skip
    """`chats` chats run turns back to back for `window` s, starting at random within the first `spread` s."""
    before = await server_busy_s()
    await warm_pool(20)  # the pool keeps pool_size idle connections; overflow ones are closed on return
    meter.reset()
    run = await closed_loop(chats, window, lambda i: turn(agent, f'{pattern}-{chats}-{i}'), spread=spread)
    if pattern == 'simple_chat':  # what the turns deferred (ledger contents, post-turn work) is part of their cost
        await get_request_tracker().flush()
        await get_supervisor().join()
        run.cpu_s = time.process_time() - run.cpu_started
    held, peak = meter.held_s, meter.peak
    after = await server_busy_s()
    done = max(len(run.latencies), 1)
    busy, idle = (after[k] - before[k] for k in ('active_s', 'idle_in_transaction_s'))
    return {
        'pattern': pattern,
        'chats': chats,
        'completed': len(run.latencies),
        'turns_per_s': round(len(run.latencies) / run.elapsed_s, 1),
        'p50_ms': ms(percentile(run.latencies, 50)),
        'p95_ms': ms(percentile(run.latencies, 95)),
        'pool_timeouts': run.failures.pop('pool_timeout', 0),
        'busy': run.failures.pop('RuntimeBusyError', 0),  # waited AGENTRT_TURN_QUEUE_SECONDS for admission
        'other_errors': dict(run.failures),
        'peak_checked_out': peak,
        'held_s_per_turn': round(held / done, 3),
        'db_active_s_per_turn': round(busy / done, 4),
        'db_idle_in_tx_s_per_turn': round(idle / done, 3),
        'cpu_ms_per_turn': ms(run.cpu_s / done),
        'loop_lag_p95_ms': ms(run.loop_lag_p95_s),
        'elapsed_s': round(run.elapsed_s, 1),
    }


COLUMNS = [
    ('pattern', 'pattern'), ('C', 'chats'), ('turns', 'completed'), ('turns/s', 'turns_per_s'), ('p50 ms', 'p50_ms'),
    ('p95 ms', 'p95_ms'), ('pool timeouts', 'pool_timeouts'), ('busy', 'busy'),
    ('other errors', lambda r: sum(r['other_errors'].values())), ('peak conns', 'peak_checked_out'),
    ('held s/turn', 'held_s_per_turn'), ('db busy s/turn', 'db_active_s_per_turn'),
    ('idle-in-tx s/turn', 'db_idle_in_tx_s_per_turn'), ('CPU ms/turn', 'cpu_ms_per_turn'),
    ('loop lag p95 ms', 'loop_lag_p95_ms'),
]  # fmt: skip


def sustained(rows: list[dict], pattern: str, max_p95_ms: float = float('inf')) -> int:
    """The largest C with no pool timeout, no other error, and p95 latency within `max_p95_ms`."""
    ok = [r for r in rows if r['pattern'] == pattern and r['completed'] and not r['pool_timeouts'] and not r['busy']]
    return max([r['chats'] for r in ok if not r['other_errors'] and r['p95_ms'] <= max_p95_ms], default=0)


def ratio(best: dict[str, int]) -> float | None:
    """Runtime chats over request-scoped chats (None when request-scoped sustained no level)."""
    return round(best['runtime'] / best['request-scoped'], 1) if best['request-scoped'] else None


PATTERNS = ('runtime', 'request-scoped', 'simple_chat')


def pattern_list(value: str) -> list[str]:
    """`--patterns`: names among `PATTERNS`, comma-separated, at least one (an argparse type; an unknown one was a
    KeyError after the database had started, QA)."""
    names = [name.strip() for name in value.split(',') if name.strip()]
    unknown = [name for name in names if name not in PATTERNS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f'{value!r}: give one or more of {", ".join(PATTERNS)}')
    return names


async def main() -> None:
    global tool_s
    args = parser(__doc__.splitlines()[0], 'pool_capacity')
    args.add_argument('--chats', type=int_list, default=[25, 50, 100, 200, 400], help='concurrent chats per level')
    args.add_argument(
        '--window', type=positive_float, default=5.0, help='seconds during which each chat starts new turns'
    )
    args.add_argument('--model-latency', type=non_negative_float, default=1.0, help='seconds per model request')
    args.add_argument(
        '--pool-timeout', type=positive_float, default=5.0, help='seconds to wait for a pooled connection'
    )
    args.add_argument(
        '--patterns',
        type=pattern_list,
        default=['runtime', 'request-scoped', 'simple_chat'],
        help='which of runtime, request-scoped, simple_chat to run',
    )
    opts = args.parse_args()
    if opts.quick:
        opts.chats, opts.window, opts.model_latency, opts.pool_timeout = [4], 0.2, 0.02, 2.0
    use_temporary_spool()
    tool_s = 0.01 if not opts.quick else 0.001
    config = {'chats': opts.chats, 'window_s': opts.window, 'model_latency_s': opts.model_latency}
    config |= {'tools_per_turn': 3, 'tool_db_time_ms': tool_s * 1000, 'model_requests_per_turn': 2}
    config |= {'pool_size': 20, 'max_overflow': 10, 'pool_timeout_s': opts.pool_timeout, 'patterns': opts.patterns}
    config |= {'simple_chat_turn': 'demo planner: 3 model requests of model_latency_s each, 7 tool calls'}
    await start_database(pool_size=20, max_overflow=10, pool_timeout=opts.pool_timeout)
    try:
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text('CREATE TABLE IF NOT EXISTS bench_turns (id bigserial PRIMARY KEY, chat text)'))
            await session.execute(text('CREATE INDEX IF NOT EXISTS bench_turns_chat ON bench_turns (chat)'))
            await seed_demo_data(session=session)
        machine = await machine_info()
        print_config('Benchmark 2: pool capacity, runtime vs request-scoped session', config | machine)
        meter = PoolMeter().attach()
        model = scripted_model('lookup', 3, latency=opts.model_latency)
        agents: dict[str, tuple[Callable[[Any, str], Awaitable[None]], Any]] = {
            'runtime': (runtime_turn, Agent(model, tools=[lookup])),
            'request-scoped': (
                scoped_turn,
                Agent(
                    scripted_model('scoped_lookup', 3, latency=opts.model_latency),
                    deps_type=ScopedDeps,
                    tools=[scoped_lookup],
                ),
            ),
            'simple_chat': (simple_chat_turn(demo_planner_model(opts.model_latency)), None),
        }
        agents = {name: agents[name] for name in opts.patterns}
        alone: dict[str, float] = {}
        for pattern, (turn, agent) in agents.items():
            times = []
            for _ in range(3):  # a turn with nothing else running: the first warms up, the best of the rest counts
                started = time.perf_counter()
                await turn(agent, 'baseline')
                times.append(time.perf_counter() - started)
            alone[pattern] = min(times[1:])
        rows = []
        for chats in opts.chats:
            for pattern, (turn, agent) in agents.items():
                row = await run_level(pattern, turn, agent, chats, opts.window, alone[pattern], meter)
                rows.append(row)
                print(f'  {pattern} C={chats}: {row["completed"]} turns, {row["pool_timeouts"]} pool timeouts')
        print_table(rows, COLUMNS)
        no_timeouts = {p: sustained(rows, p) for p in agents}
        fast = {p: sustained(rows, p, 1500 * alone[p]) for p in agents}
        summary: dict[str, Any] = {'turn_alone_ms': {p: ms(t) for p, t in alone.items()}}
        summary['max_chats_without_pool_timeouts'] = no_timeouts
        summary['max_chats_with_p95_within_1_5x_alone'] = fast
        if 'runtime' in agents and 'request-scoped' in agents:
            summary['ratio_without_pool_timeouts'] = ratio(no_timeouts)
            summary['ratio_with_p95_within_1_5x'] = ratio(fast)
            summary['target_5x_with_0_timeouts'] = (summary['ratio_without_pool_timeouts'] or 0) >= 5
        if 'simple_chat' in agents:
            largest = max(opts.chats)
            at_largest = [r for r in rows if r['pattern'] == 'simple_chat' and r['chats'] == largest]
            summary['simple_chat_pool_timeouts_at_largest'] = {largest: at_largest[0]['pool_timeouts']}
            summary['simple_chat_busy_at_largest'] = {largest: at_largest[0]['busy']}
            summary['target_simple_chat_0_timeouts_at_400'] = largest >= 400 and at_largest[0]['pool_timeouts'] == 0
        print('summary:', summary)
        write_results(opts.out, 'pool_capacity', config, machine, rows, summary)
    except BudgetExceededError as exc:  # a budget on the account, nearly spent: said in one line, not a traceback
        raise SystemExit(f'stopped: {exc}') from None
    finally:
        # drain_supervisor: and the usage roll-up still pending. The table dropped here, not at the end of the try:
        # SIGTERM, Ctrl-C, a budget's refusal or an unwritable --out left it.
        tracker = get_request_tracker()
        await run_clean_up(
            tracker.flush, drain_supervisor, lambda: delete_chats(CHAT_PREFIX), drop_table, close_database
        )


async def drop_table() -> None:
    """Drop the table the request-scoped pattern's turns write to."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text('DROP TABLE IF EXISTS bench_turns'))


if __name__ == '__main__':
    run_benchmark(lambda: asyncio.run(main()))
