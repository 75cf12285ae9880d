"""scripts/bench_workers.py without pgbouncer: one line saying so, before the database starts; never a traceback. With
it, without `AGENTRT_DATA_DIR`: the benchmarks' own data directory, never the user's."""

from __future__ import annotations

import runpy
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.pgbouncer
from agentrt.db.settings import Settings, default_data_dir

SCRIPTS = Path(__file__).resolve().parents[2] / 'scripts'


@pytest.fixture(autouse=True)
def _signal_handlers_kept() -> Iterator[None]:
    # The script runs in this process's main thread: the handlers it sets (`run_benchmark` ignores Ctrl-C and SIGTERM
    # once its entry has ended, the process's exit being all that is left of a benchmark) are put back after it.
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


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


class _Started(Exception):
    """What the stand-in for `init_database` raises: the run stops there, nothing started."""


def test_without_agentrt_data_dir_it_runs_on_the_benchmarks_own_data_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # It called init_database() with the default settings: the user's own data directory, whose ledger then held the
    # run's rows, priced (its demo planner is named gpt-4o-mini), in `agentrt costs` of acme-health.
    monkeypatch.setattr(tests.pgbouncer, 'BINARY', '/usr/sbin/pgbouncer')  # looked for first; never run here
    monkeypatch.delenv('AGENTRT_DATA_DIR', raising=False)
    monkeypatch.delenv('DATABASE_URL', raising=False)
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setattr(sys, 'argv', ['bench_workers.py', '--quick', '--out', str(tmp_path / 'out.json')])
    started: list[Settings | None] = []

    async def record(settings: Settings | None = None, **kwargs: object) -> None:
        started.append(settings)
        raise _Started

    monkeypatch.setattr('agentrt.db.engine.init_database', record)
    with pytest.raises(_Started):
        runpy.run_path(str(SCRIPTS / 'bench_workers.py'), run_name='__main__')
    [settings] = started
    assert settings is not None and settings.data_dir == default_data_dir().parent / 'bench-pgdata'
