"""Benchmark 15: what holds `agentrt serve`'s event loop, request by request, on large data.

One worker process serves every chat on one event loop: a request whose CPU work runs on that loop (a long
conversation validated and dumped in one call) makes every other request of the process wait, `/health/live`
included. The script starts `agentrt serve` (one process) as a child on a free loopback port, on the embedded
PostgreSQL (`AGENTRT_DATA_DIR`, else its own `bench-pgdata`) or the server in `DATABASE_URL`, makes the data fast
with SQL (a conversation of `--turns` turns, `--conversations` conversations, `--ledger-rows` ledger rows, each copied
from one real demo turn), then sends each request of the scenario list alone (`--repeat` times, the worst kept) while
a probe polls `/health/live` every 10 ms on a connection of its own: the listings, costs, budget and web UI routes, a
turn with a `--message-chars` message, a long conversation's DELETE. Then it stops the server and starts a new one
`--replays` times with `--spool-rows` spooled ledger rows to replay. Per request: its wall time, and the probe's
worst wait while it ran (plus `--settle` s after a turn, for its background work); the probe's median is the floor.

Run:
    .venv/bin/python scripts/bench_loop_stalls.py [--turns 330,700] [--conversations 10000] [--ledger-rows 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from bench_common import (
    delete_chats,
    delete_ledger_rows,
    int_list,
    machine_info,
    ms,
    non_negative_float,
    parser,
    positive_int,
    print_config,
    print_table,
    run_benchmark,
    run_clean_up,
    wait_ready,
    write_results,
)
from sqlalchemy import text

from agentrt.db.engine import close_database, init_database
from agentrt.db.session import Unscoped, get_db_session
from agentrt.db.settings import Settings, default_data_dir
from agentrt.services.api_keys import create_api_key
from agentrt.services.demo_data import MEDICAL_ACCOUNT, seed_demo_data

PREFIX = 'stall'
PROBE_EVERY_S = 0.01
BIG_MESSAGE_CHARS = 1_000_000
"""The large message's default size; the server is configured to take messages twice this long."""


@dataclass
class Probe:
    """`/health/live` polled every 10 ms: (sent, waited) of each answer."""

    samples: list[tuple[float, float]]
    running: bool = True

    async def run(self, url: str) -> None:
        async with httpx2.AsyncClient(base_url=url, timeout=30) as client:
            while self.running:
                sent = time.perf_counter()
                try:
                    await client.get('/health/live')
                except httpx2.TransportError:  # not listening yet
                    await asyncio.sleep(PROBE_EVERY_S)
                    continue
                self.samples.append((sent, time.perf_counter() - sent))
                await asyncio.sleep(max(0.0, PROBE_EVERY_S - (time.perf_counter() - sent)))

    def worst(self, start: float, end: float) -> float:
        """The longest wait of a probe that overlapped [start, end]."""
        return max((waited for sent, waited in self.samples if sent <= end and sent + waited >= start), default=0.0)


def data_dir() -> Path:
    return Path(os.environ.get('AGENTRT_DATA_DIR') or default_data_dir().parent / 'bench-pgdata')


async def setup_account() -> tuple[str, int]:
    """The demo accounts seeded; a key of the medical account and its id."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        await seed_demo_data(session=session)
        key = await create_api_key(session=session, account=MEDICAL_ACCOUNT, name='bench-loop-stalls')
        account_id = await session.execute(text('SELECT id FROM accounts WHERE slug = :s'), {'s': MEDICAL_ACCOUNT})
        return key.token, int(account_id.scalar_one())


async def forget_key(token: str) -> None:
    """Delete the run's API key: left in place, each run added a live key (scopes chat and read) to the medical
    account of the database it ran on, the user's own when `AGENTRT_DATA_DIR` or `DATABASE_URL` names it."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text('DELETE FROM api_keys WHERE prefix = :p'), {'p': token.split('_')[1]})


