"""Benchmark: N worker processes sharing one PgBouncer budget of 10 server connections (transaction mode).

For each N (1, 2, 4), N processes each run C concurrent chats of T turns (`simple_chat`, the demo planner with a
model latency per request: 3 requests and 7 tool calls a turn, ledger rows, post-turn work) through one PgBouncer with
`default_pool_size=10`, each process in the pooler mode (`DB_POOLER=pgbouncer`) with its own pool of 5 + 5 client
connections. Reported per N: turns ok/failed, ledger rows against model requests (exactly one each), server
connection-seconds per turn (server connections in use, `SHOW POOLS` sampled every 100 ms and integrated), the time
clients waited for one (`SHOW STATS` total_wait_time), peak server connections in use and clients waiting, CPU per
turn of the workers, of PostgreSQL and of PgBouncer. A 2-core machine cannot show throughput scaling: read it as "the
budget is shared with 0 errors, and what each process needs".

Run (embedded PostgreSQL unless DATABASE_URL is set: `AGENTRT_DATA_DIR`'s, else the benchmarks' own `bench-pgdata`;
needs pgbouncer, `apt-get install pgbouncer`):
    .venv/bin/python scripts/bench_workers.py [--workers 1,2,4] [--chats 25] [--turns 3] [--latency 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
from bench_common import (
    ROOT,
    bench_data_dir,
    delete_chats,
    demo_planner_model,
    int_list,
    machine_info,
    non_negative_float,
    parser,
    positive_int,
    print_config,
    print_table,
    run_benchmark,
    run_clean_up,
    write_results,
)
from pydantic_ai.models.wrapper import WrapperModel
from sqlalchemy import text

from agentrt.agents.runtime import shutdown_runtime
from agentrt.agents.simple_chat import simple_chat
from agentrt.db.engine import get_engine, init_database
from agentrt.db.session import Unscoped, get_db_session
from agentrt.db.settings import Settings
from agentrt.services.demo_data import seed_demo_data

sys.path.insert(0, str(ROOT))
from tests.pgbouncer import BINARY as PGBOUNCER_BINARY  # the tests' PgBouncer launcher
from tests.pgbouncer import PgBouncer, bouncer_for

BUDGET = 10
CHAT_PREFIX = f'bench-workers-{os.getpid()}'
QUESTION = 'Find cardiologists in Seattle'


class Counted(WrapperModel):
    """Counts the model requests answered (the ledger must have one row for each)."""

    requests = 0

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        Counted.requests += 1
        return await super().request(*args, **kwargs)


async def child(tag: str, chats: int, turns: int, latency: float) -> None:
    """One worker process: its own engine and pool through the pooler; prints its figures as one JSON line."""
    await init_database(migrate=False)
    model = Counted(demo_planner_model(latency))
    ok = failed = 0
    errors: list[str] = []

    async def chat(index: int) -> None:
        nonlocal ok, failed
        for _ in range(turns):
            try:
                await simple_chat(QUESTION, session_id=f'{tag}-{index}', account='acme-health', model=model)
                ok += 1
            except Exception as exc:
                failed += 1
                errors.append(f'{type(exc).__name__}: {exc}'[:200])

    started, cpu_started = time.monotonic(), _cpu_seconds()  # the chats, not the process's start-up
    await asyncio.gather(*(chat(i) for i in range(chats)))
    wall = time.monotonic() - started
    await shutdown_runtime()
    cpu = _cpu_seconds() - cpu_started
    figures = {'ok': ok, 'failed': failed, 'requests': Counted.requests, 'cpu_s': cpu, 'wall_s': wall}
    print(json.dumps(figures | {'errors': errors[:3]}), flush=True)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def admin(bouncer: PgBouncer, command: str) -> list[dict[str, Any]]:
    """A PgBouncer admin console command (simple query protocol: a client-side cursor), for the benchmark database."""
    async with await psycopg.AsyncConnection.connect(bouncer.admin_url(), autocommit=True) as conn:
        cursor = psycopg.AsyncClientCursor(conn)
        await cursor.execute(command)
        names = [column.name for column in cursor.description or []]
        rows = [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]
    return [row for row in rows if row.get('database') == bouncer.database]


async def wait_seconds(bouncer: PgBouncer) -> float:
    """Seconds clients spent waiting for a server connection so far (`SHOW STATS` total_wait_time)."""
    rows = await admin(bouncer, 'SHOW STATS')
    return float(rows[0]['total_wait_time']) / 1e6 if rows else 0.0


def cpu_of(pids: list[int]) -> float:
    """CPU seconds used so far by these processes and their children (PostgreSQL's backends, runuser's pgbouncer)."""
    total = 0.0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for each in [process, *process.children(recursive=True)]:
                times = each.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


async def run_n(n: int, bouncer: PgBouncer, args: Any, postmaster: int) -> dict[str, Any]:
    before = await wait_seconds(bouncer)
    cpu_before = cpu_of([postmaster]), cpu_of([bouncer.process.pid if bouncer.process else 0])
    env = {
        **os.environ,
        'DATABASE_URL': bouncer.url(),
        'DB_POOLER': 'pgbouncer',
        'DB_POOL_SIZE': '5',
        'DB_MAX_OVERFLOW': '5',
        'AGENTRT_AUTO_MIGRATE': 'false',
    }
    command = [sys.executable, __file__, '--child']
    options = ['--chats', str(args.chats), '--turns', str(args.turns), '--latency', str(args.latency)]
    procs = [
        await asyncio.create_subprocess_exec(
            *command, f'{CHAT_PREFIX}-n{n}-p{i}', *options, env=env, stdout=subprocess.PIPE
        )
        for i in range(n)
    ]
    peak_servers = peak_waiting = 0
    busy = 0.0  # server connection-seconds: server connections in use, integrated over the samples
    started = last = time.monotonic()
    outputs_pending = [asyncio.ensure_future(proc.communicate()) for proc in procs]
    while not all(output.done() for output in outputs_pending):
        for pool in await admin(bouncer, 'SHOW POOLS'):
            now = time.monotonic()
            busy += pool['sv_active'] * (now - last)
            last = now
            peak_servers = max(peak_servers, pool['sv_active'])
            peak_waiting = max(peak_waiting, pool['cl_waiting'])
        await asyncio.sleep(0.1)
    wall = time.monotonic() - started
    outputs = [json.loads((await output)[0].decode().strip().splitlines()[-1]) for output in outputs_pending]
    after = await wait_seconds(bouncer)
    pg_cpu, pgb_cpu = cpu_of([postmaster]) - cpu_before[0], cpu_of([bouncer.process.pid if bouncer.process else 0])
    pgb_cpu -= cpu_before[1]
    async with get_db_session(account=Unscoped.ADMIN) as session:
        query = text('SELECT count(*) FROM llm_requests WHERE chat_session_id LIKE :p')
        ledger = (await session.execute(query, {'p': f'{CHAT_PREFIX}-n{n}-%'})).scalar_one()
    ok, failed = sum(o['ok'] for o in outputs), sum(o['failed'] for o in outputs)
    requests = sum(o['requests'] for o in outputs)
    turns = max(ok, 1)
    return {
        'workers': n,
        'chats': n * args.chats,
        'turns_ok': ok,
        'turns_failed': failed,
        'model_requests': requests,
        'ledger_rows': ledger,
        'ledger_exact': ledger == requests,
        'server_conn_s_per_turn': round(busy / turns, 3),
        'wait_s_per_turn': round((after - before) / turns, 3),
        'server_conns_peak': peak_servers,
        'clients_waiting_peak': peak_waiting,
        'worker_cpu_ms_per_turn': round(sum(o['cpu_s'] for o in outputs) * 1000 / turns, 1),
        'postgres_cpu_ms_per_turn': round(pg_cpu * 1000 / turns, 1),
        'pgbouncer_cpu_ms_per_turn': round(pgb_cpu * 1000 / turns, 1),
        'turns_per_s': round(ok / wall, 1),
        'errors': [e for o in outputs for e in o['errors']][:3],
    }


async def main() -> None:
    cli = parser(__doc__.splitlines()[0], 'bench_workers')
    cli.add_argument('--workers', type=int_list, default=[1, 2, 4])
    cli.add_argument('--chats', type=positive_int, default=25, help='concurrent chats per worker process')
    cli.add_argument('--turns', type=positive_int, default=3, help='turns per chat')
    cli.add_argument('--latency', type=non_negative_float, default=0.3, help='seconds per model request')
    cli.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = cli.parse_args()
    if args.child:
        await child(args.child, args.chats, args.turns, args.latency)
        return
    if args.quick:  # the smoke test: every step once (each worker process is another Python start, about 2 s of CPU)
        args.workers, args.chats, args.turns, args.latency = [1], 3, 1, 0.05
    if PGBOUNCER_BINARY is None:  # said before the database starts: it was a traceback after the seeding
        said = 'bench_workers: pgbouncer is not installed (apt-get install pgbouncer); nothing measured'
        print(said, file=sys.stderr)
        raise SystemExit(2)
    # The benchmarks' own data directory, as the others use: the default one was the user's own, whose ledger then
    # held this run's rows, priced (the demo planner is named gpt-4o-mini), in `agentrt costs` of acme-health.
    await init_database(Settings(data_dir=bench_data_dir()))
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await seed_demo_data(session=session)
    postmaster = _postmaster_pid()
    bouncer = bouncer_for(get_engine().url, pool_size=BUDGET)
    bouncer.start()
    config = {'budget': BUDGET, 'client_pool': '5 + 5 per process', **{k: getattr(args, k) for k in ('chats', 'turns')}}
    config['latency_s'] = args.latency
    print_config('N worker processes, one PgBouncer budget of 10 server connections', config)
    try:
        machine = await machine_info()
        rows = [await run_n(n, bouncer, args, postmaster) for n in args.workers]
    finally:
        bouncer.stop()
        await run_clean_up(lambda: delete_chats(CHAT_PREFIX, account=Unscoped.ADMIN), shutdown_runtime)
    print_table(rows, [(key, key) for key in rows[0] if key != 'errors'])
    for row in rows:
        for error in row['errors']:
            print(f'  N={row["workers"]}: {error}')
    summary = {'all_ok': all(r['turns_failed'] == 0 and r['ledger_exact'] for r in rows)}
    write_results(args.out, 'bench_workers', config, machine, rows, summary)


def _postmaster_pid() -> int:
    """The PostgreSQL server's pid when it runs here with its socket in its data directory (the embedded server), read
    from its postmaster.pid; 0 otherwise (its CPU is then not reported)."""
    pid_file = Path(str(get_engine().url.query.get('host') or '/nonexistent')) / 'postmaster.pid'
    try:
        return int(pid_file.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return 0


if __name__ == '__main__':
    run_benchmark(lambda: asyncio.run(main()))
