"""Run the `agentrt` CLI in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `agentrt ARGS...` with the test environment plus `env`; never raises on a non-zero exit."""
    full_env = {**os.environ, 'COLUMNS': '200', **(env or {})}
    return subprocess.run(
        [sys.executable, '-m', 'agentrt.agents.cli', *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.DEVNULL,
    )
