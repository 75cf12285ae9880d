"""Overload: `agentrt serve` asked for far more chats at once than its pool and turn admission allow, then light load
again, or stopped (SIGTERM) with streams open. Are the answers under overload clear, does the server recover, is
anything left half-written?

The script starts `agentrt serve` (`--workers N`) as `scripts/soak_serve.py` does (an embedded PostgreSQL in a new
data directory, the demo accounts, an API key, the demo model), takes a light-load baseline (`--light` turns one
after the other) and an idle sample, then sends `--clients` requests at once, each its own connection: streamed chats
(`POST /api/v1/chat`) and JSON turns (`POST /api/v1/conversations/{id}/turns`), half of them on a few shared
conversations (409s expected) and the rest each on a new one. It counts the answers by status, error type and
`Retry-After`, and, for streams, by how they ended; then the light load again, an idle sample, and the server log
searched for tracebacks, `ERROR` lines and 500s. With `--sigterm-after S`, it sends SIGTERM (`--signal INT`, `HUP`)
to the server S seconds into the burst instead, and measures how long the server takes to exit and how each request
ended. `--hangup-share` makes that share of the turns' clients hang up within `--hangup-after` seconds.

Checks at the end (SQL, on the script's own connection): no claim left in `conversation_turns`, no budget hold in
`budget_reservations`, ledger rows by status, every conversation's history whole (`leak_check_library.HISTORY_SQL`).

Run:
    .venv/bin/python scripts/overload_serve.py --clients 500 [--workers 2] [--read-share 0.2] [--bursts 2]
    .venv/bin/python scripts/overload_serve.py --clients 200 --stream-share 1 --sigterm-after 4
    .venv/bin/python scripts/overload_serve.py --clients 300 --hangup-share 0.7 --hangup-after 3
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import percentile, run_benchmark, run_clean_up
from leak_check_library import HISTORY_SQL
from soak_serve import INTERRUPTED, PgProbe, Server, setup

QUESTION = 'Cardiologists in Seattle who accept Medicare'


def tree_stats(pid: int) -> dict[str, Any]:
    """RSS (MiB), fds and threads of a process and its children (uvicorn's workers)."""
    pids, rss, fds, threads = [pid], 0, 0, 0
    for task in Path(f'/proc/{pid}/task').iterdir():
        pids += [int(p) for p in (task / 'children').read_text().split()]
    for each in pids:
        try:
            status = dict(line.split(':', 1) for line in Path(f'/proc/{each}/status').read_text().splitlines())
            fds += len(os.listdir(f'/proc/{each}/fd'))
        except OSError:
            continue
        rss += int(status['VmRSS'].split()[0])
        threads += int(status['Threads'])
    return {'processes': len(pids), 'rss_mib': round(rss / 1024, 1), 'fds': fds, 'threads': threads}


async def one(client: Any, kind: str, conversation: str) -> str:
    """One request; its outcome: 'ok', 'http <status> <type> retry-after=<value>', or a stream's end."""
    try:
        if kind == 'stream':
            return await stream(client, conversation)
        if kind == 'read':  # not admitted as turns are: the pool alone bounds them
            path = random.choice(['/api/v1/conversations?limit=50', '/api/v1/llm-audit/interactions?page_size=50'])
            response = await client.get(path)
            return 'ok' if response.status_code == 200 else refusal(response)
        response = await client.post(f'/api/v1/conversations/{conversation}/turns', json={'message': QUESTION})
        return 'ok' if response.status_code == 200 else refusal(response)
    except Exception as exc:  # the outcome of the request, not the end of the script
        return f'{type(exc).__name__}'


def refusal(response: Any) -> str:
    try:
        kind_of = response.json().get('type')
    except ValueError:
        kind_of = repr(response.text[:80])
    return f'http {response.status_code} {kind_of} retry-after={response.headers.get("retry-after")}'


async def stream(client: Any, conversation: str) -> str:
    """A streamed chat read to its end: 'ok' ([DONE]), a refusal, or the error event's text."""
    body = {
        'trigger': 'submit-message',
        'id': conversation,
        'messages': [{'id': uuid.uuid4().hex, 'role': 'user', 'parts': [{'type': 'text', 'text': QUESTION}]}],
    }
    async with client.stream('POST', '/api/v1/chat', json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return refusal(response)
        done = False
        async for line in response.aiter_lines():
            if line.startswith('data: {"type":"error"'):
                return 'stream error event: ' + re.sub(r'err_\w+', 'err_#', line[6:])[:160]
            done = done or line == 'data: [DONE]'
    return 'ok' if done else 'stream ended without [DONE]'


async def light(httpx2: Any, server: Server, key: str, turns: int) -> dict[str, Any]:
    headers = {'Authorization': f'Bearer {key}'}
    latencies, outcomes = [], Counter()
    async with httpx2.AsyncClient(base_url=server.url, timeout=120, headers=headers) as client:
        for i in range(turns):
            begin = time.perf_counter()
            outcomes[await one(client, 'json' if i % 2 else 'stream', f'light-{uuid.uuid4().hex[:8]}')] += 1
            latencies.append(time.perf_counter() - begin)
    return {'p50_ms': round(1000 * percentile(latencies, 50)), 'max_ms': round(1000 * max(latencies)), **outcomes}


async def idle(server: Server, pg: PgProbe) -> dict[str, Any]:
    await asyncio.sleep(3)
    row = tree_stats(server.pid) | await pg.counts()
    row |= {k: v for k, v in (await server.probe(collect=True)).items() if k in ('tasks', 'task_kinds')}
    row['claims'] = await pg.conn.fetchval('SELECT count(*) FROM conversation_turns')
    row['holds'] = await pg.conn.fetchval('SELECT count(*) FROM budget_reservations')
    return row


async def burst(httpx2: Any, server: Server, key: str, opts: argparse.Namespace) -> tuple[Counter, dict]:
    headers = {'Authorization': f'Bearer {key}'}
    limits = httpx2.Limits(max_connections=opts.clients, max_keepalive_connections=0)
    rng = random.Random(opts.seed)
    shared = [f'shared-{uuid.uuid4().hex[:6]}-{i}' for i in range(5)]
    timings: dict[str, Any] = {}
    async with httpx2.AsyncClient(base_url=server.url, timeout=120, headers=headers, limits=limits) as client:

        async def request(i: int) -> tuple[str, float]:
            draw = rng.random()
            kind = (
                'read' if draw < opts.read_share else 'stream' if draw < opts.read_share + opts.stream_share else 'json'
            )
            conversation = rng.choice(shared) if rng.random() < opts.shared_share else f'burst-{uuid.uuid4().hex[:10]}'
            begin = time.perf_counter()
            if kind != 'read' and rng.random() < opts.hangup_share:  # the client gives up: the turn is cancelled
                try:
                    async with asyncio.timeout(rng.uniform(0.01, opts.hangup_after)):
                        outcome = await one(client, kind, conversation)
                except TimeoutError:
                    outcome = 'client hung up'
                return f'{kind}: {outcome}', time.perf_counter() - begin
            outcome = await one(client, kind, conversation)
            return f'{kind}: {outcome}', time.perf_counter() - begin

        started = time.perf_counter()
        tasks = [asyncio.create_task(request(i)) for i in range(opts.clients)]
        if opts.sigterm_after is not None:
            await asyncio.sleep(opts.sigterm_after)
            stop = time.perf_counter()
            server.process.send_signal(getattr(signal, f'SIG{opts.signal}'))
            code = await asyncio.to_thread(server.process.wait, 120)
            timings |= {'exit_code': code, 'exit_after_signal_s': round(time.perf_counter() - stop, 2)}
        results = await asyncio.gather(*tasks)
        timings['burst_s'] = round(time.perf_counter() - started, 1)
    outcomes = Counter(outcome for outcome, _ in results)
    seconds = {
        outcome: (round(min(v), 1), round(percentile(v, 50) or 0, 1), round(max(v), 1))
        for outcome in outcomes
        for v in [[s for o, s in results if o == outcome]]
    }
    return outcomes, timings | {'seconds': seconds}


async def checks(pg: PgProbe) -> dict[str, Any]:
    ledger = await pg.conn.fetch('SELECT status, error_type, count(*) AS n FROM llm_requests GROUP BY 1, 2')
    timing = await pg.conn.fetch(
        'SELECT streamed, count(*) AS n, round(max(latency_ms)) AS max_ms, round(avg(latency_ms)) AS avg_ms '
        'FROM llm_requests GROUP BY 1'
    )
    history = dict(await pg.conn.fetchrow(HISTORY_SQL))
    return {
        'claims': await pg.conn.fetchval('SELECT count(*) FROM conversation_turns'),
        'holds': await pg.conn.fetchval('SELECT count(*) FROM budget_reservations'),
        'ledger': {f'{r["status"]} {r["error_type"] or ""}'.strip(): r['n'] for r in ledger},
        'history': history,
        'request_latency': [dict(r) for r in timing],
    }


def log_findings(path: Path) -> dict[str, Any]:
    text = path.read_text(errors='replace')
    lines = text.splitlines()
    return {
        'log_lines': len(lines),
        'tracebacks': text.count('Traceback'),
        'error_lines': [line[:200] for line in lines if re.search(r'\bERROR\b', line)][:10],
        'warning_kinds': Counter(
            (m.group(1) if (m := re.search(r' (\d{3} \w+: \w+)', line)) else line[:80])
            for line in lines
            if line.startswith('WARNING')
        ),
        'status_500': sum(1 for line in lines if '" 500' in line),
    }


async def main(opts: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix='overload-serve-'))
    atexit.register(shutil.rmtree, root, True)
    env = {k: v for k, v in os.environ.items() if k != 'DATABASE_URL'}
    env |= {'AGENTRT_DATA_DIR': str(root / 'pgdata'), 'AGENTRT_LEDGER_SPOOL': str(root / 'spool.jsonl')}
    env |= {'AGENTRT_MODEL': 'demo', 'AGENTRT_HTTP_WORKERS': str(opts.workers)}
    env |= {'AGENTRT_HTTP_SHUTDOWN_SECONDS': str(opts.shutdown_seconds)}
    key, _, url = await setup(env, f'overload-{uuid.uuid4().hex[:6]}')
    server = Server(root, env, probe=opts.workers == 1, tracemalloc_frames=0)
    pg = PgProbe(url)
    import httpx2

    try:
        await server.wait_up(httpx2)
        await pg.open()
        print('light before:', await light(httpx2, server, key, opts.light))
        print('idle before: ', await idle(server, pg))
        for number in range(1 if opts.sigterm_after is not None else opts.bursts):
            outcomes, timings = await burst(httpx2, server, key, opts)
            print(
                f'burst {number + 1} of {opts.clients} at once:', {k: v for k, v in timings.items() if k != 'seconds'}
            )
            for outcome, n in sorted(outcomes.items()):
                print(f'  {n:5d}  {outcome}  (seconds min/p50/max {timings["seconds"][outcome]})')
            if opts.sigterm_after is None:
                print('ready after: ', await server.ready(httpx2))
                print('light after: ', await light(httpx2, server, key, opts.light))
                print('idle after:  ', await idle(server, pg))
        print('checks:', await checks(pg))
    finally:
        stopped: list[int | None] = []

        async def stop_server() -> None:
            stopped.append(await server.stop())

        # To its end whatever stops it meanwhile: killed by SIGTERM, it left its server running.
        await run_clean_up(pg.close, stop_server)
        print('server exit:', stopped[0])
        print('log:', log_findings(server.log_path))
        if opts.keep_log:
            shutil.copy(server.log_path, opts.keep_log)


def parse_args() -> argparse.Namespace:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument('--clients', type=int, default=500, help='requests sent at once')
    args.add_argument('--workers', type=int, default=1, help='agentrt serve --workers')
    args.add_argument('--bursts', type=int, default=1, help='bursts one after another (RSS after each)')
    args.add_argument('--read-share', type=float, default=0.0, help='share of the burst that reads (listings)')
    args.add_argument('--stream-share', type=float, default=0.5, help='share of the burst that streams (else JSON)')
    args.add_argument('--shared-share', type=float, default=0.5, help='share of turns on 5 shared conversations')
    args.add_argument('--hangup-share', type=float, default=0.0, help='share of turns whose client hangs up early')
    args.add_argument('--hangup-after', type=float, default=2.0, help='a hang-up comes within this many seconds')
    args.add_argument('--light', type=int, default=20, help='turns one after another, before and after')
    args.add_argument('--sigterm-after', type=float, default=None, help='SIGTERM the server this long into the burst')
    args.add_argument('--signal', choices=['TERM', 'INT', 'HUP'], default='TERM', help='the signal of --sigterm-after')
    args.add_argument('--shutdown-seconds', type=int, default=20, help='agentrt serve --shutdown-seconds')
    args.add_argument('--keep-log', type=Path, help='copy the server log here')
    args.add_argument('--seed', type=int, default=1)
    return args.parse_args()


if __name__ == '__main__':
    run_benchmark(lambda: asyncio.run(main(parse_args())), interrupted=INTERRUPTED)
