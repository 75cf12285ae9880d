"""A benchmark's `--out`: checked before the run (an unwritable path failed only after the whole run), and with
`--quick` a default of its own (a quick check wrote over the full run's figures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / 'scripts'


@pytest.fixture
def bench_common(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPTS))  # its own folder first, as when a script runs from the shell
    import bench_common

    return bench_common


def test_an_unwritable_out_is_refused_before_the_run(tmp_path: Path) -> None:
    a_file = tmp_path / 'a-file'
    a_file.write_text('')
    # A port where nothing listens: a run that got past its arguments would fail on the database instead.
    env = {**os.environ, 'DATABASE_URL': 'postgresql://nobody@127.0.0.1:19769/none'}
    for out, reason in (('/proc/agentrt-bench/x.json', 'No such file or directory'), (f'{a_file}/x.json', 'Not a')):
        command = [sys.executable, str(SCRIPTS / 'bench_parallel_tools.py'), '--quick', '--out', out]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f'error: --out {out}: {reason}' in result.stderr, result.stderr
        assert 'Traceback' not in result.stderr and 'cannot connect' not in result.stderr, result.stderr


def test_the_check_keeps_what_it_finds(bench_common: ModuleType, tmp_path: Path) -> None:
    existing = tmp_path / 'figures.json'
    existing.write_text('{"kept": true}')
    assert bench_common.out_problem(existing) is None
    assert existing.read_text() == '{"kept": true}'
    new = tmp_path / 'a' / 'b' / 'figures.json'
    assert bench_common.out_problem(new) is None
    assert list(tmp_path.iterdir()) == [existing]  # the file and the directories made for it removed again
    assert bench_common.out_problem(tmp_path) == 'is a directory'


def test_quick_writes_beside_the_full_runs_figures_not_over_them(
    bench_common: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bench_common, 'ROOT', tmp_path)
    assert bench_common.parser('x', 'overhead').parse_args([]).out == tmp_path / 'bench-results' / 'overhead.json'
    quick = bench_common.parser('x', 'overhead').parse_args(['--quick']).out
    assert quick == tmp_path / 'bench-results' / 'overhead-quick.json'
    given = bench_common.parser('x', 'overhead').parse_args(['--quick', '--out', str(tmp_path / 'o.json')]).out
    assert given == tmp_path / 'o.json'
