"""scripts/bench_start.py: a benchmark stopped by Ctrl-C or SIGTERM during its imports (its first 2 s) says so in one
line and exits 130, as README "Benchmarks" says; it exited 143 with no line (SIGTERM's default action: the handler
was set only after the imports and the arguments), or a KeyboardInterrupt traceback (QA).

The signal comes from the benchmark's own process as it starts importing SQLAlchemy (through `bench_common`), so it
always lands during the imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / 'scripts'

STOPPED_DURING_ITS_IMPORTS = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a shell's: the test worker's (xdist) is ignored

stop, script = getattr(signal, sys.argv[1]), sys.argv[2]

class StopAtSqlalchemy:
    def find_spec(self, name, path=None, target=None):
        if name == 'sqlalchemy':
            os.kill(os.getpid(), stop)
        return None

sys.meta_path.insert(0, StopAtSqlalchemy())
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name='__main__')
"""


@pytest.mark.parametrize('signal_name', ['SIGTERM', 'SIGINT'])
def test_a_stop_during_the_imports_is_one_line_and_exit_130(signal_name: str, tmp_path: Path) -> None:
    out = tmp_path / 'figures.json'
    script = str(SCRIPTS / 'bench_budgets.py')  # its own path: the program is a script of that folder
    command = [sys.executable, '-c', STOPPED_DURING_ITS_IMPORTS, signal_name, script, '--quick', '--out', str(out)]
    # A port where nothing listens: a run that got past its imports would fail on the database instead.
    env = {**os.environ, 'DATABASE_URL': 'postgresql://nobody@127.0.0.1:19769/none'}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=SCRIPTS, check=False)
    assert result.returncode == 130, result.stdout + result.stderr
    assert result.stderr.splitlines() == ['interrupted before it started: it added nothing'], result.stderr
    assert result.stdout == ''
    assert not out.exists()


SIGNALLED_AGAIN_AS_IT_EXITS = """
import atexit, os, signal, sys, time
from pathlib import Path

stop, marks = getattr(signal, sys.argv[1]), Path(os.environ['MARKS'])

def leave():  # an exit handler, as the embedded server's stop: a second signal lands in it
    os.kill(os.getpid(), stop)
    time.sleep(0.2)
    (marks / 'left').touch()

atexit.register(leave)
"""


@pytest.mark.parametrize('signal_name', ['SIGTERM', 'SIGINT'])
def test_a_second_signal_while_the_first_one_exits_changes_nothing(signal_name: str, tmp_path: Path) -> None:
    # The first signal's exit runs the exit handlers; a second one there exited 143 (SIGTERM) or -2 (Ctrl-C), or said
    # the line twice (QA). Now it is ignored: one line, exit 130.
    out = tmp_path / 'figures.json'
    script = str(SCRIPTS / 'bench_budgets.py')
    program = SIGNALLED_AGAIN_AS_IT_EXITS + STOPPED_DURING_ITS_IMPORTS
    command = [sys.executable, '-c', program, signal_name, script, '--quick', '--out', str(out)]
    env = {**os.environ, 'DATABASE_URL': 'postgresql://nobody@127.0.0.1:19769/none', 'MARKS': str(tmp_path)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=SCRIPTS, check=False)
    assert result.returncode == 130, result.stdout + result.stderr
    assert result.stderr.splitlines() == ['interrupted before it started: it added nothing'], result.stderr
    assert (tmp_path / 'left').exists()


def test_a_program_that_imports_the_benchmarks_keeps_its_handlers(tmp_path: Path) -> None:
    # A test (or any program) importing bench_common is no benchmark: its Ctrl-C stays a KeyboardInterrupt.
    check = (
        'import signal, bench_common, bench_start\n'
        'print(bench_start.stop_at_once not in (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))'
    )
    result = subprocess.run(
        [sys.executable, '-c', check], capture_output=True, text=True, timeout=60, cwd=SCRIPTS, check=False
    )
    assert result.stdout.strip() == 'True', result.stdout + result.stderr
