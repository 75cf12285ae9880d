"""Seed the demo data (two accounts, an agent each, a medical and a produce directory); same as `agentrt db seed`.

Deterministic and idempotent: running it again inserts nothing new.

Run (embedded PostgreSQL unless DATABASE_URL is set):  python scripts/seed_demo_data.py
"""

from __future__ import annotations

import typer

from agentrt.agents.cli.database import seed
from agentrt.agents.cli.group import ScriptCommand
from agentrt.agents.cli.logs import setup_logging
from agentrt.agents.cli.support import check_debug_flag


def seed_demo_data() -> None:
    """Create the demo accounts, agents and directories (deterministic and idempotent)."""
    check_debug_flag()  # what `agentrt`'s own options set up before any of its commands runs
    setup_logging(verbose=False)
    seed()


def main() -> None:
    """Run `agentrt db seed` as this script, its own command: `--help` and a wrong option name the script as it is run
    (`seed_demo_data.py [OPTIONS]`); run through `agentrt`, its path said `seed_demo_data.py db seed`, which fails."""
    script = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    script.command(cls=ScriptCommand)(seed_demo_data)
    script()


if __name__ == '__main__':
    main()
