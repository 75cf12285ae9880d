"""The manual repro script runs in the suite: it must reproduce the failure and show the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_repro_script_reproduces_failure_and_fix(demo_data: None, database_url: str) -> None:
    import os

    result = subprocess.run(
        [sys.executable, str(ROOT / 'scripts' / 'repro_parallel_tools.py'), '--quick'],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, 'DATABASE_URL': database_url},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert 'concurrent operations are not permitted' in out
    assert 'cost rows written: 0 -> billing data lost' in out
    assert 'run succeeded' in out and 'cost rows written: 1' in out
    assert 'speed-up:' in out
    assert 'failure reproduced=True, fix works=True' in out