async def template_entries(conversation: str) -> list[dict[str, Any]]:
    """The entries of `conversation`, oldest first."""
    walk = text(
        'WITH RECURSIVE chain(id, parent_id, kind, message, depth) AS ('
        ' SELECT e.id, e.parent_id, e.kind, e.message, 0 FROM conversation_entries e'
        ' JOIN conversations c ON c.head_id = e.id AND c.account_id = e.account_id WHERE c.conversation_id = :c'
        ' UNION ALL SELECT e.id, e.parent_id, e.kind, e.message, chain.depth + 1 FROM conversation_entries e'
        ' JOIN chain ON e.id = chain.parent_id)'
        ' SELECT id, kind, message::text AS message FROM chain ORDER BY depth DESC'
    )
    async with get_db_session(account=Unscoped.OWNER) as session:
        return [dict(row._mapping) for row in await session.execute(walk, {'c': conversation})]


async def copy_conversation(
    template: str, new: str, account_id: int, entries: list[dict[str, Any]], turns: int
) -> None:
    """`new`: the entries of `template` (one turn) repeated `turns` times, as one conversation."""
    rows, parent = [], None
    for turn in range(turns):
        for n, entry in enumerate(entries):
            entry_id = f'{PREFIX}-{uuid.uuid4().hex[:16]}-{turn}-{n}'
            rows.append({'id': entry_id, 'a': account_id, 'p': parent, 'k': entry['kind'], 'm': entry['message']})
            parent = entry_id
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(
            text(
                'INSERT INTO conversation_entries (id, account_id, parent_id, kind, message) '
                'SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:as AS bigint[]), CAST(:ps AS text[]), '
                'CAST(:ks AS text[]), CAST(:ms AS jsonb[]))'
            ),
            {
                'ids': [r['id'] for r in rows],
                'as': [r['a'] for r in rows],
                'ps': [r['p'] for r in rows],
                'ks': [r['k'] for r in rows],
                'ms': [r['m'] for r in rows],
            },
        )
        await session.execute(
            text(
                'INSERT INTO conversations (account_id, conversation_id, scope, head_id, revision, record, title, '
                'summary) SELECT account_id, CAST(:new AS text), scope, CAST(:head AS text), revision, '
                'jsonb_set(jsonb_set(record, '
                "'{conversation_id}', to_jsonb(CAST(:new AS text))), '{head_id}', to_jsonb(CAST(:head AS text))), "
                'title, summary FROM conversations WHERE conversation_id = :t'
            ),
            {'new': new, 'head': parent, 't': template},
        )


async def many_conversations(template: str, count: int) -> None:
    """`count` conversations of one turn each, copies of `template`, created a minute apart."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(
            text(
                "INSERT INTO conversation_entries (id, account_id, parent_id, kind, message) SELECT e.id || '-m' || g, "
                "e.account_id, e.parent_id || '-m' || g, e.kind, e.message FROM conversation_entries e "
                'CROSS JOIN generate_series(1, :n) g WHERE e.id IN (WITH RECURSIVE chain(id, parent_id) AS ('
                ' SELECT e2.id, e2.parent_id FROM conversation_entries e2 JOIN conversations c ON c.head_id = e2.id'
                ' AND c.account_id = e2.account_id WHERE c.conversation_id = :t UNION ALL SELECT e3.id, e3.parent_id'
                ' FROM conversation_entries e3 JOIN chain ON e3.id = chain.parent_id) SELECT id FROM chain)'
            ),
            {'n': count, 't': template},
        )
        await session.execute(
            text(
                'INSERT INTO conversations (account_id, conversation_id, scope, head_id, revision, record, title, '
                "summary, created_at, updated_at) SELECT account_id, CAST(:p AS text) || '-many-' || g, scope, "
                "head_id || '-m' || g, revision, jsonb_set(jsonb_set(record, '{conversation_id}', "
                "to_jsonb(CAST(:p AS text) || '-many-' || g)), "
                "'{head_id}', to_jsonb(head_id || '-m' || g)), title, summary, now() - g * interval '1 minute', "
                "now() - g * interval '1 minute' FROM conversations CROSS JOIN generate_series(1, :n) g "
                'WHERE conversation_id = :t'
            ),
            {'n': count, 't': template, 'p': PREFIX},
        )


async def big_ledger(template_session: str, count: int) -> None:
    """`count` ledger rows, copies of the template conversation's first request, 10 s apart over the last days."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        columns = [
            row[0]
            for row in await session.execute(
                text("SELECT column_name FROM information_schema.columns WHERE table_name = 'llm_requests'")
            )
        ]
        made = {
            'id': 'gen_random_uuid()',
            'started_at': "now() - g * interval '10 seconds'",
            'finished_at': "now() - g * interval '10 seconds' + interval '1 second'",
            'recorded_at': "now() - g * interval '10 seconds' + interval '1 second'",
            'chat_session_id': f"'{PREFIX}-ledger-' || (g % 500)",
            'conversation_id': f"'{PREFIX}-ledger-' || (g % 500)",
        }
        select = ', '.join(made.get(column, column) for column in columns)
        await session.execute(
            text(
                f'INSERT INTO llm_requests ({", ".join(columns)}) SELECT {select} FROM (SELECT * FROM llm_requests '
                'WHERE chat_session_id = :t ORDER BY started_at LIMIT 1) r CROSS JOIN generate_series(1, :n) g'
            ),
            {'t': template_session, 'n': count},
        )
        await session.execute(text('ANALYZE llm_requests'))


