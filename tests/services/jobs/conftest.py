"""The queue mode for the queue's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from agentrt.db.engine import current_settings
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.jobs import close_queue
from tests.services.jobs.helpers import PROCRASTINATE_TABLES


@pytest.fixture
async def queue(demo_data: None, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """The queue mode, an empty queue, the rollup at every turn (AGENTRT_USAGE_ROLLUP_SECONDS=0)."""
    settings = current_settings()
    monkeypatch.setattr(settings, 'background', 'queue')
    monkeypatch.setattr(settings, 'usage_rollup_seconds', 0.0)
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text(f'TRUNCATE {PROCRASTINATE_TABLES} RESTART IDENTITY CASCADE'))
    yield
    await get_supervisor().join()
    await close_queue()
