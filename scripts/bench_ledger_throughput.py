"""Benchmark 4: LLM ledger throughput. W concurrent writers (1 to 500) record billing rows through the tracker.

Each writer calls `LLMRequestTracker.track_request()` (the public write API: returns once the row is durable)
back to back for a window. Reported per level: rows/s, p50/p99 write latency, the tracker's group-commit batch
size, and a check in the database after the level: rows present, duplicates, rows lost (none may be).

Run (embedded PostgreSQL unless DATABASE_URL is set):
    .venv/bin/python scripts/bench_ledger_throughput.py [--writers 1,10,50,200,500] [--window 4]
"""

from __future__ import annotations

import asyncio
import atexit
import shutil
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

from bench_common import (
    closed_loop,
    delete_ledger_rows,
    int_list,
    machine_info,
    ms,
    non_negative_int,
    parser,
    percentile,
    positive_float,
    print_config,
    print_table,
    run_benchmark,
    run_clean_up,
    start_database,
    write_results,
)
from sqlalchemy import text

from agentrt.db.engine import close_database
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import LedgerConfig, LedgerRecord, LLMRequestTracker, new_request_id, utc_now

ACCOUNT = 'bench-ledger'  # every row this benchmark writes carries it, and is deleted at the end


def record(level: str, content_bytes: int) -> LedgerRecord:
    """A realistic billing row: tokens, costs, timings and identity."""
    now = utc_now()
    row = LedgerRecord(
        id=new_request_id(),
        model='gpt-4o-mini',
        streamed=False,
        status='complete',
        success=True,
        latency_ms=812.5,
        started_at=now - timedelta(milliseconds=812),
        finished_at=now,
        run_id=level,
        run_step=1,
        chat_session_id=f'bench-{uuid.uuid4().hex[:8]}',
        account_id=1,
        account_slug=ACCOUNT,
        agent_instance_id=1,
        agent_instance_slug='bench',
        agent_type='simple_chat',
        provider='openai',
        response_model='gpt-4o-mini-2024-07-18',
        input_tokens=1200,
        output_tokens=80,
        total_tokens=1280,
        finish_reason='stop',
    )
    if content_bytes:
        row.raw_contents = [('prompt', 'p' * content_bytes), ('response', 'r' * content_bytes)]
    return row


async def run_level(tracker: LLMRequestTracker, writers: int, window: float, content_bytes: int) -> dict:
    """`writers` tasks write rows back to back for `window` seconds; then the rows are counted in the database."""
    level = f'bench-{writers}-{uuid.uuid4().hex[:8]}'
    batches, written = tracker.stats.batches, tracker.stats.written
    run = await closed_loop(writers, window, lambda _: tracker.track_request(record(level, content_bytes)))
    await tracker.flush()
    batches, written = tracker.stats.batches - batches, tracker.stats.written - written
    async with get_db_session(account=Unscoped.ADMIN) as session:
        query = text('SELECT count(*), count(DISTINCT id) FROM llm_requests WHERE run_id = :r')
        present, distinct = (await session.execute(query, {'r': level})).one()
    submitted = sum(run.outcomes.values()) + sum(run.failures.values())
    return {
        'writers': writers,
        'rows': submitted,
        'rows_per_s': round(submitted / run.elapsed_s),
        'p50_ms': ms(percentile(run.latencies, 50)),
        'p99_ms': ms(percentile(run.latencies, 99)),
        'mean_batch_rows': round(written / batches, 1) if batches else None,
        'outcomes': dict(run.outcomes),
        'errors': dict(run.failures),
        'rows_in_db': present,
        'duplicates': present - distinct,
        'lost': submitted - run.outcomes['spooled'] - present,
        'cpu_ms_per_row': round(1000 * run.cpu_s / max(submitted, 1), 3),
        'elapsed_s': round(run.elapsed_s, 2),
    }


COLUMNS = [
    ('writers', 'writers'), ('rows', 'rows'), ('rows/s', 'rows_per_s'), ('p50 ms', 'p50_ms'), ('p99 ms', 'p99_ms'),
    ('rows/commit', 'mean_batch_rows'), ('in DB', 'rows_in_db'),
    ('spooled', lambda r: r['outcomes'].get('spooled', 0)), ('duplicates', 'duplicates'), ('lost', 'lost'),
    ('CPU ms/row', 'cpu_ms_per_row'),
]  # fmt: skip


async def main() -> None:
    args = parser(__doc__.splitlines()[0], 'ledger_throughput')
    args.add_argument('--writers', type=int_list, default=[1, 10, 50, 200, 500], help='concurrent writers per level')
    args.add_argument('--window', type=positive_float, default=4.0, help='seconds each level writes for')
    args.add_argument(
        '--content-bytes', type=non_negative_int, default=0, help='also store a prompt and a response of this size'
    )
    opts = args.parse_args()
    if opts.quick:
        opts.writers, opts.window = [1, 4], 0.3
    await start_database(pool_size=20, max_overflow=10, pool_timeout=10)
    spool_dir = Path(tempfile.mkdtemp(prefix='bench-ledger-spool-'))
    atexit.register(shutil.rmtree, spool_dir, True)  # at exit, after the tracker's close: each run left one (QA)
    tracker = LLMRequestTracker(LedgerConfig(spool_path=spool_dir / 'ledger.jsonl'))
    config = {'writers': opts.writers, 'window_s': opts.window, 'content_bytes_per_body': opts.content_bytes}
    config |= {'max_batch_rows': tracker.config.max_batch_rows, 'pool_size': 20, 'max_overflow': 10}
    try:
        machine = await machine_info()
        print_config('Benchmark 4: ledger throughput through LLMRequestTracker.track_request', config | machine)
        await run_level(tracker, 10, min(opts.window, 0.5), 0)  # warm up: connections, code paths
        rows = []
        for writers in opts.writers:
            rows.append(await run_level(tracker, writers, opts.window, opts.content_bytes))
            print(f'  {writers} writers: {rows[-1]["rows_per_s"]} rows/s')
        print_table(rows, COLUMNS)
        at200 = next((r for r in rows if r['writers'] == 200), None)
        summary = {
            'rows_per_s_at_200_writers': at200 and at200['rows_per_s'],
            'target_3000_rows_per_s_at_200': None if at200 is None else at200['rows_per_s'] >= 3000,
            'lost_total': sum(r['lost'] for r in rows),
            'duplicates_total': sum(r['duplicates'] for r in rows),
            'tracker_stats': tracker.stats.as_dict(),
        }
        print('summary:', {k: v for k, v in summary.items() if k != 'tracker_stats'})
        write_results(opts.out, 'ledger_throughput', config, machine, rows, summary)
    finally:
        await run_clean_up(tracker.aclose, delete_rows, close_database)


async def delete_rows() -> None:
    """Remove the rows the run wrote (its account's)."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await delete_ledger_rows(session, 'r.account_slug = :a', {'a': ACCOUNT})


if __name__ == '__main__':
    run_benchmark(lambda: asyncio.run(main()))
