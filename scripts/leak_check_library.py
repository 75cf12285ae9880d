"""Leak check of the runtime used as a library: `simple_chat` and `simple_chat_stream` over thousands of turns.

Closed loops run turns back to back with the demo planner (`bench_common.demo_planner_model`: the offline demo model,
named `gpt-4o-mini` so genai-prices prices it and the account's budget holds every request) on an embedded
PostgreSQL of the run's own: turns continuing a long conversation, turns each on a new conversation, streamed turns
read to the end or left after the first delta, turns cancelled mid-turn by an `asyncio.timeout`, and turns that fail
(an unknown account). Every `--sample-every` turns it samples this process (RSS, open fds, asyncio tasks, threads,
the pool's checked-out connections) and the database (connections in `pg_stat_activity`, rows left in
`conversation_turns` (claims) and `budget_reservations` (holds)); an idle sample after a `gc.collect()` ends the run,
followed by the checks of what was written: no claim or hold left, the budget's `reserved_usd` back to 0, a ledger
row for every request the model answered, every conversation's history whole (its head reaches its first entry,
user prompt and model response alternating, no entry outside a conversation).

The idle samples list the asyncio tasks still running and where each waits: after the run, only this script's own.

It writes to the database it runs on (the embedded server in `AGENTRT_DATA_DIR` when set, else a `bench-pgdata`
directory of its own beside the default data directory, as the benchmarks do; `DATABASE_URL` if set): the demo data,
and its turns' conversations and ledger rows. The budget it holds the medical account's requests against is its own:
the account's budget (or its having none) is put back as the run ends, on Ctrl-C and SIGTERM too, so the demo
model's turns are not refused afterwards (an unpriced model and a budget: `AGENTRT_BUDGET_UNPRICED=refuse`).

Run (`AGENTRT_DATA_DIR`: a directory of its own):
    AGENTRT_DATA_DIR=/tmp/leak-check/pgdata .venv/bin/python scripts/leak_check_library.py --turns 5000 --concurrency 8
    AGENTRT_DATA_DIR=/tmp/leak-check/pgdata .venv/bin/python scripts/leak_check_library.py --turns 300 --kinds cancelled
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sys
import threading
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (
    bench_data_dir,
    demo_planner_model,
    percentile,
    run_benchmark,
    run_clean_up,
    start_database,
)
from sqlalchemy import text

from agentrt.agents.runtime import shutdown_runtime
from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
from agentrt.db.engine import get_engine
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.budgets import BudgetStatus, Period, account_budget_status, remove_budget, set_budget
from agentrt.services.demo_data import MEDICAL_ACCOUNT, seed_demo_data
from agentrt.services.ledger import existing_request_tracker

KINDS = {'long': 3, 'new': 2, 'stream': 2, 'stream_left': 1, 'cancelled': 1, 'unknown_account': 1}
KIND_HELP = ', '.join(f'{k}={v}' for k, v in KINDS.items())
QUESTION = 'Cardiologists in Seattle who accept Medicare'
HISTORY_SQL = """
WITH RECURSIVE chain AS (
    SELECT c.account_id, c.conversation_id, e.id, e.parent_id, e.message, 1 AS depth
    FROM conversations c JOIN conversation_entries e ON e.account_id = c.account_id AND e.id = c.head_id
  UNION ALL
    SELECT ch.account_id, ch.conversation_id, e.id, e.parent_id, e.message, ch.depth + 1
    FROM chain ch JOIN conversation_entries e ON e.account_id = ch.account_id AND e.id = ch.parent_id
)
SELECT (SELECT count(*) FROM conversations) AS conversations,
       (SELECT count(*) FROM conversation_entries) AS entries,
       (SELECT count(*) FROM chain) AS entries_on_a_chain,
       (SELECT count(*) FROM conversation_entries) - (SELECT count(*) FROM chain) AS entries_off_a_chain,
       (SELECT count(*) FROM chain WHERE parent_id IS NULL) AS roots,
       (SELECT count(*) FROM chain WHERE depth = 1 AND message->>'kind' <> 'response') AS heads_not_a_response,
       (SELECT count(*) FROM chain WHERE parent_id IS NULL AND message->>'kind' <> 'request') AS roots_not_a_request,
       (SELECT count(*) FROM chain ch JOIN conversation_entries p ON p.account_id = ch.account_id
            AND p.id = ch.parent_id WHERE p.message->>'kind' = ch.message->>'kind') AS kinds_not_alternating
