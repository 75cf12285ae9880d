"""Benchmark 8: HTTP overhead. A streamed turn over HTTP (`POST /api/v1/chat`) against `simple_chat_stream` in-process.

Same run, same model, same database: the demo planner (3 requests, 7 tool calls per turn) with a fixed simulated
latency per request, as in benchmark 3. In-process: `simple_chat_stream` in this process. HTTP: the app of
`agentrt.api` served by uvicorn in a child process (its own pool, 20 + 10, as `agentrt serve` runs it), driven by an
httpx client in this process that reads the Vercel AI event stream to its end.

Part 1, latency: turns one at a time, alternating in-process / HTTP; medians of the turn's wall time and time to the
first text delta, and the mean CPU per turn (in-process: this process's; HTTP: the server process's, read from /proc
in 10 ms ticks, hence the mean; the client's CPU is not counted). Part 2, throughput: N concurrent streams (each a
closed loop of turns) for a time window: turns/s, p50/p95 latency, errors, server CPU per turn.

Run (embedded PostgreSQL unless DATABASE_URL is set):
    .venv/bin/python scripts/bench_http.py [--latencies 0,0.25] [--turns 15] [--streams 50,200] [--window 10]
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bench_start
import httpx2
from bench_common import (
    closed_loop,
    delete_chats,
    demo_planner_model,
    float_list,
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
    wait_ready,
    write_results,
)
from sqlalchemy import text

from agentrt.agents.runtime import configure_observability
from agentrt.agents.simple_chat import simple_chat_stream
from agentrt.db.engine import close_database, get_engine
from agentrt.db.errors import BudgetExceededError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.api_keys import create_api_key
from agentrt.services.background import drain_supervisor, get_supervisor
from agentrt.services.demo_data import MEDICAL_ACCOUNT, seed_demo_data
from agentrt.services.ledger import get_request_tracker

QUESTION = 'Find me cardiologists in Seattle who accept Medicare'
MODEL_NOTE = 'demo planner (agents/demo_model.py) as a FunctionModel named gpt-4o-mini, priced by genai-prices'
CONVERSATION_TURNS = 4


def serve_child(port: int, latency: float) -> None:
    """In the child process: the API with the demo planner at `latency` s per request, on loopback `port`."""
    import uvicorn

    from agentrt.api.app import create_app
    from agentrt.db.settings import Settings

    settings = Settings(pool_size=20, max_overflow=10, pool_timeout=30)
    app = create_app(model=demo_planner_model(latency), settings=settings)
    uvicorn.run(app, host='127.0.0.1', port=port, log_level='warning', access_log=False)


class HttpServer:
    """The child server process: started, its CPU time read from /proc, stopped."""

    def __init__(self, latency: float, database_url: str) -> None:
        self.port = _free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        env = {**os.environ, 'DATABASE_URL': database_url}
        command = [sys.executable, __file__, '--serve-child', str(self.port), str(latency)]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    async def wait_up(self) -> None:
        await wait_ready(
            httpx2,
            self.url,
            self.process,
            seconds=60,
            exited=lambda: self.process.stderr.read() if self.process.stderr else '',
        )

    def cpu_s(self) -> float:
        fields = Path(f'/proc/{self.process.pid}/stat').read_text().rsplit(')', 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')  # utime + stime

    async def stop(self) -> None:
        self.process.terminate()
        await asyncio.to_thread(self.process.wait, 60)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return int(probe.getsockname()[1])


async def inprocess_turn(conversation: str, latency: float) -> float | None:
    """One `simple_chat_stream` turn; the time to its first text delta."""
    started, first = time.perf_counter(), None
    async with simple_chat_stream(
        QUESTION, session_id=conversation, account=MEDICAL_ACCOUNT, model=demo_planner_model(latency)
    ) as stream:
        async for _ in stream:
            first = first or time.perf_counter() - started
    return first


async def http_turn(client: httpx2.AsyncClient, key: str, conversation: str) -> float | None:
    """One streamed turn over HTTP, read to its end; the time to its first text delta."""
    body = {
        'trigger': 'submit-message',
        'id': conversation,
        'messages': [{'id': uuid.uuid4().hex, 'role': 'user', 'parts': [{'type': 'text', 'text': QUESTION}]}],
    }
    started, first, done = time.perf_counter(), None, False
    headers = {'Authorization': f'Bearer {key}'}
    async with client.stream('POST', '/api/v1/chat', json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f'HTTP {response.status_code}: {(await response.aread())[:200]!r}')
        async for line in response.aiter_lines():
            if first is None and line.startswith('data: {"type":"text-delta"'):
                first = time.perf_counter() - started
            if line == 'data: {"type":"error"' or line.startswith('data: {"type":"error"'):
                raise RuntimeError(json.loads(line[6:])['errorText'])
            done = done or line == 'data: [DONE]'
    if not done:
        raise RuntimeError('the stream ended without [DONE]')
    return first


async def settle() -> None:
    await get_request_tracker().flush()
    await get_supervisor().join()


async def measure_latency(
    server: HttpServer, client: httpx2.AsyncClient, key: str, latency: float, turns: int, prefix: str
) -> list[dict[str, Any]]:
    """Alternating single turns; conversations of `CONVERSATION_TURNS` turns for both patterns."""
    samples: dict[str, list[tuple[float, float, float | None]]] = {'in-process': [], 'http': []}
    for i in range(turns + 1):  # the first pair warms up and is not counted
        for pattern in ('in-process', 'http'):
            await settle()
            conversation = f'{prefix}-{pattern}-{latency}-{i // CONVERSATION_TURNS}'
            if pattern == 'in-process':
                started, cpu = time.perf_counter(), time.process_time()
                first = await inprocess_turn(conversation, latency)
                wall = time.perf_counter() - started
                await settle()
                used = time.process_time() - cpu
            else:
                await asyncio.sleep(0.05)  # let the server's post-turn work of the last turn finish first
                started, cpu = time.perf_counter(), server.cpu_s()
                first = await http_turn(client, key, conversation)
                wall = time.perf_counter() - started
                await asyncio.sleep(0.05)
                used = server.cpu_s() - cpu
            if i:
                samples[pattern].append((wall, used, first))
    rows = []
    for pattern, values in samples.items():
        walls, cpus, firsts = zip(*values, strict=True)
        rows.append(
            _row('latency', pattern, latency)
            | {'turns': turns, 'median_ms': ms(statistics.median(walls)), 'cpu_ms': ms(statistics.fmean(cpus))}
            | {'ttft_ms': ms(statistics.median(f for f in firsts if f is not None))}
        )
    inproc, http = rows
    for key_ in ('median_ms', 'ttft_ms', 'cpu_ms'):
        http[f'added_{key_}'] = round(http[key_] - inproc[key_], 1)
        http[f'added_{key_.removesuffix("_ms")}_pct'] = round(100 * (http[key_] - inproc[key_]) / inproc[key_], 1)
    return rows


async def measure_throughput(
    server: HttpServer, client: httpx2.AsyncClient, key: str, latency: float, streams: int, window: float, prefix: str
) -> list[dict[str, Any]]:
    """`streams` concurrent closed loops of turns for `window` s, in-process then over HTTP."""
    rows = []
    for pattern in ('in-process', 'http'):
        await settle()
        op = _turns(pattern, _conversations(f'{prefix}-tp-{pattern}-{streams}', streams), client, key, latency)
        cpu_before = time.process_time() if pattern == 'in-process' else server.cpu_s()
        run = await closed_loop(streams, window, op, spread=min(1.0, window / 4))
        if pattern == 'in-process':
            await settle()
            cpu = time.process_time() - cpu_before
        else:
            await asyncio.sleep(0.5)
            cpu = server.cpu_s() - cpu_before
        done = len(run.latencies)
        rows.append(
            _row('throughput', pattern, latency)
            | {'streams': streams, 'turns': done, 'turns_per_s': round(done / run.elapsed_s, 1)}
            | {'p50_ms': ms(percentile(run.latencies, 50)), 'p95_ms': ms(percentile(run.latencies, 95))}
            | {'errors': sum(run.failures.values()), 'cpu_ms': ms(cpu / done) if done else None}
        )
        if run.failures:
            print(f'  failures ({pattern}, {streams} streams): {dict(run.failures)}')
    return rows


def _turns(
    pattern: str, conversation: Callable[[int], str], client: httpx2.AsyncClient, key: str, latency: float
) -> Callable[[int], Awaitable[Any]]:
    """One turn of a worker, in-process or over HTTP."""
    if pattern == 'in-process':
        return lambda worker: inprocess_turn(conversation(worker), latency)
    return lambda worker: http_turn(client, key, conversation(worker))


def _conversations(prefix: str, streams: int) -> Callable[[int], str]:
    """The conversation id for a worker's next turn: a new conversation every `CONVERSATION_TURNS` turns."""
    turn_of = dict.fromkeys(range(streams), 0)

    def conversation(worker: int) -> str:
        turn_of[worker] += 1
        return f'{prefix}-{worker}-{turn_of[worker] // CONVERSATION_TURNS}'

    return conversation


