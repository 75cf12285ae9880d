"""scripts/seed_demo_data.py seeds what `agentrt db seed` seeds: run as a script, then the CLI finds nothing new."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.agents.cli.helpers import invoke

SCRIPT = Path(__file__).resolve().parents[2] / 'scripts' / 'seed_demo_data.py'


async def test_seed_script_matches_the_cli(database_url: str) -> None:
    env = {**os.environ, 'DATABASE_URL': database_url}
    first = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert first.returncode == 0, first.stderr
    assert '4,500 new directory entries' in first.stdout
    again = await invoke('db', 'seed', env={'DATABASE_URL': database_url})
    assert again.exit_code == 0 and '0 new directory entries' in again.stdout
