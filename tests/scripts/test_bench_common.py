"""scripts/bench_common.py's stop of a benchmark (README "Benchmarks"): Ctrl-C or SIGTERM landing as its clean-up
starts (just after it prints `summary:`) runs the clean-up to its end, and the one line it prints says what is true.

The signal is sent by the benchmark's own process right after it wrote its figures (`write_results`, the last step
before its `finally:`), so it always lands there: it cancelled the clean-up's first await and skipped the rest, and the
benchmark said "its clean-up ran" with its ledger rows and conversations left (QA).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / 'scripts'
INTERRUPTED = 'interrupted; its clean-up ran: the rows it added are removed'
CUT_SHORT = 'interrupted again during its clean-up, which was cut short: rows it added may be left in the database'

STOPPED_AFTER_ITS_FIGURES = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a shell's: the test worker's (xdist) is ignored
import bench_common

stop, script, out = getattr(signal, sys.argv[1]), sys.argv[2], sys.argv[3]
written = bench_common.write_results

def write_then_stop(*args, **kwargs):
    written(*args, **kwargs)
    os.kill(os.getpid(), stop)

bench_common.write_results = write_then_stop
sys.argv = [script, '--quick', '--out', out]
runpy.run_path(script, run_name='__main__')
"""

TABLES = ('llm_requests', 'usage_daily_rollups', 'conversations', 'conversation_entries', 'conversation_turns')