async def clean_up() -> None:
    """Delete what runs of this benchmark stored: their ledger rows (and rollup usage), their conversations with all
    their entries, walked from each head as `delete_chats` does (deleting only entries no conversation pointed at
    left the older entries of its real turns, 24 a run: QA)."""
    await delete_chats(PREFIX)


class Server:
    """`agentrt serve` as a child process."""

    def __init__(self, root: Path, spool: Path) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(('127.0.0.1', 0))
            self.port = int(probe.getsockname()[1])
        self.url = f'http://127.0.0.1:{self.port}'
        env = {
            **os.environ,
            'AGENTRT_DATA_DIR': str(data_dir()),
            'AGENTRT_MESSAGE_MAX_CHARS': str(2 * BIG_MESSAGE_CHARS),
            'AGENTRT_CONTEXT_MAX_TOKENS': str(BIG_MESSAGE_CHARS),
            'AGENTRT_HTTP_MAX_BODY_BYTES': str(4 * BIG_MESSAGE_CHARS),
            'AGENTRT_TURN_TOTAL_TOKENS_LIMIT': str(20 * BIG_MESSAGE_CHARS),
            'AGENTRT_LEDGER_SPOOL': str(spool),
        }
        self.log_path = root / 'server.log'
        self.log = self.log_path.open('a')
        command = [sys.executable, '-m', 'agentrt', 'serve', '--port', str(self.port), '--log-level', 'warning']
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    async def wait_up(self) -> None:
        await wait_ready(httpx2, self.url, self.process, seconds=120, exited=lambda: f'see {self.log_path}')

    async def stop(self) -> float:
        """Stop it (SIGTERM); how long it took to exit."""
        if self.process.poll() is not None:
            return 0.0
        started = time.perf_counter()
        self.process.terminate()
        await asyncio.to_thread(self.process.wait, 60)
        self.log.close()
        return time.perf_counter() - started


