"""Programs of a user's own, run by a new interpreter against the suite's database: what embedding the runtime does
outside the test's process (its own event loops, its own start and shutdown)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path


def untraced_env(**extra: str) -> dict[str, str]:
    """This process's environment without the tracing variables (a child must not send spans anywhere), plus
    `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(('LOGFIRE_', 'OTEL_'))}
    return {**env, **extra}


async def run_program(
    *args: str, database_url: str, cwd: Path | None = None, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    """`python ARGS...` (`-c CODE ...` or a script's path) on `database_url`, untraced, its output captured."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=untraced_env(DATABASE_URL=database_url, **extra_env),
        cwd=cwd,
        timeout=120,
        check=False,
    )