"""


class Counted:
    """The demo planner, counting the requests it answered (each must have its ledger row)."""

    def __init__(self, latency: float) -> None:
        self.model = demo_planner_model(latency)
        self.calls = 0
        inner, stream = self.model.function, self.model.stream_function

        async def respond(messages: Any, info: Any) -> Any:
            response = await inner(messages, info)  # type: ignore[misc]
            self.calls += 1
            return response

        async def streamed(messages: Any, info: Any) -> Any:
            async for chunk in stream(messages, info):  # type: ignore[misc]
                yield chunk
            self.calls += 1

        self.model.function, self.model.stream_function = respond, streamed


async def turn(kind: str, conversation: str, model: Any, rng: random.Random) -> None:
    account = 'no-such-account' if kind == 'unknown_account' else MEDICAL_ACCOUNT
    if kind in ('long', 'new', 'unknown_account'):
        await simple_chat(QUESTION, session_id=conversation, account=account, model=model)
    elif kind == 'cancelled':
        async with asyncio.timeout(rng.uniform(0.001, 0.06)):
            await simple_chat(QUESTION, session_id=conversation, account=account, model=model)
    else:
        async with simple_chat_stream(QUESTION, session_id=conversation, account=account, model=model) as stream:
            async for _ in stream:
                if kind == 'stream_left':
                    break


async def drive(index: int, opts: argparse.Namespace, state: dict[str, Any], model: Any) -> None:
    rng = random.Random(opts.seed * 1000 + index)
    long_id, long_turns, count = f'leak-{index}-long-0', 0, 0
    while state['started'] < opts.turns:
        state['started'] += 1
        kind = rng.choices(list(opts.kinds), list(opts.kinds.values()))[0]
        count += 1
        if kind == 'long':
            conversation = long_id
        else:
            conversation = f'leak-{index}-{count}'
        begin = time.perf_counter()
        try:
            await turn(kind, conversation, model, rng)
            outcome = 'ok'
        except Exception as exc:  # a figure of the run, not its end
            outcome = type(exc).__name__
        state['outcomes'][f'{kind}: {outcome}'] += 1
        state['latencies'].append(time.perf_counter() - begin)
        if kind == 'long':
            long_turns += 1
            if outcome != 'ok' or long_turns >= opts.long_turns:
                long_id, long_turns = f'leak-{index}-long-{count}', 0
        state['done'] += 1


async def stopped(workers: list[asyncio.Task[None]]) -> None:
    """Cancel the closed loops still running and wait for their turns to end."""
    for worker in workers:
        worker.cancel()
    await asyncio.gather(*workers, return_exceptions=True)


def awaiting(task: asyncio.Task[Any]) -> str:
    """Where a task waits: its chain of coroutines and async generators, innermost last (the last few)."""
    chain, step = [], task.get_coro()
    while step is not None and len(chain) < 60:
        frame = getattr(step, 'cr_frame', None) or getattr(step, 'ag_frame', None)
        if frame is None:
            chain.append(type(step).__name__)
            break
        chain.append(f'{frame.f_code.co_name}:{frame.f_lineno}')
        step = getattr(step, 'cr_await', None) or getattr(step, 'ag_await', None)
    return ' > '.join(chain[-8:])


async def sample(label: str, state: dict[str, Any]) -> dict[str, Any]:
    status = dict(line.split(':', 1) for line in Path('/proc/self/status').read_text().splitlines())  # noqa: ASYNC240
    latencies, state['latencies'] = state['latencies'], []
    row: dict[str, Any] = {
        'label': label,
        'turns': state['done'],
        'rss_mib': round(int(status['VmRSS'].split()[0]) / 1024, 1),
        'fds': len(os.listdir('/proc/self/fd')),
        'tasks': len(asyncio.all_tasks()),
        'threads': threading.active_count(),
        'pool_out': get_engine().pool.checkedout(),  # type: ignore[attr-defined]
        'p50_ms': round(1000 * (percentile(latencies, 50) or 0), 1),
    }
    async with get_db_session(account=Unscoped.ADMIN) as session:
        pg = await session.execute(
            text(
                "SELECT count(*), count(*) FILTER (WHERE state = 'active'), "
                "count(*) FILTER (WHERE state LIKE 'idle in transaction%') FROM pg_stat_activity "
                'WHERE datname = current_database() AND pid <> pg_backend_pid()'
            )
        )
        row['pg_conns'], row['pg_active'], row['pg_idle_tx'] = pg.one()
        row['claims'] = (await session.execute(text('SELECT count(*) FROM conversation_turns'))).scalar_one()
        row['holds'] = (await session.execute(text('SELECT count(*) FROM budget_reservations'))).scalar_one()
        budget = await account_budget_status(session=session, account=MEDICAL_ACCOUNT)  # settlements folded in
        row['reserved_usd'] = float(budget.reserved_usd) if budget else None
    if label.startswith('idle'):  # what is still running with nothing to do: the runtime's own tasks, or a leak
        kinds = Counter(getattr(t.get_coro(), '__qualname__', '?') for t in asyncio.all_tasks())
        row['task_kinds'] = dict(kinds.most_common(10))
        row['task_stacks'] = Counter(awaiting(t) for t in asyncio.all_tasks() if t is not asyncio.current_task())
    print('  '.join(f'{k}={v}' for k, v in row.items()), flush=True)
    return row


async def checks(model: Counted) -> dict[str, Any]:
    """What was written: the ledger against the model's answered requests, every history whole."""
    tracker = existing_request_tracker()
    if tracker is not None:
        await tracker.flush()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        ledger = dict((await session.execute(text('SELECT status, count(*) FROM llm_requests GROUP BY 1'))).all())
        history = dict((await session.execute(text(HISTORY_SQL))).mappings().one())
    return {'model_answers': model.calls, 'ledger_rows_by_status': ledger, 'history': history}