async def write_spool(template: str, path: Path, count: int) -> None:
    """`count` spooled ledger rows (with their contents), copies of the template conversation's first request, as
    a server that lost its database leaves them."""
    from agentrt.services.ledger._record import ROW_FIELDS, SPOOL_FORMAT_VERSION, row_to_json
    from agentrt.services.ledger._spool import LedgerSpool

    async with get_db_session(account=Unscoped.OWNER) as session:
        found = await session.execute(
            text('SELECT * FROM llm_requests WHERE chat_session_id = :t ORDER BY started_at LIMIT 1'), {'t': template}
        )
        row = dict(found.one()._mapping)
        contents = [
            dict(content._mapping)
            for content in await session.execute(
                text(
                    'SELECT kind, body, size_bytes, truncated, redactions FROM llm_request_contents '
                    'WHERE request_id = :r'
                ),
                {'r': row['id']},
            )
        ]
    base = row_to_json({name: row[name] for name in ROW_FIELDS})
    entries = [
        {
            'v': SPOOL_FORMAT_VERSION,
            'row': base | {'id': str(uuid.uuid4()), 'chat_session_id': f'{PREFIX}-spool-{n % 100}'},
            'contents': contents,
        }
        for n in range(count)
    ]
    await asyncio.to_thread(LedgerSpool(path).append, entries)


async def largest_request(conversation: str) -> str:
    """The id of the ledger row of `conversation` whose stored contents are the largest."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        found = await session.execute(
            text(
                'SELECT r.id FROM llm_requests r JOIN llm_request_contents c ON c.request_id = r.id '
                'WHERE r.chat_session_id = :c GROUP BY r.id ORDER BY sum(c.size_bytes) DESC LIMIT 1'
            ),
            {'c': conversation},
        )
        return str(found.scalar_one())


async def count_rows(pattern: str) -> int:
    async with get_db_session(account=Unscoped.OWNER) as session:
        found = await session.execute(
            text('SELECT count(*) FROM llm_requests WHERE chat_session_id LIKE :p'), {'p': pattern}
        )
        return int(found.scalar_one())


async def measure_replay(root: Path, spool: Path, template: str, count: int) -> list[dict[str, Any]]:
    """A server started with `count` spooled rows to replay: the probe's worst wait from its first answer until
    every row is in the database, then the server's stop."""
    await write_spool(template, spool, count)
    server = Server(root, spool)
    probe = Probe([])
    probing = asyncio.create_task(probe.run(server.url))
    rows = []
    try:
        started = time.perf_counter()
        await server.wait_up()
        while await count_rows(f'{PREFIX}-spool-%') < count:
            if time.perf_counter() - started > 600:
                raise RuntimeError('the spool was not replayed within 600 s')
            await asyncio.sleep(0.2)
        end = time.perf_counter()
        first = min((sent for sent, _ in probe.samples), default=end)
        rows.append(
            {
                'request': f'start with {count:,} spooled rows: replayed',
                'status': None,
                'bytes': None,
                'wall_ms': ms(end - first),
                'worst_live_ms': ms(probe.worst(first, end)),
            }
        )
    finally:
        probe.running = False
        await probing
        stopped = 0.0

        async def stop() -> None:
            nonlocal stopped
            stopped = await server.stop()

        await run_clean_up(stop)  # to its end: the server's replayed rows are deleted next
    rows.append({'request': 'stop (SIGTERM) after the replay', 'wall_ms': ms(stopped)})
    return rows


async def measure(
    client: httpx2.AsyncClient, probe: Probe, label: str, method: str, path: str, settle: float, **kwargs: Any
) -> dict[str, Any]:
    await asyncio.sleep(0.3)  # the probe's floor between requests
    start = time.perf_counter()
    response = await client.request(method, path, **kwargs)
    body = await response.aread()
    end = time.perf_counter()
    if settle:
        await asyncio.sleep(settle)
    worst = probe.worst(start, end + settle)
    return {
        'request': label,
        'status': response.status_code,
        'bytes': len(body),
        'wall_ms': ms(end - start),
        'worst_live_ms': ms(worst),
    }


