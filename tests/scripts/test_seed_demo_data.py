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


async def test_the_scripts_usage_and_hints_name_it_as_it_is_run() -> None:
    # They said `seed_demo_data.py db seed [OPTIONS]` and `(see 'seed_demo_data.py db seed --help')`, a command the
    # script refuses ("unexpected extra argument(s)"), since it ran `agentrt db seed` under its own name (QA).
    shown = await run_script(SCRIPT, '--help')
    assert shown.exit_code == 0, shown.stderr
    assert 'Usage: seed_demo_data.py [OPTIONS]' in shown.stdout and 'db seed' not in shown.stdout
    refused = await run_script(SCRIPT, '--bogus')
    assert refused.exit_code == 2
    assert refused.stderr == "error: No such option: --bogus (see 'seed_demo_data.py --help')\n"
