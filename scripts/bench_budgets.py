"""Benchmark 10: what budgets add to a model request, at 200 concurrent turns, budgets on against off.

An agent with the ledger capability (what every runtime agent carries) runs turns of two model requests each (a
tool call, then the answer) on a model with a fixed latency, for accounts of its own that have a budget (large
enough that nothing is refused). Rounds of N concurrent turns alternate: budgets on (every request estimated,
held by one conditional statement, `max_tokens` capped, settled by the ledger writer) and budgets off
(`BudgetConfig(enabled=False)`: no estimate, no hold; the writer still settles each row's cost into the period).
Two spreads: every turn on one account (the worst case: one account's admissions queue on its one row) and turns
spread over 20 accounts; and turns one at a time, for the admission's own cost without 200 turns queueing on one
event loop. Reported per spread and mode: turn latency (median, p95), the added latency per model
request (the difference of the medians, over the requests of a turn), CPU per turn, and the admission's own time on
the request path (estimate, hold statement, `max_tokens` cap; median, p95). At the end every period must hold
nothing and have spent what the ledger says.

Run (embedded PostgreSQL unless DATABASE_URL is set):
    .venv/bin/python scripts/bench_budgets.py [--turns 200] [--rounds 6] [--latency 0.1] [--accounts 1,20]
        [--sequential 40]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from functools import wraps
from typing import Any

from bench_common import (
    delete_ledger_rows,
    int_list,
    machine_info,
    ms,
    non_negative_float,
    non_negative_int,
    parser,
    percentile,
    positive_int,
    print_config,
    print_table,
    run_benchmark,
    run_clean_up,
    start_database,
    use_temporary_spool,
    write_results,
)
from pydantic_ai import Agent, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from sqlalchemy import text

from agentrt.db.engine import close_database
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import drain_supervisor, get_supervisor
from agentrt.services.budgets import BudgetConfig, Period, budget_statuses, remove_budget, set_budget
from agentrt.services.ledger import _capability, get_request_tracker, ledger_capability
from agentrt.tools.dependencies import SessionDependencies

ACCOUNT = 'bench-budgets'
REQUESTS_PER_TURN = 2
MODEL_NOTE = 'a FunctionModel named gpt-4o-mini (priced by genai-prices): a tool call, then the answer'


def two_request_model(latency: float) -> FunctionModel:
    """Waits `latency` s per request; asks for the `lookup` tool, then answers."""

    async def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await asyncio.sleep(latency)
        if any(isinstance(part, ToolReturnPart) for part in messages[-1].parts):
            return ModelResponse(parts=[TextPart('Three cardiologists in Seattle accept Medicare.')])
        return ModelResponse(parts=[ToolCallPart('lookup', {'city': 'Seattle'}, tool_call_id='c1')])

    return FunctionModel(respond, model_name='gpt-4o-mini')


def agent(model: FunctionModel, budgets: bool) -> Agent[SessionDependencies, str]:
    """The benchmark's agent: the ledger capability with budgets on or off, and one tool."""
    built: Agent[SessionDependencies, str] = Agent(
        model,
        deps_type=SessionDependencies,
        instructions='Answer questions about doctors.',
        capabilities=[ledger_capability(budget=BudgetConfig(enabled=budgets))],
    )

    @built.tool_plain
    def lookup(city: str) -> str:
        """Doctors in a city."""
        return f'{city}: 3 cardiologists accept Medicare'

    return built


class AdmissionTimer:
    """Times each admission (estimate, hold statement, `max_tokens` cap) on the request path, by wrapping `admit`
    where the ledger capability calls it: the latency budgets add before a request is sent, queueing included."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._original = _capability.admit

    def install(self) -> None:
        original = self._original

        @wraps(original)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - started)

        _capability.admit = timed  # type: ignore[assignment]

    def uninstall(self) -> None:
        _capability.admit = self._original  # type: ignore[assignment]


async def bench_accounts(count: int) -> list[int]:
    """The benchmark's own accounts (removed when it ends), each with a budget no round reaches."""
    ids = []
    async with get_db_session(account=Unscoped.ADMIN) as session:
        for index in range(count):
            slug = f'{ACCOUNT}-{index}'
            await session.execute(
                text("INSERT INTO accounts (slug, name) VALUES (:s, 'Budgets benchmark') ON CONFLICT DO NOTHING"),
                {'s': slug},
            )
            ids.append((await session.execute(text('SELECT id FROM accounts WHERE slug = :s'), {'s': slug})).scalar())
            await remove_budget(session=session, account=slug)  # its period starts again from the ledger
            await set_budget(session=session, account=slug, limit_usd=Decimal(1_000_000), period=Period('day'))
    return [account_id for account_id in ids if isinstance(account_id, int)]


async def settle() -> None:
    """Wait for the ledger writes and background work a round left behind."""
    await get_request_tracker().flush()
    await get_supervisor().join()