async def main() -> None:
    args = parser(__doc__.splitlines()[0], 'loop_stalls')
    args.add_argument('--turns', type=int_list, default=[330, 700], help='turns of the long conversations')
    args.add_argument('--conversations', type=positive_int, default=10_000)
    args.add_argument('--ledger-rows', type=positive_int, default=100_000)
    args.add_argument('--spool-rows', type=positive_int, default=20_000, help='spooled ledger rows replayed at a start')
    args.add_argument(
        '--message-chars', type=positive_int, default=BIG_MESSAGE_CHARS, help='the large message of a turn'
    )
    args.add_argument(
        '--replays', type=positive_int, default=3, help='starts with a spool to replay (each a new server)'
    )
    args.add_argument('--settle', type=non_negative_float, default=1.0, help='s after a turn: its background work')
    args.add_argument('--repeat', type=positive_int, default=3, help='each request this many times (the worst counts)')
    opts = args.parse_args()
    if opts.quick:
        opts.turns, opts.conversations, opts.ledger_rows, opts.repeat, opts.settle = [20], 50, 500, 1, 0.2
        opts.spool_rows, opts.replays, opts.message_chars = 200, 1, 100_000
    config = {
        'turns': opts.turns,
        'conversations': opts.conversations,
        'ledger_rows': opts.ledger_rows,
        'spool_rows': opts.spool_rows,
        'replays': opts.replays,
        'message_chars': opts.message_chars,
        'repeat': opts.repeat,
        'probe': '/health/live every 10 ms',
    }
    print_config('Event-loop stalls of `agentrt serve` on large data', config)
    with tempfile.TemporaryDirectory(prefix='bench-loop-stalls-') as scratch:
        await run(opts, config, Path(scratch))


