"""Benchmark 10b: CPU per demo turn with tracing off (nothing configured) and with spans exported over OTLP.

Each mode runs in a process of its own, forked from this one before any tracing or database is set up (tracing is
set up once per process, from the environment): `off` with no tracing variable, `otlp` with
`OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a loopback collector this script runs (it decodes what it receives, to
count the spans). A process warms up, then runs demo turns (`simple_chat` and
`simple_chat_stream`, the demo planner: 3 model requests and 7 tool calls a turn, no model latency) one after the
other; CPU is the process's (`time.process_time`: the exporter's thread included), from the start of a turn until
its deferred work (ledger, background tasks) is done; the `otlp` process then flushes its exporter and that CPU is
shared out over its turns too. Modes alternate over rounds so machine noise hits both.

Run (embedded PostgreSQL unless DATABASE_URL is set):
    .venv/bin/python scripts/bench_tracing.py [--turns 30] [--rounds 2]
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench_common import (
    ms,
    non_negative_int,
    parser,
    positive_int,
    print_config,
    print_table,
    run_benchmark,
    run_clean_up,
    run_script_forked,
    use_temporary_spool,
    write_results,
)

QUESTION = 'Find me cardiologists in Seattle who accept Medicare'
MODES = ('off', 'otlp')


class Collector:
    """A loopback OTLP/HTTP collector that counts the spans it receives."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans = 0
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
                if self.path == '/v1/traces':
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    collector.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                self.send_response(200)
                self.send_header('Content-Length', '0')
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


async def child(mode: str, turns: int, out: Path, warm_up: int = 3) -> None:
    """One process's measurement: warm-up, then `turns` turns of each pattern."""
    from bench_common import delete_chats, machine_info, start_database

    from agentrt.agents.observability import configure_observability, flush_spans
    from agentrt.agents.runtime import shutdown_runtime
    from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
    from agentrt.db.errors import BudgetExceededError
    from agentrt.db.session import Unscoped, get_db_session
    from agentrt.services.background import drain_supervisor, get_supervisor
    from agentrt.services.demo_data import MEDICAL_ACCOUNT, seed_demo_data
    from agentrt.services.ledger import get_request_tracker

    export = configure_observability()
    await start_database(pool_size=10, max_overflow=10, pool_timeout=10)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await seed_demo_data(session=session)
    prefix = f'bench-trace-{mode}-{uuid.uuid4().hex[:8]}'

    async def turn(i: int, streamed: bool) -> None:
        session_id = f'{prefix}-{streamed}-{i // 4}'  # conversations of four turns
        if streamed:
            async with simple_chat_stream(QUESTION, session_id=session_id, account=MEDICAL_ACCOUNT) as stream:
                async for _ in stream:
                    pass
        else:
            await simple_chat(QUESTION, session_id=session_id, account=MEDICAL_ACCOUNT)
        await get_request_tracker().flush()
        await get_supervisor().join()

    try:
        rows = []
        for streamed in (False, True):
            for i in range(warm_up):
                await turn(-1 - i, streamed)
            await flush_spans()
            cpus, walls = [], []
            total_cpu = time.process_time()
            for i in range(turns):
                started, cpu = time.perf_counter(), time.process_time()
                await turn(i, streamed)
                walls.append(time.perf_counter() - started)
                cpus.append(time.process_time() - cpu)
            await flush_spans()  # what the exporter still holds is part of these turns' cost
            total_cpu = time.process_time() - total_cpu
            rows.append(
                {
                    'mode': mode,
                    'pattern': 'streamed' if streamed else 'plain',
                    'turns': turns,
                    'cpu_ms_per_turn': ms(total_cpu / turns),
                    'median_turn_cpu_ms': ms(statistics.median(cpus)),
                    'median_ms': ms(statistics.median(walls)),
                    'exporting': export.describe(),
                }
            )
        machine = await machine_info()
    except BudgetExceededError as exc:  # a budget on the account, nearly spent: said in one line, not a traceback
        raise SystemExit(f'stopped: {exc}') from None
    finally:
        # drain_supervisor: and the usage roll-up still pending, which would race the ledger rows deleted next; the
        # chats: left, `agentrt costs` and budgets counted this process's turns (QA).
        tracker = get_request_tracker()
        await run_clean_up(tracker.flush, drain_supervisor, lambda: delete_chats(prefix), shutdown_runtime)
    await asyncio.to_thread(out.write_text, json.dumps({'rows': rows, 'machine': machine}))