async def round_of(
    turns: int, run: Callable[[int], Awaitable[Any]], *, concurrent: bool = True
) -> tuple[list[float], float, list[float]]:
    """`turns` turns started at once (or one after another); their wall times, the process CPU per turn, and how
    late the event loop woke a 5 ms sleep meanwhile (every await of a turn waits about that long)."""
    cpu = time.process_time()
    lags: list[float] = []

    async def one(i: int) -> float:
        started = time.perf_counter()
        await run(i)
        return time.perf_counter() - started

    async def lag_probe() -> None:
        while True:
            begin = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - begin - 0.005)

    probe = asyncio.create_task(lag_probe())
    try:
        if concurrent:
            walls = await asyncio.gather(*(one(i) for i in range(turns)))
        else:
            walls = [await one(i) for i in range(turns)]
    finally:
        probe.cancel()
    await settle()
    return list(walls), (time.process_time() - cpu) / turns, lags


async def measure(
    turns: int, rounds: int, latency: float, accounts: list[int], prefix: str, *, concurrent: bool = True
) -> list[dict]:
    """Alternate rounds of budgets on and off (a warm-up pair first, not counted); turn i is account i mod n's."""
    model = two_request_model(latency)
    agents = {'on': agent(model, True), 'off': agent(model, False)}
    walls: dict[str, list[float]] = {'on': [], 'off': []}
    cpus: dict[str, list[float]] = {'on': [], 'off': []}
    lags: dict[str, list[float]] = {'on': [], 'off': []}
    timer = AdmissionTimer()
    admissions: list[float] = []
    timer.install()
    try:
        for index in range(rounds + 2):
            mode = 'on' if index % 2 == 0 else 'off'
            measured = index >= 2

            def run(i: int, mode: str = mode, index: int = index) -> Awaitable[Any]:
                deps = SessionDependencies(
                    session_id=f'{prefix}-{len(accounts)}-{index}-{i}',
                    account_id=accounts[i % len(accounts)],
                    account_slug=f'{ACCOUNT}-{i % len(accounts)}',
                    agent_instance_id=0,
                    agent_instance_slug='bench',
                    agent_type='bench',
                )
                return agents[mode].run('Cardiologists in Seattle who accept Medicare?', deps=deps)

            timer.seconds.clear()
            wall, cpu, lag = await round_of(turns, run, concurrent=concurrent)
            if measured:
                walls[mode] += wall
                cpus[mode].append(cpu)
                lags[mode] += lag
                if mode == 'on':
                    admissions += timer.seconds
            note = '' if measured else ', warm-up'
            shape = f'{turns} {"concurrent" if concurrent else "sequential"} turns, {len(accounts)} account(s)'
            print(f'  {shape}, round {index} ({mode}{note}): median {statistics.median(wall):.3f} s')
    finally:
        timer.uninstall()
    rows = []
    for mode in ('off', 'on'):
        rows.append(
            {
                'concurrency': turns if concurrent else 1,
                'accounts': len(accounts),
                'mode': f'budgets {mode}',
                'turns': len(walls[mode]),
                'median_ms': ms(statistics.median(walls[mode])),
                'p95_ms': ms(percentile(walls[mode], 95)),
                'cpu_ms_per_turn': ms(statistics.fmean(cpus[mode])),
                'loop_lag_median_ms': ms(statistics.median(lags[mode])) if lags[mode] else None,
            }
        )
    off, on = rows
    on['added_ms_per_request'] = round((on['median_ms'] - off['median_ms']) / REQUESTS_PER_TURN, 2)
    on['added_p95_ms_per_request'] = round((on['p95_ms'] - off['p95_ms']) / REQUESTS_PER_TURN, 2)
    on['added_cpu_ms_per_request'] = round((on['cpu_ms_per_turn'] - off['cpu_ms_per_turn']) / REQUESTS_PER_TURN, 2)
    on |= {
        'admissions_timed': len(admissions),
        'admission_median_ms': round(statistics.median(admissions) * 1000, 2) if admissions else None,
        'admission_p95_ms': round(percentile(admissions, 95) * 1000, 2) if admissions else None,
    }
    return rows


async def check_books(accounts: list[int]) -> dict[str, Any]:
    """After the run: nothing held, and every period spent what the ledger says it cost."""
    held, unbalanced = 0, []
    async with get_db_session(account=Unscoped.ADMIN) as session:
        for account_id in accounts:
            (status,) = await budget_statuses(session=session, account_id=account_id)
            ledger = (
                await session.execute(
                    text(
                        'SELECT coalesce(sum(total_cost), 0) FROM llm_requests WHERE account_id = :a'
                        " AND status <> 'refused' AND started_at >= :start AND started_at < :end"
                    ),
                    {'a': account_id, 'start': status.period_start, 'end': status.period_end},
                )
            ).scalar()
            held += status.holds
            if status.reserved_usd != 0 or status.spent_usd != ledger:
                unbalanced.append({'account_id': account_id, 'spent': str(status.spent_usd), 'ledger': str(ledger)})
    return {'holds_after': held, 'unbalanced_periods': unbalanced, 'books_balance': not held and not unbalanced}


