"""A benchmark's bad numeric flag (zero or negative where it makes no sense) is refused by argparse: `error:
argument --flag: ...` and exit 2, before the database; it was a traceback after the run had started (statistics of
an empty list, a division by zero), or taken silently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.scripts.forked_scripts import run_forked

SCRIPTS = Path(__file__).resolve().parents[2] / 'scripts'

# One script each (the runs are forked from one process that imported them all); the flag named in the error.
BAD_FLAGS = {
    'bench_parallel_tools': ['--repeats', '0'],
    'bench_cli_startup': ['--runs', '-1'],
    'bench_pool_capacity': ['--chats', '0,5'],
    'bench_ledger_throughput': ['--writers', '-1'],
    'bench_http': ['--window', '0'],
    'bench_overhead': ['--latencies', '0,-0.5'],
    'bench_long_conversation': ['--turns', '0'],
    'bench_budgets': ['--rounds', '1'],  # rounds alternate budgets on and off: one measured one side only
    'bench_rls': ['--rounds', '0'],
}


@pytest.fixture(scope='module')
def refused(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    logs = tmp_path_factory.mktemp('bench-arguments')
    # A port where nothing listens: a script that got past its arguments fails at once, starting no server.
    env = {**os.environ, 'DATABASE_URL': 'postgresql://nobody@127.0.0.1:19769/none'}
    runs = {name: [*flag, '--out', str(logs / f'{name}.json')] for name, flag in BAD_FLAGS.items()}
    return run_forked(SCRIPTS, runs, logs, env=env, timeout=100)


@pytest.mark.parametrize('name', sorted(BAD_FLAGS))
def test_a_zero_or_negative_flag_is_a_usage_error(name: str, refused: dict[str, tuple[int, str]]) -> None:
    code, output = refused[name]
    flag, value = BAD_FLAGS[name]
    assert code == 2, output
    assert f'error: argument {flag}: ' in output and value.split(',')[-1] in output, output
    assert 'Traceback' not in output, output


def test_pool_capacity_refuses_a_pattern_it_does_not_have() -> None:
    """`--patterns foo` was a KeyError after the database had started, `--patterns ,` a TypeError (QA)."""
    import argparse
    import sys

    sys.path.insert(0, str(SCRIPTS))
    try:
        from bench_pool_capacity import pattern_list
    finally:
        sys.path.remove(str(SCRIPTS))
    assert pattern_list('runtime, simple_chat') == ['runtime', 'simple_chat']
    for bad in ('foo', ',', '', 'runtime,foo'):
        with pytest.raises(
            argparse.ArgumentTypeError, match='give one or more of runtime, request-scoped, simple_chat'
        ):
            pattern_list(bad)