def _row(part: str, pattern: str, latency: float) -> dict[str, Any]:
    return {'part': part, 'pattern': pattern, 'model_latency_ms': latency * 1000}


LATENCY_COLUMNS = [
    ('model ms/request', 'model_latency_ms'), ('pattern', 'pattern'), ('median ms', 'median_ms'),
    ('added ms', 'added_median_ms'), ('added %', 'added_median_pct'), ('TTFT ms', 'ttft_ms'),
    ('added TTFT ms', 'added_ttft_ms'), ('CPU ms', 'cpu_ms'), ('added CPU ms', 'added_cpu_ms'),
]  # fmt: skip
THROUGHPUT_COLUMNS = [
    ('model ms/request', 'model_latency_ms'), ('streams', 'streams'), ('pattern', 'pattern'), ('turns', 'turns'),
    ('turns/s', 'turns_per_s'), ('p50 ms', 'p50_ms'), ('p95 ms', 'p95_ms'), ('errors', 'errors'),
    ('CPU ms/turn', 'cpu_ms'),
]  # fmt: skip


async def main() -> None:
    args = parser(__doc__.splitlines()[0], 'http')
    args.add_argument('--latencies', type=float_list, default=[0.0, 0.25])
    args.add_argument('--turns', type=positive_int, default=15, help='measured single turns per pattern and latency')
    args.add_argument('--streams', type=int_list, default=[50, 200])
    args.add_argument('--window', type=positive_float, default=10.0, help='seconds of load per throughput row')
    args.add_argument('--throughput-latency', type=non_negative_float, default=0.25, help='model s/request in part 2')
    opts = args.parse_args()
    if opts.quick:
        opts.latencies, opts.turns, opts.streams, opts.window, opts.throughput_latency = [0.0], 1, [3], 0.5, 0.0
    configure_observability()
    use_temporary_spool()
    await start_database(pool_size=20, max_overflow=10, pool_timeout=30)
    prefix = f'bench-http-{uuid.uuid4().hex[:8]}'
    config = {
        'model_latency_s_per_request': opts.latencies,
        'turns': opts.turns,
        'streams': opts.streams,
        'window_s': opts.window,
        'throughput_model_latency_s': opts.throughput_latency,
        'model': MODEL_NOTE,
        'model_requests_per_turn': 3,
        'tool_calls_per_turn': 7,
        'conversation_turns': CONVERSATION_TURNS,
        'server': 'uvicorn, one process, pool 20 + 10; client: httpx2 in the benchmark process',
    }
    rows: list[dict[str, Any]] = []
    try:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await seed_demo_data(session=session)
            key = (await create_api_key(session=session, account=MEDICAL_ACCOUNT, name=prefix)).token
        machine = await machine_info()
        print_config('Benchmark 8: HTTP streamed chat against simple_chat_stream in-process', config | machine)
        database_url = get_engine().url.render_as_string(hide_password=False)
        limits = httpx2.Limits(max_connections=1000, max_keepalive_connections=1000)
        for latency in sorted({*opts.latencies, opts.throughput_latency}):
            server = HttpServer(latency, database_url)
            try:
                await server.wait_up()
                async with httpx2.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
                    if latency in opts.latencies:
                        rows += await measure_latency(server, client, key, latency, opts.turns, prefix)
                        print(f'  latency, {latency * 1000:.0f} ms/request: +{rows[-1]["added_median_ms"]} ms per turn')
                    if latency == opts.throughput_latency:
                        for streams in opts.streams:
                            rows += await measure_throughput(server, client, key, latency, streams, opts.window, prefix)
                            inproc, http = rows[-2]['turns_per_s'], rows[-1]['turns_per_s']
                            print(f'  throughput, {streams} streams: {inproc} / {http} turns/s')
            finally:
                await run_clean_up(server.stop)  # to its end: the server's turns are deleted next
        print_table([r for r in rows if r['part'] == 'latency'], LATENCY_COLUMNS)
        print_table([r for r in rows if r['part'] == 'throughput'], THROUGHPUT_COLUMNS)
        summary = await _summary(rows, opts, prefix)
        print('summary:', summary)
        write_results(opts.out, 'http', config, machine, rows, summary)
    except BudgetExceededError as exc:  # a budget on the account, nearly spent: said in one line, not a traceback
        raise SystemExit(f'stopped: {exc}') from None
    finally:
        # drain_supervisor: and the usage roll-up still pending, which would race the ledger rows deleted next. Both
        # patterns' turns (the server's too, stopped by now): left, they were counted by `agentrt costs` and budgets
        # of the database the benchmark ran on (QA).
        await run_clean_up(
            settle, drain_supervisor, lambda: delete_chats(prefix), lambda: forget_key(prefix), close_database
        )


