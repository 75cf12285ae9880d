"""Seed the demo data (two accounts, an agent each, a medical and a produce directory); same as `agentrt db seed`.

Deterministic and idempotent: running it again inserts nothing new.

Run (embedded PostgreSQL unless DATABASE_URL is set):  python scripts/seed_demo_data.py
"""

from __future__ import annotations

import sys

from agentrt.agents.cli import app


def main() -> None:
    """Run `agentrt db seed` (its arguments passed on: `--help` shows its help instead of seeding)."""
    app(['db', 'seed', *sys.argv[1:]])


if __name__ == '__main__':
    main()
