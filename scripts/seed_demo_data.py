"""Seed the demo data (two accounts, an agent each, a medical and a produce directory); same as `agentrt db seed`.

Deterministic and idempotent: running it again inserts nothing new.

Run (embedded PostgreSQL unless DATABASE_URL is set):  python scripts/seed_demo_data.py
"""

from __future__ import annotations

import asyncio

from db.engine import close_database, init_database
from db.session import get_db_session
from services.demo_data import seed_demo_data


async def main() -> None:
    await init_database()
    try:
        async with get_db_session() as session:
            report = await seed_demo_data(session=session)
    finally:
        await close_database()
    print(
        f'seeded: {report.inserted_entries:,} new directory entries; totals: {report.accounts} accounts, '
        f'{report.agent_instances} agent instances, {report.directory_entries:,} directory entries'
    )


if __name__ == '__main__':
    asyncio.run(main())
