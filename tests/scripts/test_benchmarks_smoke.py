"""Every benchmark script runs with `--quick` against the test database and writes its figures as JSON.

Timings are never asserted: only that each script exits 0 and its JSON has the expected shape.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from tests.pgbouncer import BINARY as PGBOUNCER_BINARY
from tests.pgbouncer import require_pgbouncer
from tests.scripts.forked_scripts import run_forked

ROOT = Path(__file__).resolve().parents[2]

# One worker runs the benchmarks (the module's fixture), not each worker that gets one of these tests. Eleven
# programs at once beside the other worker's tests took up to 75 s on a loaded 2-core machine (25 s when quiet):
# more than the suite's 120 s per test would leave room for.
pytestmark = [pytest.mark.xdist_group('benchmarks'), pytest.mark.timeout(300)]

EXPECTED_ROW_KEYS = {
    'bench_parallel_tools': {'tools', 'parallel_ms', 'sequential_ms', 'ideal_ms', 'parallel_over_ideal', 'legacy'},
    'bench_pool_capacity': {
        'pattern',
        'chats',
        'turns_per_s',
        'p50_ms',
        'p95_ms',
        'pool_timeouts',
        'peak_checked_out',
        'held_s_per_turn',
        'db_active_s_per_turn',
    },
    'bench_overhead': {'pattern', 'mode', 'model_latency_ms', 'median_ms', 'cpu_ms', 'ttft_ms'},
    'bench_ledger_throughput': {'writers', 'rows_per_s', 'p50_ms', 'p99_ms', 'rows_in_db', 'duplicates', 'lost'},
    'bench_redaction': {'family', 'ms_1x', 'ratio_2x', 'found', 'lag_max_ms', 'lag_p99_ms', 'stored_ms'},
    'bench_ledger_content': {'part', 'pattern'},
    'bench_long_conversation': {'mode', 'turn', 'latency_ms', 'cpu_ms', 'prompt_tokens', 'ledger_bytes'},
    'bench_http': {'part', 'pattern', 'model_latency_ms', 'turns', 'cpu_ms'},
    'bench_budgets': {'accounts', 'mode', 'turns', 'median_ms', 'p95_ms', 'cpu_ms_per_turn'},
    'bench_cli_startup': {'command', 'runs', 'median_ms', 'min_ms', 'max_ms'},
    'bench_tracing': {'mode', 'pattern', 'turns', 'cpu_ms_per_turn', 'median_turn_cpu_ms', 'spans_per_turn'},
    'bench_rls': {'what', 'mode', 'n', 'median_ms', 'p90_ms', 'cpu_ms'},
    'bench_loop_stalls': {'request', 'wall_ms'},
    'bench_workers': {
        'workers',
        'turns_ok',
        'turns_failed',
        'ledger_exact',
        'server_conn_s_per_turn',
        'server_conns_peak',
        'worker_cpu_ms_per_turn',
    },
}


@pytest.fixture(scope='module')
def quick_runs(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """Run the benchmarks at once (they share the test server), each with `--quick`, each in a process of its own
    forked from one that imported them (tests/scripts/forked_scripts.py: the imports were half the CPU)."""
    out_dir = tmp_path_factory.mktemp('bench')
    env = {**os.environ, 'DATABASE_URL': database_url, 'AGENTRT_LEDGER_SPOOL': str(out_dir / 'spool.jsonl')}
    runs = {name: ['--quick', '--out', str(out_dir / f'{name}.json')] for name in EXPECTED_ROW_KEYS}
    if PGBOUNCER_BINARY is None:  # its test is skipped (or fails, in CI): not worth a process
        del runs['bench_workers']
    before = asyncio.run(_row_counts(database_url))
    results = run_forked(ROOT / 'scripts', runs, out_dir / 'logs', env=env, timeout=240)
    _keys_left.extend(asyncio.run(_benchmark_keys(database_url)))  # before the next test empties the tables
    after = asyncio.run(_row_counts(database_url))
    _rows_left.update({table: after[table] - before[table] for table in after if after[table] != before[table]})
    return {name: (code, output, out_dir / f'{name}.json') for name, (code, output) in results.items()}


_keys_left: list[str] = []
_rows_left: dict[str, int] = {}
LEFT_BEHIND_TABLES = ('llm_requests', 'conversations', 'conversation_entries', 'conversation_turns')


async def _row_counts(database_url: str) -> dict[str, int]:
    """The rows of each table a benchmark's turns write (`LEFT_BEHIND_TABLES`). Only this module uses the test
    database while the benchmarks run, so a difference between before and after is theirs."""
    connection = await asyncpg.connect(database_url.replace('postgresql+asyncpg://', 'postgresql://', 1))
    try:
        return {table: await connection.fetchval(f'SELECT count(*) FROM {table}') for table in LEFT_BEHIND_TABLES}
    finally:
        await connection.close()


async def _benchmark_keys(database_url: str) -> list[str]:
    """The names of the API keys the benchmarks made that are still in the database (their names start with
    `bench`), read on a connection of its own: the suite's engine belongs to the session's event loop."""
    connection = await asyncpg.connect(database_url.replace('postgresql+asyncpg://', 'postgresql://', 1))
    try:
        return [row['name'] for row in await connection.fetch("SELECT name FROM api_keys WHERE name LIKE 'bench%'")]
    finally:
        await connection.close()


def test_no_benchmark_leaves_an_api_key_in_the_database_it_ran_on(
    quick_runs: dict[str, tuple[int, str, Path]],
) -> None:
    # bench_loop_stalls.py left a live key (chat and read) of the medical account at each run.
    assert _keys_left == []


def test_no_benchmark_leaves_ledger_rows_or_conversations_in_the_database_it_ran_on(
    quick_runs: dict[str, tuple[int, str, Path]],
) -> None:
    # bench_http, bench_tracing and bench_rls left every ledger row and conversation of their turns: on the user's
    # database, `agentrt costs` and budgets counted them (QA). bench_loop_stalls left its conversations' older entries.
    assert _rows_left == {}


def test_pool_capacity_drops_its_table_when_it_fails(database_url: str, tmp_path: Path) -> None:
    # The DROP was the try's last statement: a failure at the end (as SIGTERM, Ctrl-C or a budget's refusal) left it.
    # The failure is the figures' writing (a full disk): an unwritable --out is now refused before the run starts.
    failing = (
        'import runpy, sys, bench_common\n'
        'def full_disk(*args, **kwargs):\n'
        "    raise OSError(28, 'No space left on device')\n"
        'bench_common.write_results = full_disk\n'
        "sys.argv = ['bench_pool_capacity.py', '--quick', '--out', sys.argv[1]]\n"
        "runpy.run_path('bench_pool_capacity.py', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, '-c', failing, str(tmp_path / 'out.json')],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, 'DATABASE_URL': database_url, 'AGENTRT_LEDGER_SPOOL': str(tmp_path / 'spool.jsonl')},
        cwd=ROOT / 'scripts',
        check=False,
    )
    assert result.returncode != 0, result.stdout
    assert 'No space left on device' in result.stderr, result.stderr
    assert not asyncio.run(table_exists(database_url, 'bench_turns'))


def test_benchmarks_remove_their_temporary_spool_directories(database_url: str, tmp_path: Path) -> None:
    # bench_common.use_temporary_spool() and bench_ledger_throughput.py made a directory in /tmp at each run, never
    # removed.
    temp = tmp_path / 'tmp'
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != 'AGENTRT_LEDGER_SPOOL'} | {'DATABASE_URL': database_url}
    env['TMPDIR'] = str(temp)
    spool = 'import bench_common, os; bench_common.use_temporary_spool(); print(os.environ["AGENTRT_LEDGER_SPOOL"])'
    script = ROOT / 'scripts' / 'bench_ledger_throughput.py'
    outputs = []
    for command in (['-c', spool], [str(script), '--quick', '--out', str(tmp_path / 'out.json')]):
        result = subprocess.run(
            [sys.executable, *command], capture_output=True, text=True, timeout=240, env=env, cwd=script.parent
        )
        assert result.returncode == 0, result.stdout + result.stderr
        outputs.append(result.stdout)
    assert outputs[0].startswith(str(temp)), outputs[0]  # it was made there
    assert list(temp.iterdir()) == []


@pytest.mark.parametrize('name', ['bench_http', 'bench_pool_capacity', 'bench_rls', 'bench_tracing'])
async def test_a_benchmark_refused_by_a_budget_says_so_and_stops(
    name: str, demo_data: None, database_url: str, tmp_path: Path
) -> None:
    # README: a benchmark a budget refuses "says so and stops"; these four ended with BudgetExceededError's traceback.
    from agentrt.db.session import Unscoped, get_db_session
    from agentrt.services.budgets import Period, remove_budget, set_budget

    async with get_db_session(account=Unscoped.ADMIN) as session:
        await set_budget(session=session, account='acme-health', limit_usd=Decimal(0), period=Period('month'))
    env = {**os.environ, 'DATABASE_URL': database_url, 'AGENTRT_LEDGER_SPOOL': str(tmp_path / 'spool.jsonl')}
    env['AGENTRT_BUDGET_UNPRICED'] = 'refuse'  # the demo model's requests too
    command = [sys.executable, str(ROOT / 'scripts' / f'{name}.py'), '--quick', '--out', str(tmp_path / 'out.json')]
    try:
        result = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=240, env=env)
    finally:  # the module's benchmark runs (`quick_runs`) may come after this test in its worker, on its database
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await remove_budget(session=session, account='acme-health')
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert result.stderr.strip().splitlines()[-1].startswith('stopped: '), output
    assert 'Traceback' not in output


def test_rls_takes_the_load_average_before_measuring(database_url: str, tmp_path: Path) -> None:
    # It printed "load average at start" read after every measurement.
    trace = (
        'import asyncio, sys, bench_rls\n'
        'calls = []\n'
        'def noted(name, fn):\n'
        '    async def call(*args, **kwargs):\n'
        '        calls.append(name)\n'
        '        return await fn(*args, **kwargs)\n'
        '    return call\n'
        "bench_rls.machine_info = noted('machine_info', bench_rls.machine_info)\n"
        "bench_rls._block = noted('measure', bench_rls._block)\n"
        "sys.argv = ['bench_rls.py', '--quick', '--out', sys.argv[1]]\n"
        'bench_rls.main()\n'
        "print('calls:', calls[0], calls.count('machine_info'))\n"
    )
    env = {**os.environ, 'DATABASE_URL': database_url, 'AGENTRT_LEDGER_SPOOL': str(tmp_path / 'spool.jsonl')}
    command = [sys.executable, '-c', trace, str(tmp_path / 'out.json')]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT / 'scripts')
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'calls: machine_info 1' in result.stdout, result.stdout


async def table_exists(database_url: str, name: str) -> bool:
    """Whether the test database has a table `name`, read on a connection of its own."""
    connection = await asyncpg.connect(database_url.replace('postgresql+asyncpg://', 'postgresql://', 1))
    try:
        return bool(await connection.fetchval('SELECT to_regclass($1) IS NOT NULL', name))
    finally:
        await connection.close()


@pytest.mark.parametrize('name', sorted(EXPECTED_ROW_KEYS))
def test_benchmark_runs_and_writes_json(name: str, quick_runs: dict[str, tuple[int, str, Path]]) -> None:
    if name not in quick_runs:  # as the pooler tests are
        require_pgbouncer()
    returncode, output, out = quick_runs[name]
    assert returncode == 0, output
    data = json.loads(out.read_text())
    assert {'benchmark', 'config', 'machine', 'results', 'summary'} <= set(data)
    assert data['results'], 'no rows'
    for row in data['results']:
        assert EXPECTED_ROW_KEYS[name] <= set(row), row
    assert 'figures written to' in output