COLUMNS = [
    ('concurrency', 'concurrency'), ('accounts', 'accounts'), ('mode', 'mode'), ('turns', 'turns'),
    ('median ms', 'median_ms'), ('p95 ms', 'p95_ms'),
    ('CPU ms/turn', 'cpu_ms_per_turn'), ('added ms/request', 'added_ms_per_request'),
    ('added p95 ms/request', 'added_p95_ms_per_request'), ('added CPU ms/request', 'added_cpu_ms_per_request'),
    ('admission median ms', 'admission_median_ms'), ('admission p95 ms', 'admission_p95_ms'),
    ('loop lag median ms', 'loop_lag_median_ms'),
]  # fmt: skip


def two_or_more(value: str) -> int:
    """`--rounds`: they alternate budgets on and off, so one round measures only one side (QA: a traceback after
    the whole run, 'no median for empty data')."""
    rounds = positive_int(value)
    if rounds < 2:
        raise argparse.ArgumentTypeError(f'{value!r} is fewer than 2 (rounds alternate on and off)')
    return rounds


async def main() -> None:
    args = parser(__doc__.splitlines()[0], 'budgets')
    args.add_argument('--turns', type=positive_int, default=200, help='concurrent turns per round')
    args.add_argument(
        '--rounds', type=two_or_more, default=6, help='measured rounds per spread, alternating on and off (2 or more)'
    )
    args.add_argument('--latency', type=non_negative_float, default=0.1, help='model latency per request (s)')
    args.add_argument('--accounts', type=int_list, default=[1, 20], help='spreads: turns over this many accounts')
    args.add_argument(
        '--sequential', type=non_negative_int, default=40, help='turns per round run one at a time (0: none)'
    )
    opts = args.parse_args()
    if opts.quick:  # one spread (over two accounts): a second spread runs the same steps again
        opts.turns, opts.rounds, opts.latency, opts.accounts, opts.sequential = 10, 2, 0.0, [2], 3
    use_temporary_spool()
    await start_database(pool_size=20, max_overflow=10, pool_timeout=30)
    prefix = f'bench-budget-{os.getpid()}'
    config = {
        'concurrent_turns': opts.turns,
        'measured_rounds_per_spread': opts.rounds,
        'accounts_per_spread': opts.accounts,
        'sequential_turns_per_round': opts.sequential,
        'model_latency_s_per_request': opts.latency,
        'model_requests_per_turn': REQUESTS_PER_TURN,
        'model': MODEL_NOTE,
        'pool': '20 + 10 overflow',
    }
    try:
        accounts = await bench_accounts(max(opts.accounts))
        machine = await machine_info()
        print_config('Benchmark 10: budgets on against off, per model request', config | machine)
        rows = []
        for spread in opts.accounts:
            rows += await measure(opts.turns, opts.rounds, opts.latency, accounts[:spread], prefix)
        if opts.sequential:  # the admission's own cost, without 200 turns queueing on the event loop
            rows += await measure(opts.sequential, opts.rounds, opts.latency, accounts[:1], prefix, concurrent=False)
        print_table(rows, COLUMNS)
        books = await check_books(accounts)
        added = {
            f'{row["concurrency"]}_turns_{row["accounts"]}_accounts': row['added_ms_per_request']
            for row in rows
            if 'added_ms_per_request' in row
        }
        summary = {'added_ms_per_request': added} | books
        print('summary:', summary)
        if not books['books_balance']:
            raise SystemExit(f'the books do not balance: {books}')
        write_results(opts.out, 'budgets', config, machine, rows, summary)
    finally:
        # The ledger's rows first: those its writer still held (a round stopped mid-way) were written after the
        # delete, rows of accounts gone, in `agentrt costs` for good (QA). drain_supervisor: and the usage roll-up
        # still pending, which would race the ledger rows deleted next.
        await run_clean_up(settle, drain_supervisor, lambda: delete_rows(prefix), close_database)


async def delete_rows(prefix: str) -> None:
    """Remove the run's ledger rows and its accounts."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await delete_ledger_rows(session, 'r.chat_session_id LIKE :p', {'p': f'{prefix}-%'})
        # Its accounts go too (their budgets, charges and conversations with them): each with a $1,000,000 budget,
        # they were left in `agentrt budget show` of the database the benchmark ran on (QA).
        await session.execute(text('DELETE FROM accounts WHERE slug LIKE :s'), {'s': f'{ACCOUNT}-%'})


if __name__ == '__main__':
    run_benchmark(lambda: asyncio.run(main()))
