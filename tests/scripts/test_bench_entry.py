"""A benchmark's end when its database cannot be reached: one line naming the server, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.ports import free_port

SCRIPTS = Path(__file__).resolve().parents[2] / 'scripts'


def test_an_unreachable_database_is_one_line_naming_it(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    env = {**os.environ, 'DATABASE_URL': f'postgresql://nobody:secret@127.0.0.1:{port}/none'}
    command = [sys.executable, str(SCRIPTS / 'bench_parallel_tools.py'), '--quick', '--out', str(tmp_path / 'x.json')]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: cannot connect to PostgreSQL at 127.0.0.1:{port}'), lines
    assert 'secret' not in result.stderr
    assert not (tmp_path / 'x.json').exists()
