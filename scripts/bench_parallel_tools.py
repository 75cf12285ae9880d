"""Benchmark 1: N tool calls in one model response, each spending a fixed time in PostgreSQL (`pg_sleep`).

Side by side in one run, for N = 1, 2, 4, 8, 16: the runtime's pattern (each tool opens its own session, pydantic-ai
runs the calls in parallel), the same tools run sequentially, and the ideal (the slowest tool, measured alone); then
the legacy pattern (one AsyncSession shared through deps, on an engine with `pool_pre_ping=True` as legacy apps
commonly configure it) at each N: failed turns and errors.

Run (embedded PostgreSQL unless DATABASE_URL is set):
    .venv/bin/python scripts/bench_parallel_tools.py [--tools 1,2,4,8,16] [--repeats 5] [--sleep-ms 100]
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time

from bench_common import (
    int_list,
    legacy_engine,
    machine_info,
    ms,
    parser,
    positive_float,
    positive_int,
    print_config,
    print_table,
    root_cause,
    run_benchmark,
    scripted_model,
    start_database,
    write_results,
)
from pydantic_ai import Agent, RunContext
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agentrt.db.engine import close_database
from agentrt.db.session import Unscoped, get_db_session

durations: list[float] = []  # each tool call's own time: session opened, pg_sleep, committed, closed
tool_errors: list[int] = []  # legacy tool calls that raised
sleep_s = 0.1


async def own_session_tool(n: int) -> int:
    """The runtime's pattern: this call's own session, back to the pool when it returns."""
    started = time.perf_counter()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(text('SELECT pg_sleep(:s)'), {'s': sleep_s})
    durations.append(time.perf_counter() - started)
    return n


async def shared_session_tool(ctx: RunContext[AsyncSession], n: int) -> int:
    """The legacy pattern: the one session in deps, used by every concurrent call."""
    try:
        await ctx.deps.execute(text('SELECT pg_sleep(:s)'), {'s': sleep_s})
    except Exception:
        tool_errors.append(n)  # pydantic-ai then fails the run and cancels the sibling calls
        raise
    return n


async def measure(agent: Agent, *, sequential: bool) -> tuple[float, float, float]:
    """One turn: its wall time, its slowest tool call and the CPU time this process spent on it."""
    durations.clear()
    started, cpu = time.perf_counter(), time.process_time()
    if sequential:
        with Agent.parallel_tool_call_execution_mode('sequential'):
            await agent.run('go')
    else:
        await agent.run('go')
    return time.perf_counter() - started, max(durations), time.process_time() - cpu


async def legacy(n: int, repeats: int) -> dict[str, object]:
    """Run the shared-session pattern `repeats` times; count failed turns, failed closes and leaked connections."""
    agent = Agent(scripted_model('shared_session_tool', n), deps_type=AsyncSession, tools=[shared_session_tool])
    failed, close_errors, leaked, kinds = 0, 0, 0, set()
    tool_errors.clear()
    engine = legacy_engine()
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    for _ in range(repeats):
        session = sessions()
        try:
            await agent.run('go', deps=session)
            await session.commit()
        except Exception as exc:
            failed += 1
            kinds.add(type(root_cause(exc)).__name__)
        try:
            await session.close()
        except Exception as exc:
            close_errors += 1
            kinds.add(type(exc).__name__)
        leaked = max(leaked, engine.pool.checkedout())  # type: ignore[attr-defined]
        del session
        gc.collect()  # the field notes: a connection behind a failed close leaks until garbage collection
    await engine.dispose()
    return {
        'turns': repeats,
        'failed_turns': failed,
        'tool_errors': len(tool_errors),
        'close_errors': close_errors,
        'leaked_connections': leaked,
        'errors': sorted(kinds),
    }


COLUMNS = [
    ('N', 'tools'), ('parallel ms', 'parallel_ms'), ('sequential ms', 'sequential_ms'), ('ideal ms', 'ideal_ms'),
    ('par/ideal', 'parallel_over_ideal'), ('seq/ideal', 'sequential_over_ideal'), ('speed-up', 'speedup'),
    ('CPU ms/turn', 'parallel_cpu_ms'),
    ('legacy failed turns', lambda r: f'{r["legacy"]["failed_turns"]}/{r["legacy"]["turns"]}'),
    ('legacy tool errors', lambda r: r['legacy']['tool_errors']),
    ('legacy close errors', lambda r: r['legacy']['close_errors']),
]  # fmt: skip


async def main() -> None:
    global sleep_s
    args = parser(__doc__.splitlines()[0], 'parallel_tools')
    args.add_argument('--tools', type=int_list, default=[1, 2, 4, 8, 16], help='tool calls per response')
    args.add_argument('--repeats', type=positive_int, default=5, help='turns per N and pattern (medians are reported)')
    args.add_argument('--sleep-ms', type=positive_float, default=100.0, help='time each tool spends in pg_sleep')
    opts = args.parse_args()
    if opts.quick:
        opts.tools, opts.repeats, opts.sleep_ms = [1, 2], 1, 10.0
    sleep_s = opts.sleep_ms / 1000
    config = {'tools_per_response': opts.tools, 'repeats': opts.repeats, 'tool_db_time_ms': opts.sleep_ms}
    config |= {'pool_size': 20, 'max_overflow': 10, 'pool_pre_ping': True}
    await start_database(pool_size=20, max_overflow=10, pool_timeout=10)
    try:
        machine = await machine_info()
        print_config('Benchmark 1: parallel tool calls, each a database query of fixed duration', config | machine)
        results = []
        for n in opts.tools:
            agent = Agent(scripted_model('own_session_tool', n), tools=[own_session_tool])
            await measure(agent, sequential=False)  # warm the pool and the code paths
            runs = {'parallel': [], 'sequential': [], 'ideal': [], 'cpu': []}
            for _ in range(opts.repeats):
                wall, _, cpu = await measure(agent, sequential=False)
                runs['parallel'].append(wall)
                runs['cpu'].append(cpu)
                wall, slowest, _ = await measure(agent, sequential=True)
                runs['sequential'].append(wall)
                runs['ideal'].append(slowest)
            parallel, sequential, ideal, cpu = (statistics.median(v) for v in runs.values())
            results.append(
                {'tools': n, 'parallel_ms': ms(parallel), 'sequential_ms': ms(sequential), 'ideal_ms': ms(ideal)}
                | {'parallel_cpu_ms': ms(cpu)}
                | {
                    'parallel_over_ideal': round(parallel / ideal, 3),
                    'sequential_over_ideal': round(sequential / ideal, 3),
                }
                | {'speedup': round(sequential / parallel, 2)}
            )
        for row in results:
            row['legacy'] = await legacy(row['tools'], opts.repeats)
        print_table(results, COLUMNS)
        print('legacy errors:', {r['tools']: r['legacy']['errors'] for r in results})
        at8 = next((r for r in results if r['tools'] == 8), None)
        summary = {
            'target_8_tools_within_1_2x_ideal': None if at8 is None else at8['parallel_over_ideal'] <= 1.2,
            'parallel_over_ideal_at_8': None if at8 is None else at8['parallel_over_ideal'],
            'legacy_failed_turns': sum(r['legacy']['failed_turns'] for r in results),
        }
        print('summary:', summary)
        write_results(opts.out, 'parallel_tools', config, machine, results, summary)
    finally:
        await close_database()


if __name__ == '__main__':
    run_benchmark(lambda: asyncio.run(main()))