def run_child(mode: str, turns: int, warm_up: int, collector: Collector) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(('LOGFIRE_', 'OTEL_'))}
    if mode == 'otlp':
        env['OTEL_EXPORTER_OTLP_ENDPOINT'] = collector.url
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'child.json'
        args = ['--child', mode, '--turns', str(turns), '--child-out', str(out), '--warm-up', str(warm_up)]
        code, output = run_script_forked(__file__, args, env)
        if code != 0:
            stopped = [line for line in output.splitlines() if line.startswith('stopped: ')]
            raise SystemExit(stopped[-1] if stopped else f'{mode} run failed:\n{output}')  # a budget's: one line
        data = json.loads(out.read_text())
    return data['rows'], data['machine']


COLUMNS = [
    ('mode', 'mode'), ('pattern', 'pattern'), ('turns', 'turns'), ('CPU ms/turn', 'cpu_ms_per_turn'),
    ('median turn CPU ms', 'median_turn_cpu_ms'), ('median ms', 'median_ms'), ('spans/turn', 'spans_per_turn'),
]  # fmt: skip


def main() -> None:
    args = parser(__doc__.splitlines()[0], 'tracing')
    args.add_argument('--turns', type=positive_int, default=30, help='measured turns per pattern and process')
    args.add_argument('--rounds', type=positive_int, default=2, help='processes per mode, alternating')
    args.add_argument(
        '--warm-up', type=non_negative_int, default=3, help='unmeasured turns per pattern and process first'
    )
    args.add_argument('--child', choices=MODES, help=argparse_hidden())
    args.add_argument('--child-out', type=Path, help=argparse_hidden())
    opts = args.parse_args()
    if opts.child:
        asyncio.run(child(opts.child, opts.turns, opts.child_out, opts.warm_up))
        return
    if opts.quick:
        opts.turns, opts.rounds, opts.warm_up = 2, 1, 1
    use_temporary_spool()
    collector = Collector()
    config = {'turns': opts.turns, 'rounds': opts.rounds, 'warm_up': opts.warm_up, 'model': 'demo planner, no latency'}
    config['question'] = QUESTION
    print_config('Benchmark 10b: CPU per demo turn, tracing off and exported over OTLP', config)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    machine: dict[str, Any] = {}
    for round_ in range(opts.rounds):
        for mode in MODES:
            before = collector.spans
            rows, machine = run_child(mode, opts.turns, opts.warm_up, collector)
            spans = collector.spans - before
            for row in rows:
                row['spans_per_turn'] = round(spans / (2 * (opts.turns + opts.warm_up)), 1) if mode == 'otlp' else 0
                results.setdefault((mode, row['pattern']), []).append(row)
            shown = ', '.join(f'{r["pattern"]} {r["cpu_ms_per_turn"]} ms' for r in rows)
            print(f'  round {round_ + 1}, {mode}: {shown}')
    merged = []
    for (mode, pattern), rows in results.items():
        merged.append(
            {
                'mode': mode,
                'pattern': pattern,
                'turns': sum(r['turns'] for r in rows),
                'cpu_ms_per_turn': round(statistics.median(r['cpu_ms_per_turn'] for r in rows), 1),
                'median_turn_cpu_ms': round(statistics.median(r['median_turn_cpu_ms'] for r in rows), 1),
                'median_ms': round(statistics.median(r['median_ms'] for r in rows), 1),
                'spans_per_turn': rows[0]['spans_per_turn'],
            }
        )
    print_table(merged, COLUMNS)
    by = {(r['mode'], r['pattern']): r for r in merged}
    summary = {
        f'added_cpu_ms_per_turn_{pattern}': round(
            by[('otlp', pattern)]['cpu_ms_per_turn'] - by[('off', pattern)]['cpu_ms_per_turn'], 1
        )
        for pattern in ('plain', 'streamed')
    }
    summary['spans_received'] = collector.spans
    print('summary:', summary)
    write_results(opts.out, 'tracing', config, machine, merged, summary)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == '__main__':
    run_benchmark(main)
