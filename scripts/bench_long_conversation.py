"""Benchmark 7: a long conversation. Turn 200 against turn 5 of one conversation, same run: does a turn cost the same?

One conversation of `--turns` turns with the demo model (3 requests, 7 tool calls a turn), plain and streamed (one
conversation each). Per turn: latency (what the caller waits), CPU (time.process_time, the ledger and background
work the turn deferred included), the prompt tokens sent per request (estimated from the prompt the ledger stored,
as the budget counts them; the demo model's own count is shown beside it, though streamed it counts no prompt) and
the ledger's stored bytes per request (prompt and response bodies). Each figure is the median of five
turns around turn 5 and around the last turn. The context budget (`--budget`, estimated tokens) is one the early
turns already fill, so the comparison is of a full window against a full window: a bounded context means turn 200
sends, stores and costs what turn 5 does. Target: the last turn within 1.3x of turn 5 on every figure.

Run (embedded PostgreSQL unless DATABASE_URL is set):
    .venv/bin/python scripts/bench_long_conversation.py [--turns 200] [--budget 4000]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid

from bench_common import (
    budgets_on,
    delete_ledger_rows,
    machine_info,
    ms,
    parser,
    positive_int,
    print_config,
    print_table,
    run_benchmark,
    run_clean_up,
    start_database,
    use_temporary_spool,
    write_results,
)
from pydantic_ai import ModelMessagesTypeAdapter
from sqlalchemy import text

from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
from agentrt.db.engine import close_database, current_settings
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import drain_supervisor, get_supervisor
from agentrt.services.conversations import PostgresConversationStore, estimate_tokens
from agentrt.services.demo_data import MEDICAL_ACCOUNT, seed_demo_data
from agentrt.services.ledger import get_request_tracker

QUESTIONS = [
    'Find me cardiologists in Seattle who accept Medicare',
    'Dermatologists in Boston accepting new patients',
    'Pediatricians in Denver who speak Spanish',
    'Neurologists in Austin who accept Aetna',
]
PER_REQUEST = text(
    'SELECT r.run_id, r.input_tokens, coalesce(sum(octet_length(c.body)), 0), '
    "max(c.body) FILTER (WHERE c.kind = 'prompt') "
    'FROM llm_requests r LEFT JOIN llm_request_contents c ON c.request_id = r.id '
    'WHERE r.chat_session_id = :s GROUP BY r.id'
)
ACCOUNT = text('SELECT id FROM accounts WHERE slug = :slug')
FIGURES = ('latency_ms', 'cpu_ms', 'prompt_tokens', 'ledger_bytes')
WINDOW = 2  # turns either side of the one compared


async def settle() -> None:
    """Wait for work the runtime deferred past the turn (ledger contents, background tasks)."""
    await get_request_tracker().flush()
    await get_supervisor().join()


async def one_turn(question: str, session_id: str, streamed: bool) -> str:
    """A turn through `simple_chat` or `simple_chat_stream`; returns its run id."""
    if not streamed:
        return (await simple_chat(question, session_id=session_id, account=MEDICAL_ACCOUNT)).run_id
    async with simple_chat_stream(question, session_id=session_id, account=MEDICAL_ACCOUNT) as stream:
        async for _ in stream:
            pass
    assert stream.result is not None
    return stream.result.run_id


async def conversation(turns: int, streamed: bool, session_id: str) -> list[dict]:
    """Run the conversation; one figure row per turn."""
    rows = []
    for turn in range(1, turns + 1):
        await settle()
        started, cpu = time.perf_counter(), time.process_time()
        run_id = await one_turn(QUESTIONS[turn % len(QUESTIONS)], session_id, streamed)
        latency = time.perf_counter() - started
        await settle()
        rows.append(
            {'turn': turn, 'run_id': run_id, 'latency_ms': ms(latency), 'cpu_ms': ms(time.process_time() - cpu)}
        )
        if turn % 50 == 0:
            print(f'  {"streamed" if streamed else "plain"}: turn {turn}, {rows[-1]["latency_ms"]} ms')
    ledger: dict[str, list[tuple[int, int, int]]] = {}
    async with get_db_session(account=Unscoped.ADMIN) as session:
        for run_id, reported, size, prompt in await session.execute(PER_REQUEST, {'s': session_id}):
            ledger.setdefault(run_id, []).append((prompt_tokens(prompt), reported, size))
    for row in rows:
        requests = ledger[row.pop('run_id')]
        row['requests'] = len(requests)
        for index, key in enumerate(('prompt_tokens', 'reported_input_tokens', 'ledger_bytes')):
            row[key] = round(statistics.fmean(request[index] for request in requests))
    return rows


def prompt_tokens(body: str | None) -> int:
    """Estimated tokens of a stored prompt's messages, as the context budget counts them."""
    if body is None:
        return 0
    return estimate_tokens(ModelMessagesTypeAdapter.validate_python(json.loads(body)['messages']))


