"""scripts/bench_workers.py without pgbouncer: one line saying so, before the database starts; never a traceback."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

import tests.pgbouncer

SCRIPTS = Path(__file__).resolve().parents[2] / 'scripts'


def test_without_pgbouncer_it_says_so_in_one_line_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # It seeded the demo data, then failed with RuntimeError's traceback: `make bench` stopped there on a machine
    # without pgbouncer, and the smoke test failed.
    monkeypatch.setattr(tests.pgbouncer, 'BINARY', None)
    monkeypatch.syspath_prepend(str(SCRIPTS))  # its `from bench_common import ...`, as when run from the shell
    monkeypatch.setattr(sys, 'argv', ['bench_workers.py', '--quick', '--out', str(tmp_path / 'out.json')])
    monkeypatch.setattr('agentrt.db.engine.init_database', _database_not_wanted)
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(SCRIPTS / 'bench_workers.py'), run_name='__main__')
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err == 'bench_workers: pgbouncer is not installed (apt-get install pgbouncer); nothing measured\n'
    assert not (tmp_path / 'out.json').exists()


async def _database_not_wanted(*args: object, **kwargs: object) -> None:
    raise AssertionError('the database was started before pgbouncer was looked for')
