"""The runtime pointed at a PostgreSQL of a test's own (`tests.pg_server.PrivateServer`), migrated and seeded.

The suite's shared runtime is set aside only inside `active()`, so the autouse fixtures (truncating tables between
tests) keep working on the shared server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pydantic_ai.models import Model
from pydantic_ai.models.wrapper import WrapperModel
from sqlalchemy import text

from agentrt.agents.demo_model import demo_model
from agentrt.db import engine
from agentrt.db.models import Base
from agentrt.db.session import Unscoped, get_db_session
from agentrt.db.settings import Settings
from agentrt.services.background import get_supervisor
from agentrt.services.demo_data import seed_demo_data
from agentrt.services.ledger import get_request_tracker
from tests.pg_server import DEBIAN_PG15_BIN, PrivateServer


class PrivateDatabase:
    """A private server and the runtime (engine, pool, settings) connected to it with the default settings."""

    def __init__(self, server: PrivateServer, runtime: Any) -> None:
        self.server = server
        self.runtime = runtime

    @classmethod
    async def create(cls, **settings: Any) -> PrivateDatabase:
        server = PrivateServer(ssl=DEBIAN_PG15_BIN.is_dir())
        server.start()
        saved, engine._runtime = engine._runtime, None
        try:
            await engine.init_database(Settings(database_url=server.url(sslmode='disable'), **settings), migrate=True)
            async with get_db_session(account=Unscoped.ADMIN) as session:
                await seed_demo_data(session=session)
            return cls(server, engine._runtime)
        finally:
            engine._runtime = saved

    @asynccontextmanager
    async def active(self) -> AsyncIterator[None]:
        """Run the block with this database as the process's database (`get_db_session()`, the ledger...), its
        ledger and conversations emptied first (the demo data stays)."""
        # One test that failed with the server stopped must not fail every later one of the private server.
        await asyncio.to_thread(self.server.ensure_running)
        saved, engine._runtime = engine._runtime, self.runtime
        try:
            kept = {'accounts', 'agent_instances', 'directory_entries'}
            names = ', '.join(f'"{t.name}"' for t in Base.metadata.sorted_tables if t.name not in kept)
            async with get_db_session(account=Unscoped.ADMIN) as session:
                await session.execute(text(f'TRUNCATE {names}'))
            yield
        finally:
            await self.settle()
            engine._runtime = saved

    async def settle(self) -> None:
        """Wait for the post-turn work and the ledger writes of the turns run so far."""
        await get_supervisor().join()  # post-turn work of the block writes here, not to the shared server
        await get_request_tracker().flush()

    async def close(self) -> None:
        async with self.active():
            await engine.close_database()
        self.server.remove()


class CountingModel(WrapperModel):
    """The demo model, counting the model requests it answers (the ledger must have exactly one row for each)."""

    def __init__(self, wrapped: Model | None = None) -> None:
        super().__init__(wrapped or demo_model())
        self.requests = 0

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        self.requests += 1
        return await super().request(*args, **kwargs)
