"""Repro: parallel tool calls on one shared AsyncSession fail; a session per tool fixes it, and is faster.

(a) legacy pattern: the deps hold one AsyncSession; the model asks for two tools in one response;
    pydantic-ai runs them concurrently and SQLAlchemy raises its concurrent-operations error, which fails
    the run after its model request was made: the cost-tracking write that follows it on that same session
    never happens, so the request's billing data is lost. The session still closes, and no connection
    stays checked out (both printed).
(b) the runtime's pattern: each tool opens `async with get_db_session()`; the same turn succeeds and
    the cost row is written in its own session.
(c) tools that each spend a fixed time in the database (pg_sleep), run in parallel and sequentially.

Run (embedded PostgreSQL unless DATABASE_URL is set):  python scripts/repro_parallel_tools.py [--quick]
(`--quick`: 50 ms in the database per tool in (c) instead of 250, for the test suite). Exit status 0 only if (a)
reproduced the failure and (b) succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

from bench_common import run_benchmark, run_clean_up
from pydantic_ai import Agent, ModelResponse, RunContext, TextPart, ToolCallPart, capture_run_messages
from pydantic_ai.messages import ModelMessage, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from agentrt.db.engine import build_engine, close_database, current_settings, get_engine, init_database, pool_status
from agentrt.db.session import Unscoped, get_db_session

SLEEP_S = 0.25
PARALLEL_TOOLS = 4
COST_TABLE = 'repro_cost_rows'


def planner(tool_count: int):
    """A scripted model: `tool_count` tool calls in ONE response, then an answer."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if any(isinstance(p, ToolReturnPart) for m in messages for p in m.parts):
            return ModelResponse(parts=[TextPart('done')])
        name = info.function_tools[0].name
        return ModelResponse(parts=[ToolCallPart(name, {'n': i}, tool_call_id=f'c{i}') for i in range(tool_count)])

    return FunctionModel(respond, model_name='repro')


@dataclass
class LegacyDeps:
    session: AsyncSession  # the anti-pattern: one session shared by every concurrent tool task


legacy_agent = Agent(planner(2), deps_type=LegacyDeps)


@legacy_agent.tool
async def legacy_query(ctx: RunContext[LegacyDeps], n: int) -> int:
    """Count directory entries using the session from deps."""
    return (
        await ctx.deps.session.execute(text('SELECT count(*) FROM directory_entries WHERE id > :n'), {'n': n})
    ).scalar_one()


fixed_agent = Agent(planner(2))


@fixed_agent.tool_plain
async def per_tool_query(n: int) -> int:
    """Count directory entries in this tool's own session."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        return (
            await session.execute(text('SELECT count(*) FROM directory_entries WHERE id > :n'), {'n': n})
        ).scalar_one()


timing_agent = Agent(planner(PARALLEL_TOOLS))


@timing_agent.tool_plain
async def slow_query(n: int) -> int:
    """Spend a fixed time in the database, in this tool's own session."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text('SELECT pg_sleep(:s)'), {'s': SLEEP_S})
    return n


async def part_a() -> bool:
    print('(a) legacy: one AsyncSession in deps, two tools in one model response')
    # The legacy app's engine, configured as commonly done: pool_pre_ping=True (a ping on every checkout).
    # Sharing a session is a race: the error shows whenever a call finds the session still provisioning its
    # connection; otherwise the queries silently run one after another.
    legacy_engine = build_engine(get_engine().url, current_settings().model_copy(update={'pool_pre_ping_idle': 0}))
    session = async_sessionmaker(legacy_engine)()
    reproduced = False
    with capture_run_messages() as messages:
        try:
            result = await legacy_agent.run('count', deps=LegacyDeps(session))
            # The legacy cost tracker writes after the run, on the same shared session.
            await session.execute(
                text(f"INSERT INTO {COST_TABLE} (pattern, tokens) VALUES ('legacy', :t)"),
                {'t': result.usage.total_tokens},
            )
            await session.commit()
            print('    the run unexpectedly succeeded')
        except Exception as exc:
            reproduced = 'concurrent operations are not permitted' in str(exc)
            print(f'    run failed: {type(exc).__name__}: {str(exc).splitlines()[0]}')
    billed = [m for m in messages if isinstance(m, ModelResponse)]
    tokens = sum(m.usage.total_tokens for m in billed)
    try:
        await session.close()
        print('    session.close(): ok')
    except Exception as exc:
        print(f'    session.close(): failed ({type(exc).__name__}: {str(exc).splitlines()[0]})')
    async with get_db_session(account=Unscoped.OWNER) as check:
        rows = (await check.execute(text(f"SELECT count(*) FROM {COST_TABLE} WHERE pattern = 'legacy'"))).scalar_one()
    print(f'    model requests made: {len(billed)} ({tokens} tokens); cost rows written: {rows} -> billing data lost')
    print(f'    connections still checked out afterwards: {legacy_engine.pool.checkedout()}')  # type: ignore[attr-defined]
    await legacy_engine.dispose()
    return reproduced and rows == 0