async def run(opts: argparse.Namespace, config: dict[str, Any], root: Path) -> None:
    """The whole run, its server's log and spool in `root`."""
    await init_database(Settings(data_dir=data_dir()))
    token, account_id = await setup_account()
    await clean_up()
    spool = root / 'ledger-spool.jsonl'
    server = Server(root, spool)
    rows: list[dict[str, Any]] = []
    try:
        await server.wait_up()
        headers = {'Authorization': f'Bearer {token}'}
        async with httpx2.AsyncClient(base_url=server.url, timeout=120, headers=headers) as client:
            template = f'{PREFIX}-template'
            reply = await client.post(
                f'/api/v1/conversations/{template}/turns', json={'message': 'Cardiologists in Seattle'}
            )
            reply.raise_for_status()
            await asyncio.sleep(1.0)  # its title and summary (post-turn work)
            entries = await template_entries(template)
            for turns in opts.turns:
                await copy_conversation(template, f'{PREFIX}-long-{turns}', account_id, entries, turns)
            await many_conversations(template, opts.conversations)
            await big_ledger(template, opts.ledger_rows)
            probe = Probe([])
            probing = asyncio.create_task(probe.run(server.url))
            settle = opts.settle
            scenarios: list[tuple[str, str, str, float, dict[str, Any]]] = []
            for turns in opts.turns:
                long = f'/api/v1/conversations/{PREFIX}-long-{turns}'
                scenarios += [
                    (f'GET conversation {turns} turns, vercel', 'GET', long, 0, {}),
                    (f'GET conversation {turns} turns, pydantic', 'GET', long, 0, {'params': {'format': 'pydantic'}}),
                    (f'GET conversation {turns} turns, limit 100', 'GET', long, 0, {'params': {'limit': 100}}),
                ]
            n = opts.conversations
            scenarios += [
                (
                    f'GET conversations (of {n:,}), limit 100',
                    'GET',
                    '/api/v1/conversations',
                    0,
                    {'params': {'limit': 100}},
                ),
                (
                    f'GET conversations (of {n:,}), updated, limit 100',
                    'GET',
                    '/api/v1/conversations',
                    0,
                    {'params': {'limit': 100, 'order': 'updated'}},
                ),
                (
                    f'GET interactions (of {opts.ledger_rows:,}), page 1 of 100',
                    'GET',
                    '/api/v1/llm-audit/interactions',
                    0,
                    {'params': {'page_size': 100}},
                ),
                (
                    'GET interactions, page 500 of 100',
                    'GET',
                    '/api/v1/llm-audit/interactions',
                    0,
                    {'params': {'page_size': 100, 'page': 500}},
                ),
                ('GET costs by day (ledger)', 'GET', '/api/v1/costs', 0, {'params': {'by': 'day'}}),
                ('GET costs by model (ledger)', 'GET', '/api/v1/costs', 0, {'params': {'by': 'model'}}),
                ('GET costs by day (rollup)', 'GET', '/api/v1/costs', 0, {'params': {'by': 'day', 'source': 'rollup'}}),
                ('GET budget', 'GET', '/api/v1/budget', 0, {}),
                ('GET /me', 'GET', '/api/v1/me', 0, {}),
                ('GET / (web UI)', 'GET', '/', 0, {}),
            ]
            for label, method, path, wait, kwargs in scenarios:
                worst: dict[str, Any] | None = None
                for _ in range(opts.repeat):
                    row = await measure(client, probe, label, method, path, wait, **kwargs)
                    if worst is None or row['worst_live_ms'] > worst['worst_live_ms']:
                        worst = row
                assert worst is not None
                rows.append(worst)
                print(worst, flush=True)
            for i in range(opts.repeat):
                big = 'x' * 10 + ' '.join(['lorem ipsum dolor sit amet'] * (opts.message_chars // 27))
                row = await measure(
                    client,
                    probe,
                    f'POST turn, {len(big):,}-char message (+{settle:g} s after)',
                    'POST',
                    f'/api/v1/conversations/{PREFIX}-big-{i}/turns',
                    settle,
                    json={'message': big},
                )
                rows.append(row)
                print(row, flush=True)
            big_conversation = f'/api/v1/conversations/{PREFIX}-big-0'
            interaction = await largest_request(f'{PREFIX}-big-0')
            follow_ups = [
                (
                    'POST turn after the large one (+settle)',
                    'POST',
                    f'{big_conversation}/turns',
                    settle,
                    {'json': {'message': 'Cardiologists in Seattle'}},
                ),
                ('GET conversation holding the large message', 'GET', big_conversation, 0, {}),
                (
                    'GET interaction with the large prompt',
                    'GET',
                    f'/api/v1/llm-audit/interactions/{interaction}',
                    0,
                    {},
                ),
            ]
            for label, method, path, wait, kwargs in follow_ups:
                row = await measure(client, probe, label, method, path, wait, **kwargs)
                rows.append(row)
                print(row, flush=True)
            for turns in opts.turns:
                row = await measure(
                    client,
                    probe,
                    f'DELETE conversation {turns} turns',
                    'DELETE',
                    f'/api/v1/conversations/{PREFIX}-long-{turns}',
                    0,
                )
                rows.append(row)
                print(row, flush=True)
            probe.running = False
            await probing
            floor = statistics.median(waited for _, waited in probe.samples)
        stopped = await server.stop()
        rows.append({'request': 'stop (SIGTERM) with the data above', 'wall_ms': ms(stopped)})
        for _ in range(opts.replays):
            async with get_db_session(account=Unscoped.OWNER) as session:
                await delete_ledger_rows(session, 'r.chat_session_id LIKE :p', {'p': f'{PREFIX}-spool-%'})
            for row in await measure_replay(root, spool, template, opts.spool_rows):
                rows.append(row)
                print(row, flush=True)
        machine = await machine_info()
    finally:
        await run_clean_up(server.stop, clean_up, lambda: forget_key(token), close_database)
        log = root / 'server.log'
        if log.exists() and log.stat().st_size:  # warnings and errors only (`--log-level warning`): kept to read
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, opts.out.with_suffix('.server.log'))
            print(f'the server logged something: {opts.out.with_suffix(".server.log")}')
    print(f'\nprobe median (floor): {ms(floor)} ms over {len(probe.samples)} probes')
    print_table(rows, [(c, c) for c in ('request', 'status', 'bytes', 'wall_ms', 'worst_live_ms')])
    write_results(opts.out, 'loop_stalls', config, machine, rows, {'probe_median_ms': ms(floor)})


if __name__ == '__main__':
    run_benchmark(lambda: asyncio.run(main()))
