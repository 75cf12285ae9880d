"""Benchmark 12: what tenant isolation (row-level security, function roles) adds per demo turn and per tool session.

One process, both modes in the same run, interleaved in short blocks (order shuffled each round) so machine noise
hits both (blocks, not single operations: a prepared statement's plan is made again when the role changes, which
alternating every operation would charge to both modes):
- `rls`: the runtime as shipped. Each transaction switches to its function role and sets its tenant on its BEGIN
  (`set_config('role', ...)`, `set_config('app.account_id', ...)`, transaction-local), and PostgreSQL evaluates the
  policies of every account table it reads or writes.
- `off`: sessions run as the login role with nothing set (`agentrt.db.session.set_row_security(False)`, for this
  benchmark only). The login role must be a superuser (the embedded server's `postgres`): superusers bypass
  row-level security, so nothing is evaluated either. With another login role the script stops and says so.

Figures: demo turns (`simple_chat`, the demo planner: 3 model requests and 7 tool calls, no model latency): wall time
and process CPU (`time.process_time`) per turn, until its deferred work (ledger, background tasks) is done; and one
tool's session alone (the directory search a tool runs, in `get_read_only_session(account=...)`), per session.

Run (embedded PostgreSQL unless DATABASE_URL is set):
    .venv/bin/python scripts/bench_rls.py [--turns 4] [--rounds 20] [--sessions 50]
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from typing import Any

from bench_common import (
    delete_chats,
    machine_info,
    ms,
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
from sqlalchemy import text

from agentrt.agents.runtime import shutdown_runtime
from agentrt.agents.simple_chat import simple_chat
from agentrt.db.errors import BudgetExceededError
from agentrt.db.session import Unscoped, get_db_session, get_read_only_session, set_row_security
from agentrt.services import directory_service as directory
from agentrt.services.background import drain_supervisor, get_supervisor
from agentrt.services.demo_data import MEDICAL_ACCOUNT, MEDICAL_SCHEMA, seed_demo_data
from agentrt.services.ledger import get_request_tracker

QUESTION = 'Find me cardiologists in Seattle who accept Medicare'
MODES = ('off', 'rls')


async def _login_is_superuser() -> bool:
    async with get_db_session(account=Unscoped.OWNER) as session:
        return bool(
            (await session.execute(text('SELECT rolsuper FROM pg_roles WHERE rolname = current_user'))).scalar()
        )


async def _account_id() -> int:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return int(
            (
                await session.execute(text('SELECT id FROM accounts WHERE slug = :s'), {'s': MEDICAL_ACCOUNT})
            ).scalar_one()
        )


async def _turn(session_id: str) -> None:
    await simple_chat(QUESTION, session_id=session_id, account=MEDICAL_ACCOUNT)
    await get_request_tracker().flush()
    await get_supervisor().join()


async def _tool_session(account_id: int) -> None:
    async with get_read_only_session(account=account_id) as session:
        await directory.search_directory(
            account_id,
            query='cardiology',
            schema_name=MEDICAL_SCHEMA,
            filters={'city': 'Seattle'},
            limit=5,
            session=session,
        )


async def _block(mode: str, what: str, count: int, run: Any) -> tuple[list[float], float]:
    set_row_security(mode == 'rls')
    try:
        walls = []
        cpu = time.process_time()
        for i in range(count):
            started = time.perf_counter()
            await run(i)
            walls.append(time.perf_counter() - started)
        return walls, time.process_time() - cpu
    finally:
        set_row_security(True)


async def measure(turns: int, rounds: int, sessions: int, warm_up: int) -> tuple[list[dict[str, Any]], dict, dict]:
    await start_database(pool_size=10, max_overflow=10, pool_timeout=10)
    prefix = f'bench-rls-{uuid.uuid4().hex[:8]}'
    try:
        if not await _login_is_superuser():
            raise SystemExit(
                'bench_rls compares against running without row-level security, which only a superuser login does '
                '(superusers bypass it): run it on the embedded server, or with a superuser DATABASE_URL'
            )
        machine = await machine_info()  # before the measurements: its load average is the one at the start
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await seed_demo_data(session=session)
        account_id = await _account_id()
        counter = iter(range(10**9))

        async def turn(i: int) -> None:
            await _turn(f'{prefix}-{next(counter) // 4}')  # conversations of four turns

        async def tool(i: int) -> None:
            await _tool_session(account_id)

        for mode in MODES:  # warm both paths: prepared statements, plans, pool
            await _block(mode, 'turn', warm_up, turn)
            await _block(mode, 'tool session', warm_up * 10, tool)
        samples: dict[tuple[str, str], dict[str, Any]] = {}
        for _ in range(rounds):
            for mode in random.sample(MODES, len(MODES)):
                for what, count, run in (('turn', turns, turn), ('tool session', sessions, tool)):
                    walls, cpu = await _block(mode, what, count, run)
                    entry = samples.setdefault((what, mode), {'walls': [], 'cpu': 0.0, 'n': 0})
                    entry['walls'] += walls
                    entry['cpu'] += cpu
                    entry['n'] += count
        rows = []
        for (what, mode), entry in sorted(samples.items()):
            rows.append(
                {
                    'what': what,
                    'mode': mode,
                    'n': entry['n'],
                    'median_ms': round(ms(statistics.median(entry['walls'])) or 0.0, 3),
                    'p90_ms': round(ms(percentile(entry['walls'], 90)) or 0.0, 3),
                    'cpu_ms': round(ms(entry['cpu'] / entry['n']) or 0.0, 3),
                }
            )
        by = {(r['what'], r['mode']): r for r in rows}
        summary = {}
        for what, key in (('turn', 'per_turn'), ('tool session', 'per_tool_session')):
            on, off = by[(what, 'rls')], by[(what, 'off')]
            summary[f'added_median_ms_{key}'] = round(on['median_ms'] - off['median_ms'], 3)
            summary[f'added_cpu_ms_{key}'] = round(on['cpu_ms'] - off['cpu_ms'], 3)
    except BudgetExceededError as exc:  # a budget on the account, nearly spent: said in one line, not a traceback
        raise SystemExit(f'stopped: {exc}') from None
    finally:
        # drain_supervisor: and the usage roll-up still pending, which would race the ledger rows deleted next; the
        # chats: left, `agentrt costs` and budgets counted its turns (QA).
        tracker = get_request_tracker()
        await run_clean_up(tracker.flush, drain_supervisor, lambda: delete_chats(prefix), shutdown_runtime)
    return rows, summary, machine


COLUMNS = [
    ('what', 'what'), ('mode', 'mode'), ('n', 'n'), ('median ms', 'median_ms'), ('p90 ms', 'p90_ms'),
    ('CPU ms each', 'cpu_ms'),
]  # fmt: skip


def main() -> None:
    args = parser(__doc__.splitlines()[0], 'rls')
    args.add_argument('--turns', type=positive_int, default=4, help='measured turns per mode and round (a block)')
    args.add_argument('--rounds', type=positive_int, default=20, help='rounds; each runs both modes, in random order')
    args.add_argument(
        '--sessions', type=positive_int, default=50, help='measured tool sessions per mode and round (a block)'
    )
    args.add_argument(
        '--warm-up', type=non_negative_int, default=3, help='unmeasured turns per mode first (and 10x sessions)'
    )
    opts = args.parse_args()
    if opts.quick:
        opts.turns, opts.rounds, opts.sessions, opts.warm_up = 2, 1, 10, 1
    use_temporary_spool()
    config = {
        'turns': opts.turns,
        'rounds': opts.rounds,
        'sessions': opts.sessions,
        'warm_up': opts.warm_up,
        'model': 'demo planner, no latency',
        'question': QUESTION,
    }
    print_config('Benchmark 12: tenant isolation (row-level security) on and off, same run', config)
    rows, summary, machine = asyncio.run(measure(opts.turns, opts.rounds, opts.sessions, opts.warm_up))
    print_table(rows, COLUMNS)
    print('summary:', summary)
    print(f'load average at start: {machine.get("load_average_at_start")}')
    write_results(opts.out, 'rls', config, machine, rows, summary)


if __name__ == '__main__':
    run_benchmark(main)
