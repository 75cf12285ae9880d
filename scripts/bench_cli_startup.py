"""Benchmark 10a: how long `agentrt` takes to answer `--help` and `--version` (target: `agentrt --help` < 0.3 s).

Each command is run as a user runs it (the `agentrt` script of this environment, a new process each time), several
times; reported: median, fastest and slowest wall time, and what Python itself costs to start, for scale. Commands
import the runtime only when they run (agents/cli/__init__.py), so help and version never load the database, the
agents or pydantic-ai. No database is needed.

Run:
    .venv/bin/python scripts/bench_cli_startup.py [--runs 15]
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import (
    _host_info,
    ms,
    parser,
    positive_int,
    print_config,
    print_table,
    run_benchmark,
    write_results,
)

from agentrt.agents.cli import COMMANDS

TARGET_S = 0.3


def agentrt_command() -> list[str]:
    """The `agentrt` script installed beside this Python, else `python -m agentrt.agents.cli`."""
    script = Path(sys.executable).parent / 'agentrt'
    if script.exists():
        return [str(script)]
    found = shutil.which('agentrt')
    return [found] if found else [sys.executable, '-m', 'agentrt.agents.cli']


def time_runs(argv: list[str], runs: int, *, warm_up: bool = True) -> list[float]:
    """Wall seconds of `runs` runs of `argv` (with `warm_up`, one unmeasured run first, to warm the file cache)."""
    times = []
    for i in range(runs + 1 if warm_up else runs):
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f'{" ".join(argv)} exited {done.returncode}: {done.stderr}')
        if i or not warm_up:
            times.append(elapsed)
    return times


def main() -> None:
    args = parser(__doc__.splitlines()[0], 'cli_startup')
    args.add_argument('--runs', type=positive_int, default=15, help='measured runs per command')
    opts = args.parse_args()
    runs = 1 if opts.quick else opts.runs
    agentrt = agentrt_command()
    cases: list[tuple[str, list[str]]] = [
        ('python -c pass (Python start-up)', [sys.executable, '-c', 'pass']),
        ('python -c "import agentrt.agents.simple_chat"', [sys.executable, '-c', 'import agentrt.agents.simple_chat']),
        ('agentrt --help', [*agentrt, '--help']),
        ('agentrt --version', [*agentrt, '--version']),
        *((f'agentrt {c.name} --help', [*agentrt, c.name, '--help']) for c in COMMANDS),
    ]  # fmt: skip
    if opts.quick:  # the smoke test: the root's help and version, and one command's
        cases = [case for case in cases if case[0] in ('agentrt --help', 'agentrt --version', 'agentrt chat --help')]
    config = {'runs': runs, 'agentrt': ' '.join(agentrt), 'target_s': TARGET_S}
    print_config('Benchmark 10a: agentrt start-up (--help, --version)', config)
    rows = []
    for name, argv in cases:
        times = time_runs(argv, runs, warm_up=not opts.quick)  # the smoke test: one run of each, cache warm or not
        rows.append(
            {
                'command': name,
                'runs': runs,
                'median_ms': ms(statistics.median(times)),
                'min_ms': ms(min(times)),
                'max_ms': ms(max(times)),
            }
        )
        print(f'  {name}: {rows[-1]["median_ms"]} ms')
    print_table(rows, [('command', 'command'), ('median ms', 'median_ms'), ('min ms', 'min_ms'), ('max ms', 'max_ms')])
    by_name = {row['command']: row for row in rows}
    help_ms = by_name['agentrt --help']['median_ms']
    subcommands = [row['median_ms'] for row in rows if row['command'].endswith(' --help')]
    summary = {
        'help_median_ms': help_ms,
        'version_median_ms': by_name['agentrt --version']['median_ms'],
        'slowest_command_help_ms': max(subcommands),
        'target_ms': TARGET_S * 1000,
        'target_met': help_ms is not None and help_ms < TARGET_S * 1000,
    }
    print('summary:', summary)
    machine = _host_info()
    write_results(opts.out, 'cli_startup', config, machine, rows, summary)


if __name__ == '__main__':
    run_benchmark(main, interrupted='interrupted')