async def part_b() -> bool:
    print('(b) runtime: each tool opens its own session; cost row written in its own session')
    try:
        result = await fixed_agent.run('count')
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f"INSERT INTO {COST_TABLE} (pattern, tokens) VALUES ('per-tool', 42)"))
    except Exception as exc:
        print(f'    FAILED: {type(exc).__name__}: {exc}')
        return False
    async with get_db_session(account=Unscoped.OWNER) as session:
        rows = (
            await session.execute(text(f"SELECT count(*) FROM {COST_TABLE} WHERE pattern = 'per-tool'"))
        ).scalar_one()
    print(
        f'    run succeeded: output {result.output!r}; cost rows written: {rows}; '
        f'checked out: {pool_status().checked_out}'
    )
    return rows == 1 and pool_status().checked_out == 0


async def part_c() -> None:
    print(f'(c) {PARALLEL_TOOLS} tools, each spending {SLEEP_S * 1000:.0f} ms in PostgreSQL')
    started = time.perf_counter()
    await timing_agent.run('go')
    parallel = time.perf_counter() - started
    with Agent.parallel_tool_call_execution_mode('sequential'):
        started = time.perf_counter()
        await timing_agent.run('go')
        sequential = time.perf_counter() - started
    print(f'    parallel (session per tool): {parallel:.3f} s')
    print(f'    sequential:                  {sequential:.3f} s')
    print(
        f'    speed-up: {sequential / parallel:.2f}x '
        f'(ideal {PARALLEL_TOOLS}x; the floor is the slowest tool, {SLEEP_S:.2f} s)'
    )


async def main() -> int:
    await init_database()
    try:
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'CREATE TABLE IF NOT EXISTS {COST_TABLE} (pattern text, tokens int)'))
            await session.execute(text(f'TRUNCATE {COST_TABLE}'))
        reproduced = await part_a()
        fixed = await part_b()
        await part_c()
    finally:
        # Here, not at the end of the try: a failure or Ctrl-C left the table in the database it ran on.
        await run_clean_up(drop_table, close_database)
    print(f'result: failure reproduced={reproduced}, fix works={fixed}')
    return 0 if reproduced and fixed else 1


async def drop_table() -> None:
    """Drop the table the tools of (c) write their costs to."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text(f'DROP TABLE IF EXISTS {COST_TABLE}'))


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: `--quick` only. Parsed, so `--help` says what the repro shows without running it, and an
    unknown option is refused (exit 2): both ran the whole repro (QA)."""
    doc = __doc__ or ''
    result = argparse.ArgumentParser(
        description=doc.split('\n\nRun ')[0],
        epilog='On the embedded PostgreSQL unless DATABASE_URL is set. Exit status 0 only if (a) reproduced the '
        'failure and (b) succeeded.',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    result.add_argument('--quick', action='store_true', help='50 ms in the database per tool in (c), not 250')
    return result.parse_args(argv)


if __name__ == '__main__':
    if arguments().quick:
        SLEEP_S = 0.05
    run_benchmark(
        lambda: sys.exit(asyncio.run(main())), interrupted='interrupted; its clean-up ran: its table is dropped'
    )