async def _rows(database_url: str) -> dict[str, int]:
    """The rows of the tables a benchmark writes, and the accounts it adds (bench_budgets' own)."""
    connection = await asyncpg.connect(database_url.replace('postgresql+asyncpg://', 'postgresql://', 1))
    try:
        counts = {table: await connection.fetchval(f'SELECT count(*) FROM {table}') for table in TABLES}
        counts['accounts'] = await connection.fetchval('SELECT count(*) FROM accounts')
        counts['budgets'] = await connection.fetchval('SELECT count(*) FROM account_budgets')
        return counts
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ('name', 'signal_name'),
    [
        ('bench_budgets', 'SIGINT'),
        ('bench_budgets', 'SIGTERM'),
        ('bench_long_conversation', 'SIGTERM'),
        ('bench_overhead', 'SIGINT'),
    ],
)
def test_a_stop_as_the_clean_up_starts_leaves_nothing_and_says_so(
    name: str, signal_name: str, demo_data: None, database_url: str, tmp_path: Path
) -> None:
    before = asyncio.run(_rows(database_url))
    out = tmp_path / 'figures.json'
    env = {**os.environ, 'DATABASE_URL': database_url, 'AGENTRT_LEDGER_SPOOL': str(tmp_path / 'spool.jsonl')}
    command = [sys.executable, '-c', STOPPED_AFTER_ITS_FIGURES, signal_name, f'{name}.py', str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=SCRIPTS, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 130, output
    assert out.exists(), output  # the signal came after the figures: the run was whole
    assert result.stderr.strip().splitlines()[-1] == INTERRUPTED, output
    assert 'Traceback' not in output
    assert asyncio.run(_rows(database_url)) == before


CLEAN_UP = """
import asyncio, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a shell's: the test worker's (xdist) is ignored
from pathlib import Path
import bench_common

interrupts, marks = int(sys.argv[1]), Path(sys.argv[2])

async def step(number):
    if number <= interrupts:
        os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(0.05)
    (marks / str(number)).touch()

async def main():
    try:
        await asyncio.sleep(0)
    finally:
        await bench_common.run_clean_up(*(lambda n=n: step(n) for n in (1, 2, 3)))

bench_common.run_benchmark(lambda: asyncio.run(main()))
"""


@pytest.mark.parametrize(
    ('interrupts', 'steps_run', 'said'),
    [(1, ['1', '2', '3'], INTERRUPTED), (2, ['1'], CUT_SHORT)],
    ids=['once', 'twice'],
)
def test_a_clean_up_runs_to_its_end_unless_interrupted_twice(
    interrupts: int, steps_run: list[str], said: str, tmp_path: Path
) -> None:
    # One Ctrl-C during the clean-up: its steps all run, then the benchmark stops. A second one cuts it short (the
    # step under way and those after it): then it says so, not "its clean-up ran".
    command = [sys.executable, '-c', CLEAN_UP, str(interrupts), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=SCRIPTS, check=False)
    assert result.returncode == 130, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [said], result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == steps_run


SIGNALLED_AS_IT_EXITS = """
import atexit, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a shell's: the test worker's (xdist) is ignored
from pathlib import Path
import bench_common

stop, interrupted, marks = getattr(signal, sys.argv[1]), sys.argv[2] == 'interrupted', Path(sys.argv[3])

def leave():  # as the embedded server's stop at exit (`_leave_at_exit`), which waits for `pg_ctl stop`
    os.kill(os.getpid(), stop)
    time.sleep(0.2)
    (marks / 'left').touch()

atexit.register(leave)

def entry():
    if interrupted:
        os.kill(os.getpid(), stop)
        time.sleep(5)  # the interrupt lands here

bench_common.run_benchmark(entry)
"""


@pytest.mark.parametrize('signal_name', ['SIGINT', 'SIGTERM'])
@pytest.mark.parametrize('how', ['ended', 'interrupted'])
def test_a_signal_while_it_exits_changes_nothing(signal_name: str, how: str, tmp_path: Path) -> None:
    # Once its entry has ended (its figures written, or its "interrupted" line said), the exit handlers run: the
    # embedded server's stop, which waits for `pg_ctl stop`. A signal then raised KeyboardInterrupt in them: "Exception
    # ignored in atexit callback" with its traceback and exit 0, or a silent 143 (QA). Now it is ignored.
    command = [sys.executable, '-c', SIGNALLED_AS_IT_EXITS, signal_name, how, str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=SCRIPTS, check=False)
    assert result.returncode == (130 if how == 'interrupted' else 0), result.stdout + result.stderr
    assert result.stderr.splitlines() == ([INTERRUPTED] if how == 'interrupted' else []), result.stderr
    assert (tmp_path / 'left').exists()  # the exit handler ran to its end


FORKED_CHILD = """
import asyncio, os, signal, sys
from pathlib import Path
import bench_common

marks, stop, interrupts = Path(sys.argv[1]), getattr(signal, sys.argv[2]), int(sys.argv[3])
(marks / 'child.pid').write_text(str(os.getpid()))

async def step(number):
    if number < interrupts:
        os.kill(os.getppid(), stop)  # its parent stopped again, during the child's clean-up
    await asyncio.sleep(0.2)
    (marks / str(number)).touch()

async def main():
    try:
        os.kill(os.getppid(), stop)  # its parent stopped while it waits for its child
        await asyncio.sleep(30)
    finally:
        await bench_common.run_clean_up(*(lambda n=n: step(n) for n in (1, 2)))

bench_common.run_benchmark(lambda: asyncio.run(main()))
"""

STOPPED_WHILE_ITS_CHILD_RUNS = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a shell's: the test worker's (xdist) is ignored
import bench_common

child, args = sys.argv[1], sys.argv[2:]
bench_common.run_benchmark(lambda: bench_common.run_script_forked(child, args, dict(os.environ)))
"""


@pytest.mark.parametrize(
    ('signal_name', 'interrupts', 'steps_run', 'said'),
    [('SIGTERM', 1, ['1', '2'], INTERRUPTED), ('SIGINT', 1, ['1', '2'], INTERRUPTED), ('SIGTERM', 2, [], CUT_SHORT)],
    ids=['sigterm', 'sigint', 'twice'],
)
def test_a_stop_while_a_forked_child_runs_is_passed_on_and_waited_for(
    signal_name: str, interrupts: int, steps_run: list[str], said: str, tmp_path: Path
) -> None:
    # bench_tracing.py's children (`run_script_forked`): the parent, stopped while it waited for its child, said "its
    # clean-up ran" and exited while the child, never told, wrote rows for 17 s more and then deleted them (QA).
    child, marks = tmp_path / 'child.py', tmp_path / 'marks'
    child.write_text(FORKED_CHILD)
    marks.mkdir()
    command = [sys.executable, '-c', STOPPED_WHILE_ITS_CHILD_RUNS, str(child), str(marks), signal_name, str(interrupts)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=SCRIPTS, check=False)
        assert result.returncode == 130, result.stdout + result.stderr
        assert result.stderr.splitlines() == [said], result.stderr
        # The child's clean-up had ended (or been cut short) and the child was gone when its parent said so.
        assert sorted(path.name for path in marks.iterdir() if path.name != 'child.pid') == steps_run
        assert not Path(f'/proc/{(marks / "child.pid").read_text()}').exists()
    finally:
        with contextlib.suppress(ProcessLookupError, FileNotFoundError, ValueError):
            os.kill(int((marks / 'child.pid').read_text()), signal.SIGKILL)