async def delete_conversations(prefix: str) -> None:
    """Remove what this run stored: its conversations (and their entries) and its ledger rows."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await delete_ledger_rows(session, 'r.chat_session_id LIKE :p', {'p': f'{prefix}-%'})
        account_id = (await session.execute(ACCOUNT, {'slug': MEDICAL_ACCOUNT})).scalar_one()
    store = PostgresConversationStore(account_id)
    for mode in ('plain', 'streamed'):
        if (record := await store.read_record(f'{prefix}-{mode}')) is not None:
            await store.delete_record(record.conversation_id, expected_revision=record.revision)


def around(rows: list[dict], turn: int, mode: str) -> dict:
    """The median of each figure over the turns within `WINDOW` of `turn`."""
    near = [row for row in rows if abs(row['turn'] - turn) <= WINDOW]
    keys = (*FIGURES, 'reported_input_tokens')
    span = f'{near[0]["turn"]}-{near[-1]["turn"]}'
    return {'mode': mode, 'turn': turn, 'turns': span} | {
        key: statistics.median(row[key] for row in near) for key in keys
    }


COLUMNS = [
    ('mode', 'mode'), ('turns', 'turns'), ('latency ms', 'latency_ms'), ('CPU ms', 'cpu_ms'),
    ('prompt tokens/request', 'prompt_tokens'), ('model-counted', 'reported_input_tokens'),
    ('ledger bytes/request', 'ledger_bytes'),
    ('latency x', 'latency_ms_ratio'), ('CPU x', 'cpu_ms_ratio'), ('tokens x', 'prompt_tokens_ratio'),
    ('bytes x', 'ledger_bytes_ratio'),
]  # fmt: skip


async def main() -> None:
    args = parser(__doc__.splitlines()[0], 'long_conversation')
    args.add_argument('--turns', type=positive_int, default=200, help='turns of each conversation')
    args.add_argument('--budget', type=positive_int, default=4_000, help='context budget, estimated tokens')
    args.add_argument('--early', type=positive_int, default=5, help='the early turn compared (once the budget is full)')
    opts = args.parse_args()
    if opts.quick:
        opts.turns = 8  # turn 5 and the last one with a full window (turns 3 to 8): the smallest run with both
    if opts.turns - WINDOW < max(opts.early, 1 + WINDOW):  # the late turn compared would come before the early one
        args.error(
            f'argument --turns: {opts.turns} is too few to compare with turn {opts.early}: at least '
            f'{max(opts.early, 1 + WINDOW) + WINDOW}'
        )
    use_temporary_spool()
    await start_database(pool_size=10, max_overflow=5, pool_timeout=10)
    current_settings().context_max_tokens = opts.budget
    current_settings().message_max_chars = min(current_settings().message_max_chars, opts.budget * 4)
    prefix = f'bench-long-{uuid.uuid4().hex[:8]}'
    first, last = max(opts.early, 1 + WINDOW), opts.turns - WINDOW  # the last turn with a full window around it
    config = {'turns': opts.turns, 'context_budget_tokens': opts.budget, 'compared_turns': [first, last]}
    config |= {'model': 'demo (3 requests, 7 tool calls a turn)', 'median_of_turns': 2 * WINDOW + 1}
    try:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await seed_demo_data(session=session)
        if await budgets_on(MEDICAL_ACCOUNT) and current_settings().budget_unpriced == 'refuse':
            # The demo model has no price: every request would be refused (a traceback of BudgetExceededError; QA).
            raise SystemExit(
                f'{MEDICAL_ACCOUNT} has a budget in this database, which refuses the unpriced demo model: run with a '
                "fresh AGENTRT_DATA_DIR, or AGENTRT_BUDGET_UNPRICED=count (the budget then counts the turns' tokens "
                'until the benchmark removes its rows), or remove it '
                f'(`agentrt budget remove --account {MEDICAL_ACCOUNT}`)'
            )
        machine = await machine_info()
        print_config('Benchmark 7: turn 200 against turn 5 of one conversation', config | machine)
        results, per_turn = [], {}
        for streamed in (False, True):
            mode = 'streamed' if streamed else 'plain'
            per_turn[mode] = await conversation(opts.turns, streamed, f'{prefix}-{mode}')
            early, late = around(per_turn[mode], first, mode), around(per_turn[mode], last, mode)
            late |= {f'{key}_ratio': round(late[key] / early[key], 2) if early[key] else None for key in FIGURES}
            results += [early, late]
        print_table(results, COLUMNS)
        ratios = {r['mode']: {key: r[f'{key}_ratio'] for key in FIGURES} for r in results if 'cpu_ms_ratio' in r}
        summary = {'last_over_turn_5': ratios, 'target_ratio': 1.3}
        summary['target_met'] = all(v is not None and v <= 1.3 for mode in ratios.values() for v in mode.values())
        summary['all_turns_succeeded'] = all(len(rows) == opts.turns for rows in per_turn.values())
        print('summary:', summary)
        write_results(opts.out, 'long_conversation', config, machine, results, summary | {'per_turn': per_turn})
    finally:
        # drain_supervisor: and the usage roll-up still pending, which would race the ledger rows deleted next
        await run_clean_up(settle, drain_supervisor, lambda: delete_conversations(prefix), close_database)


if __name__ == '__main__':
    run_benchmark(lambda: asyncio.run(main()))
