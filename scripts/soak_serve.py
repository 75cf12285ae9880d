"""Soak: `agentrt serve` with the offline demo model over many turns. Does the server leak memory, fds, tasks or
database connections, or slow down?

The script starts `agentrt serve` (one process) as a child on a free loopback port, on an embedded PostgreSQL in a
data directory of its own (a new one unless `--data-dir`; `DATABASE_URL` is ignored), seeds the demo accounts, makes
an API key, and drives the server with httpx2 from `--concurrency` closed loops for `--turns` operations: JSON turns
(`POST /api/v1/conversations/{id}/turns`), streamed chats (`POST /api/v1/chat`, read to `[DONE]`, or dropped
mid-stream for `--disconnect-share` of them) and conversation reads (`GET /api/v1/conversations/{id}?limit=`), in
the `--mix` given, each turn starting a new conversation (`--new-share`) or continuing the loop's current one.

Every `--sample-every` operations it samples the server process: RSS and anonymous RSS (/proc/<pid>/status), open
fds (/proc/<pid>/fd), threads, CPU (/proc/<pid>/stat), asyncio tasks and gc-tracked objects (the child runs the
`agentrt` command line itself after installing a SIGUSR1 handler that writes them to a file: `--no-probe` runs the
plain `agentrt serve` and skips them), the server's PostgreSQL connections (pg_stat_activity, by state), and the
client-side latency of the window's operations. After `--warmup` operations the load pauses until nothing is in
flight and an idle sample is taken; another is taken after the last operation. It prints a table and a verdict: RSS
growth per 1,000 operations after the warm-up (least squares over the samples), the idle samples compared, the
latency of the first window after the warm-up against the last.

Run:
    .venv/bin/python scripts/soak_serve.py --turns 10000 --concurrency 8 [--disconnect-share 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROBE_FILE_ENV = 'SOAK_PROBE_FILE'
TRACEMALLOC_ENV = 'SOAK_TRACEMALLOC_FRAMES'
QUESTIONS = [
    'Cardiologists in Seattle who accept Medicare',
    'Find me a dermatologist in Portland',
    'Pediatricians in Boston that take Aetna',
    'Any neurologists in Chicago?',
    'Family medicine doctors in Austin accepting new patients',
    'Oncologists in Denver who accept Blue Cross',
]
OPS = ('json', 'stream', 'read')


# --- the child: `agentrt serve` with a probe -------------------------------------------------------------------


def serve_child(argv: list[str]) -> None:
    """In the child: install the SIGUSR1 probe, then run the `agentrt` command line with `argv` (`serve ...`)."""
    probe_file = Path(os.environ[PROBE_FILE_ENV])
    frames = int(os.environ.get(TRACEMALLOC_ENV) or 0)
    state: dict[str, Any] = {'seq': 0}

    def probe(signum: int, frame: object) -> None:
        # Runs in the main thread, between two bytecodes of whatever the event loop was doing: only reads.
        state['seq'] += 1
        out: dict[str, Any] = {'seq': state['seq']}
        request = probe_file.with_suffix('.collect')
        if request.exists():  # an idle sample: count the objects that live, not the garbage of the last turns
            request.unlink()
            out['collected'] = gc.collect()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            tasks = list(asyncio.all_tasks(loop))
            out['tasks'] = len(tasks)
            names = Counter(getattr(t.get_coro(), '__qualname__', type(t.get_coro()).__name__) for t in tasks)
            out['task_kinds'] = dict(names.most_common(8))
        out['gc_objects'] = len(gc.get_objects())
        out['gc_frozen'] = gc.get_freeze_count()
        import tracemalloc

        if tracemalloc.is_tracing():
            # Traced since the warm-up: what is still allocated of what the server allocated since. The frames are
            # shown as file:line (Traceback.format reads the source: linecache would be the top allocation).
            out['traced_kib'] = round(tracemalloc.get_traced_memory()[0] / 1024)
            snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            out['tracemalloc_top'] = [
                {'kib': round(s.size / 1024, 1), 'count': s.count, 'where': [f'{f.filename}:{f.lineno}' for f in tb]}
                for s in snapshot.statistics('traceback')[:10]
                for tb in [s.traceback]
            ]
            out['tracemalloc_lines'] = [str(s) for s in snapshot.statistics('lineno')[:15]]
        partial = probe_file.with_suffix('.part')
        partial.write_text(json.dumps(out))
        partial.replace(probe_file)

    def trace(signum: int, frame: object) -> None:
        # From the parent's idle sample after the warm-up on: allocations traced, `frames` deep.
        import tracemalloc

        tracemalloc.start(frames)

    signal.signal(signal.SIGUSR1, probe)
    if frames:
        signal.signal(signal.SIGUSR2, trace)
    from agentrt.agents.cli import main

    sys.argv = ['agentrt', *argv]
    main()


# --- the parent ----------------------------------------------------------------------------------------------------


class Server:
    """The child server process: started, probed through /proc (and SIGUSR1), stopped."""

    def __init__(self, root: Path, env: dict[str, str], *, probe: bool, tracemalloc_frames: int) -> None:
        self.port = _free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.probe_file = root / 'probe.json'
        self.log_path = root / 'server.log'
        self.probe_file.unlink(missing_ok=True)  # a probe of an earlier run: its numbers are not this server's
        serve = ['serve', '--host', '127.0.0.1', '--port', str(self.port), '--log-level', 'warning']
        if probe:
            env = {**env, PROBE_FILE_ENV: str(self.probe_file), TRACEMALLOC_ENV: str(tracemalloc_frames)}
            command = [sys.executable, __file__, '--serve-child', *serve]
        else:
            command = [sys.executable, '-m', 'agentrt', *serve]
        self.probing = probe
        self.tracing = probe and tracemalloc_frames > 0
        self.log = self.log_path.open('w')  # a file, not a pipe: a pipe nobody reads would block the server
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid

    async def wait_up(self, httpx2: Any) -> None:
        from bench_common import wait_ready  # the benchmarks' own (scripts/ is on the path: `setup` put it there)

        await wait_ready(httpx2, self.url, self.process, seconds=120, exited=lambda: f'see {self.log_path}')

    async def ready(self, httpx2: Any) -> dict[str, Any]:
        """The server's own view from `/health/ready`: its pool (connections held, checked out) and background work."""
        try:
            async with httpx2.AsyncClient(base_url=self.url, timeout=10) as client:
                body = (await client.get('/health/ready')).json()
        except (httpx2.HTTPError, ValueError):
            return {}
        pool, background = body.get('pool') or {}, body.get('background') or {}
        return {
            'pool_held': pool.get('checked_in', 0) + pool.get('checked_out', 0),
            'pool_out': pool.get('checked_out'),
            'bg_running': background.get('running'),
            'bg_queued': background.get('queued'),
            'bg_failed': background.get('failed'),
        }

    def proc(self) -> dict[str, Any]:
        """RSS, anonymous RSS, peak RSS (KiB), threads, open fds and CPU seconds of the server process."""
        status = {}
        for line in Path(f'/proc/{self.pid}/status').read_text().splitlines():
            key, _, value = line.partition(':')
            status[key] = value.split()
        fields = Path(f'/proc/{self.pid}/stat').read_text().rsplit(')', 1)[1].split()
        return {
            'rss_kib': int(status['VmRSS'][0]),
            'anon_kib': int(status['RssAnon'][0]),
            'hwm_kib': int(status['VmHWM'][0]),
            'threads': int(status['Threads'][0]),
            'fds': len(os.listdir(f'/proc/{self.pid}/fd')),
            'cpu_s': (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK'),
        }

    async def probe(self, *, collect: bool = False) -> dict[str, Any]:
        """The child's asyncio tasks and gc objects (empty when not probing or when it did not answer in 10 s); with
        `collect`, after a full garbage collection."""
        if not self.probing:
            return {}
        if collect:
            self.probe_file.with_suffix('.collect').touch()
        before = self._read_probe().get('seq', 0)
        os.kill(self.pid, signal.SIGUSR1)
        for _ in range(200):
            await asyncio.sleep(0.05)
            found = self._read_probe()
            if found.get('seq', 0) > before:
                return found
        return {}

    async def rebase(self) -> None:
        """With `--tracemalloc`, the child traces allocations from now on."""
        if self.tracing:
            os.kill(self.pid, signal.SIGUSR2)

    def _read_probe(self) -> dict[str, Any]:
        try:
            return json.loads(self.probe_file.read_text())
        except (OSError, ValueError):
            return {}

    async def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return await asyncio.to_thread(self.process.wait, 60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return None
        finally:
            self.log.close()


INTERRUPTED = 'interrupted; its clean-up ran: the server it started is stopped'
"""What it says when Ctrl-C or SIGTERM stops it (its data directory, its own unless `--data-dir`, goes at exit)."""


def client_module() -> Any:
    import httpx2

    return httpx2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return int(probe.getsockname()[1])


@dataclass
class Op:
    kind: str
    latency_s: float
    outcome: str  # 'ok', 'disconnected', or 'http <status>' / an exception's name


@dataclass
class Load:
    """The closed loops' shared state: operations started and done, the pause for the idle sample."""

    turns: int
    started: int = 0
    done: list[Op] = field(default_factory=list)
    in_flight: int = 0
    running: asyncio.Event = field(default_factory=asyncio.Event)
    progressed: asyncio.Event = field(default_factory=asyncio.Event)
    pause_at: int | None = None


@dataclass
class Loop:
    """One closed loop's conversations."""

    index: int
    prefix: str
    conversation: str = ''
    turns_in_conversation: int = 0
    conversations: list[str] = field(default_factory=list)
    count: int = 0

    def next_conversation(self) -> str:
        self.count += 1
        self.conversation = f'{self.prefix}-{self.index}-{self.count}'
        self.turns_in_conversation = 0
        return self.conversation


async def run_op(client: Any, opts: argparse.Namespace, loop: Loop, kind: str, rng: random.Random) -> str:
    """One operation of `kind` on the loop's conversations; its outcome."""
    if kind == 'read':
        if not loop.conversations:
            kind = 'json'  # nothing to read yet
        else:
            conversation = rng.choice(loop.conversations[-8:])
            response = await client.get(f'/api/v1/conversations/{conversation}', params={'limit': opts.read_limit})
            await response.aread()
            return 'ok' if response.status_code == 200 else f'http {response.status_code}'
    if (
        not loop.conversation
        or loop.turns_in_conversation >= opts.max_conversation_turns
        or rng.random() < opts.new_share
    ):
        loop.next_conversation()
    conversation = loop.conversation
    question = rng.choice(QUESTIONS)
    if kind == 'json':
        response = await client.post(f'/api/v1/conversations/{conversation}/turns', json={'message': question})
        await response.aread()
        outcome = 'ok' if response.status_code == 200 else f'http {response.status_code}'
    else:
        drop_after = rng.randint(1, 40) if rng.random() < opts.disconnect_share else None
        outcome = await stream_chat(client, conversation, question, drop_after)
        if outcome == 'disconnected':
            loop.next_conversation()  # its turn was cancelled: go on elsewhere, not into a 409 while it unwinds
            return outcome
    if outcome == 'ok':
        loop.turns_in_conversation += 1
        if conversation not in loop.conversations[-8:]:
            loop.conversations = [*loop.conversations[-7:], conversation]
    return outcome


async def stream_chat(client: Any, conversation: str, question: str, drop_after: int | None) -> str:
    """A streamed chat read to `[DONE]`, or dropped (the connection closed) after `drop_after` lines."""
    body = {
        'trigger': 'submit-message',
        'id': conversation,
        'messages': [{'id': uuid.uuid4().hex, 'role': 'user', 'parts': [{'type': 'text', 'text': question}]}],
    }
    lines, done = 0, False
    async with client.stream('POST', '/api/v1/chat', json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return f'http {response.status_code}'
        async for line in response.aiter_lines():
            if not line:
                continue
            lines += 1
            if line.startswith('data: {"type":"error"'):
                return 'stream error'
            if drop_after is not None and lines >= drop_after:
                return 'disconnected'  # leaving the block closes the connection mid-stream
            done = done or line == 'data: [DONE]'
    return 'ok' if done else 'no [DONE]'


async def drive(client: Any, opts: argparse.Namespace, load: Load, index: int, prefix: str) -> None:
    """A closed loop: operations back to back until `load.turns` have started."""
    rng = random.Random(opts.seed * 1000 + index)
    weights = [opts.mix[kind] for kind in OPS]
    loop = Loop(index, prefix)
    while True:
        await load.running.wait()
        if load.started >= load.turns or (load.pause_at is not None and load.started >= load.pause_at):
            if load.started >= load.turns:
                return
            await asyncio.sleep(0.05)
            continue
        load.started += 1
        load.in_flight += 1
        kind = rng.choices(OPS, weights)[0]
        begin = time.perf_counter()
        try:
            outcome = await run_op(client, opts, loop, kind, rng)
        except Exception as exc:  # a failure is a figure of the soak, not its end
            outcome = type(exc).__name__
            loop.next_conversation()
        finally:
            load.in_flight -= 1
        load.done.append(Op(kind, time.perf_counter() - begin, outcome))
        load.progressed.set()


class PgProbe:
    """The server's connections to its database (pg_stat_activity), on a connection of the script's own."""

    def __init__(self, url: Any) -> None:
        self.url = url
        self.conn: Any = None

    async def open(self) -> None:
        import asyncpg

        query = self.url.query
        self.conn = await asyncpg.connect(
            host=query['host'],
            port=int(query['port']),
            user=self.url.username,
            database=self.url.database,
            server_settings={'application_name': 'soak-probe'},
        )

    async def counts(self) -> dict[str, int]:
        rows = await self.conn.fetch(
            "SELECT coalesce(state, '?') AS state, count(*) AS n FROM pg_stat_activity "
            "WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
            'GROUP BY 1'
        )
        by_state = {row['state']: row['n'] for row in rows}
        return {
            'pg_conns': sum(by_state.values()),
            'pg_active': by_state.get('active', 0),
            'pg_idle_in_tx': by_state.get('idle in transaction', 0) + by_state.get('idle in transaction (aborted)', 0),
        }

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


async def sample(server: Server, pg: PgProbe, load: Load, since: int, started: float, label: str) -> dict[str, Any]:
    """One row: the server process, its probe, its database connections, the latency of operations `since`.."""
    ops = load.done[since:]  # taken now: operations that end while this samples belong to the next window
    elapsed = round(time.perf_counter() - started, 1)
    row: dict[str, Any] = {'label': label, 'turns': since + len(ops), 'elapsed_s': elapsed}
    row |= server.proc()
    found = await server.probe(collect=label.startswith('idle'))
    row['tasks'] = found.get('tasks')
    row['gc_objects'] = found.get('gc_objects')
    if found.get('task_kinds'):
        row['task_kinds'] = found['task_kinds']
    for key in ('traced_kib', 'tracemalloc_top', 'tracemalloc_lines'):
        if key in found:
            row[key] = found[key]
    row |= await pg.counts()
    row |= await server.ready(client_module())
    row['window_ops'] = len(ops)
    from bench_common import ms, percentile  # the benchmarks' own (scripts/ is on the path: `setup` put it there)

    for kind in (None, *OPS):
        values = [op.latency_s for op in ops if (kind is None or op.kind == kind) and op.outcome == 'ok']
        name = kind or 'all'
        row[f'{name}_p50_ms'] = ms(percentile(values, 50))
        row[f'{name}_p99_ms'] = ms(percentile(values, 99))
    row['disconnects'] = sum(op.outcome == 'disconnected' for op in ops)
    row['errors'] = sum(op.outcome not in ('ok', 'disconnected') for op in ops)
    row['load_1m'] = round(os.getloadavg()[0], 2)
    return row


async def soak(opts: argparse.Namespace, server: Server, pg: PgProbe, key: str, prefix: str) -> list[dict[str, Any]]:
    import httpx2

    load = Load(opts.turns, pause_at=opts.warmup if 0 < opts.warmup < opts.turns else None)
    limits = httpx2.Limits(max_connections=opts.concurrency * 2, max_keepalive_connections=opts.concurrency * 2)
    headers = {'Authorization': f'Bearer {key}'}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    rows.append(await sample(server, pg, load, 0, started, 'idle-start'))
    print_row(rows[-1])
    async with httpx2.AsyncClient(base_url=server.url, timeout=120, limits=limits, headers=headers) as client:
        loops = [asyncio.create_task(drive(client, opts, load, i, prefix)) for i in range(opts.concurrency)]
        load.running.set()
        next_sample, since = opts.sample_every, 0
        while not all(task.done() for task in loops):
            load.progressed.clear()
            if len(load.done) >= next_sample:
                rows.append(await sample(server, pg, load, since, started, 'load'))
                print_row(rows[-1])
                since, next_sample = rows[-1]['turns'], next_sample + opts.sample_every
            if load.pause_at is not None and len(load.done) >= load.pause_at and load.in_flight == 0:
                rows.append(await idle_sample(server, pg, load, started, 'idle-warm', opts.idle_seconds))
                print_row(rows[-1])
                await server.rebase()
                load.pause_at = None
            try:
                await asyncio.wait_for(load.progressed.wait(), 1.0)
            except TimeoutError:
                pass
        for task in loops:
            task.result()  # a loop that died of a bug in this script: say so
    if len(load.done) > since:
        rows.append(await sample(server, pg, load, since, started, 'load'))
        print_row(rows[-1])
    rows.append(await idle_sample(server, pg, load, started, 'idle-end', opts.idle_seconds))
    print_row(rows[-1])
    for line in rows[-1].get('tracemalloc_lines', []):
        print(f'  allocated since the warm-up and alive: {line}')
    outcomes = Counter(op.outcome for op in load.done)
    print(f'outcomes: {dict(outcomes)}')
    return rows


async def idle_sample(server: Server, pg: PgProbe, load: Load, started: float, label: str, wait: float) -> dict:
    """A sample with nothing in flight, once the server's post-turn work had `wait` seconds to finish."""
    await asyncio.sleep(wait)
    row = await sample(server, pg, load, len(load.done), started, label)
    return row


COLUMNS: list[tuple[str, str]] = [
    ('sample', 'label'), ('turns', 'turns'), ('s', 'elapsed_s'), ('RSS MiB', 'rss_mib'), ('anon MiB', 'anon_mib'),
    ('fds', 'fds'), ('thr', 'threads'), ('tasks', 'tasks'), ('gc objs', 'gc_objects'), ('pg', 'pg_conns'),
    ('pg act', 'pg_active'), ('pg idle-tx', 'pg_idle_in_tx'), ('pool', 'pool_held'), ('bg', 'bg_running'),
    ('p50 ms', 'all_p50_ms'), ('p99 ms', 'all_p99_ms'),
    ('json p50', 'json_p50_ms'), ('stream p50', 'stream_p50_ms'), ('read p50', 'read_p50_ms'),
    ('CPU ms/op', 'cpu_ms_per_op'), ('drops', 'disconnects'), ('errors', 'errors'), ('load', 'load_1m'),
    ('traced KiB', 'traced_kib'),
]  # fmt: skip
_printed_header = False
_previous: dict[str, Any] = {}


def print_row(row: dict[str, Any]) -> None:
    """Print a sample as it is taken (a header first), with the derived columns added to the row."""
    global _printed_header, _previous
    row['rss_mib'] = round(row['rss_kib'] / 1024, 1)
    row['anon_mib'] = round(row['anon_kib'] / 1024, 1)
    if _previous and row['turns'] > _previous['turns']:
        cpu_s, ops = row['cpu_s'] - _previous['cpu_s'], row['turns'] - _previous['turns']
        row['cpu_ms_per_op'] = round(1000 * cpu_s / ops, 1)
    _previous = row
    cells = ['-' if row.get(key) is None else str(row.get(key)) for _, key in COLUMNS]
    widths = [max(len(header), 7) for header, _ in COLUMNS]
    if not _printed_header:
        print('  '.join(header.rjust(w) for (header, _), w in zip(COLUMNS, widths, strict=True)))
        _printed_header = True
    print('  '.join(cell.rjust(w) for cell, w in zip(cells, widths, strict=True)), flush=True)


def verdict(rows: list[dict[str, Any]], opts: argparse.Namespace) -> dict[str, Any]:
    """RSS growth per 1,000 operations after the warm-up, the idle samples compared, latency first vs last window."""
    after = [r for r in rows if r['label'] == 'load' and r['turns'] > opts.warmup]
    summary: dict[str, Any] = {'samples_after_warmup': len(after)}
    for key in ('rss_kib', 'anon_kib'):
        slope = _slope([r['turns'] for r in after], [r[key] for r in after])
        summary[f'{key.removesuffix("_kib")}_growth_kib_per_1000'] = None if slope is None else round(slope * 1000, 1)
    # A step early after the warm-up (the allocator's arenas) weighs on the fit: the second half shows if it goes on.
    half = after[len(after) // 2 :]
    slope = _slope([r['turns'] for r in half], [r['rss_kib'] for r in half])
    summary['rss_growth_kib_per_1000_second_half'] = None if slope is None else round(slope * 1000, 1)
    if after:
        summary['rss_mib_first_last_after_warmup'] = [after[0]['rss_mib'], after[-1]['rss_mib']]
    start = next(r for r in rows if r['label'] == 'idle-start')
    warm = next((r for r in rows if r['label'] == 'idle-warm'), None)
    end = next(r for r in rows if r['label'] == 'idle-end')
    summary['rss_mib_start_end'] = [start['rss_mib'], end['rss_mib']]
    compare = warm or start
    for key in ('fds', 'threads', 'tasks', 'gc_objects', 'pg_conns', 'pool_held', 'pg_active', 'pg_idle_in_tx'):
        summary[f'idle_{key}'] = [compare.get(key), end.get(key)]
    summary['idle_end_background'] = {k: end.get(k) for k in ('bg_running', 'bg_queued', 'bg_failed')}
    if len(after) >= 2:
        for key in ('all_p50_ms', 'all_p99_ms', 'stream_p50_ms', 'json_p50_ms', 'read_p50_ms', 'cpu_ms_per_op'):
            summary[f'{key}_first_last'] = [after[0].get(key), after[-1].get(key)]
    summary['errors'] = sum(r['errors'] for r in rows)
    summary['disconnects'] = sum(r['disconnects'] for r in rows)
    findings = []
    growth = summary['rss_growth_kib_per_1000']
    if growth is not None and growth > opts.leak_kib_per_1000:
        findings.append(f'RSS +{growth:.0f} KiB per 1,000 operations after the warm-up (> {opts.leak_kib_per_1000:g})')
    # The pool opens connections as the load needs them (up to its size and overflow): more of them at the end is no
    # leak; a connection the server holds outside its pool, or one busy with nothing in flight, is.
    # Threads are left out: the default executor starts its threads as the load first needs them.
    for key in ('fds', 'tasks', 'pg_active', 'pg_idle_in_tx', 'pool_out'):
        before, now = compare.get(key), end.get(key)
        if before is not None and now is not None and now > before:
            findings.append(f'idle {key}: {before} after the warm-up, {now} at the end')
    if end.get('pool_held') is not None and end['pg_conns'] > end['pool_held']:
        findings.append(f'{end["pg_conns"]} connections to PostgreSQL at the end, {end["pool_held"]} in the pool')
    if end.get('bg_running') or end.get('bg_queued'):
        findings.append(f'background work still running at the end: {summary["idle_end_background"]}')
    first, last = summary.get('cpu_ms_per_op_first_last', [None, None])
    if first and last and last > first * opts.slowdown_ratio:
        findings.append(f'server CPU per operation {first} ms in the first window after the warm-up, {last} last')
    if summary['errors']:
        findings.append(f'{summary["errors"]} operations failed')
    summary['findings'] = findings
    summary['verdict'] = 'no leak or slowdown found' if not findings else 'look: ' + '; '.join(findings)
    return summary


def _slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return None if not var else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def mix(value: str) -> dict[str, float]:
    """Parse `json=4,stream=4,read=2` (weights; a kind left out weighs 0)."""
    weights = dict.fromkeys(OPS, 0.0)
    for part in value.split(','):
        name, _, weight = part.partition('=')
        if name.strip() not in weights:
            raise argparse.ArgumentTypeError(f'unknown operation {name.strip()!r}: one of {", ".join(OPS)}')
        weights[name.strip()] = float(weight)
    if not any(weights.values()):
        raise argparse.ArgumentTypeError('every weight is 0')
    return weights


def parse_args() -> argparse.Namespace:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument('--out', type=Path, default=ROOT / 'bench-results' / 'soak_serve.json', help='JSON output path')
    args.add_argument('--quick', action='store_true', help='tiny parameters, for a smoke run')
    args.add_argument('--turns', type=int, default=10_000, help='operations in all (turns and reads)')
    args.add_argument('--concurrency', type=int, default=8, help='closed loops driving the server at once')
    args.add_argument('--mix', type=mix, default=mix('json=4,stream=4,read=2'), help='weights: json=,stream=,read=')
    args.add_argument('--new-share', type=float, default=0.25, help='share of turns that start a new conversation')
    args.add_argument('--max-conversation-turns', type=int, default=30, help='a new conversation after this many')
    args.add_argument('--read-limit', type=int, default=60, help='messages per conversation read (?limit=)')
    args.add_argument(
        '--disconnect-share', type=float, default=0.0, help='share of streamed chats the client drops mid-stream'
    )
    args.add_argument('--sample-every', type=int, default=500, help='operations between two samples')
    args.add_argument('--warmup', type=int, default=None, help='operations before the growth is measured (20%%)')
    args.add_argument('--idle-seconds', type=float, default=5.0, help='wait before an idle sample')
    args.add_argument('--leak-kib-per-1000', type=float, default=256.0, help='RSS growth called a leak')
    args.add_argument('--slowdown-ratio', type=float, default=1.25, help='CPU per op, last/first window, called slow')
    args.add_argument('--data-dir', type=Path, help='where the embedded PostgreSQL lives (default: a new temp dir)')
    args.add_argument('--no-probe', action='store_true', help='run plain `agentrt serve`: no task or gc counts')
    args.add_argument(
        '--tracemalloc', type=int, default=0, metavar='FRAMES', help='trace allocations in the server after the warm-up'
    )
    args.add_argument('--seed', type=int, default=1)
    opts = args.parse_args()
    if opts.quick:
        opts.turns, opts.concurrency, opts.sample_every, opts.warmup, opts.idle_seconds = 60, 2, 20, 20, 1.0
    if opts.warmup is None:
        opts.warmup = opts.turns // 5
    return opts


async def setup(env: dict[str, str], prefix: str) -> tuple[str, dict[str, Any], Any]:
    """Start the embedded server in this process, seed the demo accounts, make a key; close this process's pool."""
    sys.path.insert(0, str(ROOT / 'scripts'))
    from bench_common import machine_info, start_database

    from agentrt.db.engine import close_database, get_engine
    from agentrt.db.session import Unscoped, get_db_session
    from agentrt.services.api_keys import create_api_key
    from agentrt.services.demo_data import MEDICAL_ACCOUNT, seed_demo_data

    os.environ.update(env)
    await start_database(pool_size=2, max_overflow=0, pool_timeout=30)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await seed_demo_data(session=session)
        key = (await create_api_key(session=session, account=MEDICAL_ACCOUNT, name=prefix)).token
    machine = await machine_info()
    url = get_engine().url
    await close_database()  # this process's connections would count as the server's
    return key, machine, url


async def main(opts: argparse.Namespace) -> None:
    if opts.data_dir is None:
        root = Path(tempfile.mkdtemp(prefix='soak-serve-'))
        atexit.register(shutil.rmtree, root, True)  # registered first, so it runs after the embedded server stops
    else:
        root = opts.data_dir
        root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    env = {k: v for k, v in os.environ.items() if k != 'DATABASE_URL'}
    env |= {'AGENTRT_DATA_DIR': str(root / 'pgdata'), 'AGENTRT_LEDGER_SPOOL': str(root / 'ledger-spool.jsonl')}
    env.setdefault('AGENTRT_MODEL', 'demo')
    prefix = f'soak-{uuid.uuid4().hex[:8]}'
    key, machine, url = await setup(env, prefix)
    config = {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(opts).items() if k not in ('out', 'quick')}
    config['server'] = 'agentrt serve, one process, default settings, model demo; client httpx2 in this process'
    print('Soak: agentrt serve with the demo model')
    for name, value in (config | machine).items():
        print(f'  {name}: {value}')
    server = Server(root, env, probe=not opts.no_probe, tracemalloc_frames=opts.tracemalloc)
    pg = PgProbe(url)
    try:
        import httpx2

        await server.wait_up(httpx2)
        await pg.open()
        rows = await soak(opts, server, pg, key, prefix)
    finally:
        from bench_common import run_clean_up

        stopped: list[int | None] = []

        async def stop_server() -> None:
            stopped.append(await server.stop())

        # To its end whatever stops the soak meanwhile: killed by SIGTERM, it left its server running (QA).
        await run_clean_up(pg.close, stop_server)
        code = stopped[0]
        print(f'server exited with {code} (log: {server.log_path})')
    summary = verdict(rows, opts)
    summary['server_exit_code'] = code
    machine['load_average_at_end'] = [round(x, 2) for x in os.getloadavg()]
    for name, value in summary.items():
        if name != 'findings':
            print(f'{name}: {value}')
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {'benchmark': 'soak_serve', 'config': config, 'machine': machine, 'results': rows, 'summary': summary}
    opts.out.write_text(json.dumps(payload, indent=2, default=str) + '\n')
    print(f'figures written to {opts.out}')


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--serve-child':
        serve_child(sys.argv[2:])
    else:
        from bench_common import run_benchmark  # here: the server's child needs none of it

        run_benchmark(lambda: asyncio.run(main(parse_args())), interrupted=INTERRUPTED)