async def forget_key(prefix: str) -> None:
    """Remove the API key the run made (named `prefix`)."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(text('DELETE FROM api_keys WHERE name = :p'), {'p': prefix})


async def _summary(rows: list[dict[str, Any]], opts: Any, prefix: str) -> dict[str, Any]:
    latency_rows = [r for r in rows if r['part'] == 'latency' and r['pattern'] == 'http']
    at_target = [r for r in latency_rows if r['model_latency_ms'] == max(opts.latencies) * 1000]
    async with get_db_session(account=Unscoped.ADMIN) as session:
        ledger = (
            await session.execute(
                text(
                    "SELECT count(*) FILTER (WHERE status = 'complete'), count(*) FROM llm_requests "
                    'WHERE chat_session_id LIKE :p'
                ),
                {'p': f'{prefix}-%'},
            )
        ).one()
    throughput = {
        f'{r["streams"]} streams': {r['pattern']: r['turns_per_s'] for r in rows if r.get('streams') == s}
        for s in opts.streams
        for r in rows
        if r.get('streams') == s and r['pattern'] == 'http'
    }
    return {
        'added_per_turn_pct_at_target': at_target[0]['added_median_pct'] if at_target else None,
        'added_ttft_ms_at_target': at_target[0]['added_ttft_ms'] if at_target else None,
        'target_latency_ms_per_request': max(opts.latencies) * 1000,
        'target_10_pct_met': bool(at_target) and at_target[0]['added_median_pct'] < 10,
        'turns_per_s': throughput,
        'errors': sum(r.get('errors') or 0 for r in rows),
        'ledger_rows_complete_of_all': list(ledger),
    }


if __name__ == '__main__':
    if len(sys.argv) == 4 and sys.argv[1] == '--serve-child':
        bench_start.started()  # the server's own handlers: it stops on SIGTERM, as uvicorn does
        serve_child(int(sys.argv[2]), float(sys.argv[3]))
    else:
        run_benchmark(lambda: asyncio.run(main()))