async def main(opts: argparse.Namespace) -> None:
    # Without AGENTRT_DATA_DIR this was a KeyError, the data directory start_database() uses being its own then.
    os.environ.setdefault('AGENTRT_LEDGER_SPOOL', str(bench_data_dir().parent / 'spool.jsonl'))
    await start_database(pool_size=opts.pool_size, max_overflow=0, pool_timeout=30)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await seed_demo_data(session=session)
        before = await account_budget_status(session=session, account=MEDICAL_ACCOUNT)
    try:  # a stop as the budget is set is undone too: its commit may have gone through
        async with get_db_session(account=Unscoped.ADMIN) as session:
            limit = Decimal('100000')
            await set_budget(session=session, account=MEDICAL_ACCOUNT, limit_usd=limit, period=Period.parse('month'))
        await run_and_check(opts)
    finally:
        # Left in place, the budget refused every later turn of the demo model on this database (`agentrt chat`:
        # "model 'demo' has no price ... has a budget"), the user's own when AGENTRT_DATA_DIR or DATABASE_URL is.
        # To its end whatever stops the run meanwhile: SIGTERM killed it with the budget in place (QA).
        await run_clean_up(lambda: restore_budget(before), shutdown_runtime)


async def restore_budget(before: BudgetStatus | None) -> None:
    """Put the medical account's budget back as it was before the run: none, or its limit, period and anchor."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        if before is None:
            await remove_budget(session=session, account=MEDICAL_ACCOUNT)
            return
        period = Period.parse(before.period)
        await set_budget(
            session=session,
            account=MEDICAL_ACCOUNT,
            limit_usd=before.limit_usd,
            period=period,
            window_anchor=before.window_anchor,
        )


async def run_and_check(opts: argparse.Namespace) -> None:
    """The closed loops, the samples and the checks of what they wrote."""
    model = Counted(opts.latency)
    state: dict[str, Any] = {'started': 0, 'done': 0, 'outcomes': Counter(), 'latencies': []}
    rows = [await sample('idle-start', state)]
    workers = [asyncio.create_task(drive(i, opts, state, model.model)) for i in range(opts.concurrency)]
    next_sample = opts.sample_every
    try:
        while not all(w.done() for w in workers):
            await asyncio.sleep(0.2)
            if state['done'] >= next_sample:
                rows.append(await sample('load', state))
                next_sample += opts.sample_every
    finally:
        # A stopped run's turns end here (their holds and claims given back), not after the budget is put back and
        # the runtime shut down: what they held then stayed in the database (QA).
        await run_clean_up(lambda: stopped(workers))
    for w in workers:
        w.result()
    await asyncio.sleep(opts.idle_seconds)
    gc.collect()
    rows.append(await sample('idle-end', state))
    print('outcomes:', dict(sorted(state['outcomes'].items())))
    print('checks:', await checks(model))
    load = [r for r in rows if r['label'] == 'load']
    half = load[len(load) // 2 :]
    if len(half) >= 2:
        growth = (half[-1]['rss_mib'] - half[0]['rss_mib']) * 1024 / max(1, half[-1]['turns'] - half[0]['turns'])
        first, last = half[0]['rss_mib'], half[-1]['rss_mib']
        print(f'RSS over the second half: {first} -> {last} MiB ({growth * 1000:.0f} KiB per 1,000 turns)')


def weights(value: str) -> dict[str, float]:
    """Parse `cancelled=1,stream=2` (a kind left out weighs 0)."""
    found = {}
    for part in value.split(','):
        name, _, weight = part.partition('=')
        if name.strip() not in KINDS:
            raise argparse.ArgumentTypeError(f'unknown kind {name.strip()!r}: one of {", ".join(KINDS)}')
        found[name.strip()] = float(weight or 1)
    return found


def parse_args() -> argparse.Namespace:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument('--turns', type=int, default=5000, help='turns in all')
    args.add_argument('--concurrency', type=int, default=8, help='closed loops running turns at once')
    args.add_argument('--long-turns', type=int, default=40, help='turns of a long conversation before a new one')
    args.add_argument('--latency', type=float, default=0.01, help="the model's wait before each response (s)")
    args.add_argument('--pool-size', type=int, default=5)
    args.add_argument('--sample-every', type=int, default=500, help='turns between two samples')
    args.add_argument('--idle-seconds', type=float, default=3.0, help='wait before the last sample')
    args.add_argument('--kinds', type=weights, default=KINDS, help=f'weights of the kinds of turn ({KIND_HELP})')
    args.add_argument('--seed', type=int, default=1)
    return args.parse_args()


INTERRUPTED = "interrupted; its clean-up ran: the account's budget is as it was (its turns' rows stay, as after a run)"
CUT_SHORT = (
    "interrupted again during its clean-up, which was cut short: the run's own budget may be left in place, and its"
    " requests' budget holds too (`agentrt budget sweep` on the same database releases those)"
)


if __name__ == '__main__':
    run_benchmark(lambda: asyncio.run(main(parse_args())), interrupted=INTERRUPTED, cut_short=CUT_SHORT)
