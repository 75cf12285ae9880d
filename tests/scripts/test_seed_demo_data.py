"""scripts/seed_demo_data.py seeds what `agentrt db seed` seeds: run as a script (in this process, as `__main__`),
then the CLI finds nothing new."""

from __future__ import annotations

from pathlib import Path

from tests.agents.cli.helpers import invoke, run_script

SCRIPT = Path(__file__).resolve().parents[2] / 'scripts' / 'seed_demo_data.py'


async def test_seed_script_matches_the_cli(database_url: str) -> None:
    first = await run_script(SCRIPT, env={'DATABASE_URL': database_url})
    assert first.exit_code == 0, first.stderr
    assert '4,500 new directory entries' in first.stdout
    again = await invoke('db', 'seed', env={'DATABASE_URL': database_url})
    assert again.exit_code == 0 and '0 new directory entries' in again.stdout
