"""Fixtures of the CLI tests: three model requests in the ledger, for the audit, costs and replay commands."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agentrt.agents.cli.support import console
from agentrt.services.ledger import LedgerRecord, LLMRequestTracker, new_request_id
from tests.factories import fast_config, ledger_record

STARTED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def cli_record(account: str, model: str, cost: str | None, *, success: bool = True, minute: int = 0) -> LedgerRecord:
    return ledger_record(
        # Ids a millisecond apart per minute: made in one millisecond, three ids shared their first 16 hex digits (what
        # `audit list` shows, `audit show` takes) one run in ~2,000, and the short-id test failed (QA).
        id=uuid.UUID(int=new_request_id().int + (minute << 80)),
        success=success,
        started_at=STARTED + timedelta(minutes=minute),
        cost=cost,
        model=model,
        latency_ms=250.0,
        account_slug=account,
        agent_instance_slug='helper',
        input_tokens=1200,
        output_tokens=80,
        total_tokens=1280,
        error_type=None if success else 'ModelHTTPError',
        error_message=None if success else 'status_code: 503, body: overloaded',
        raw_contents=[('prompt', '{"messages": ["hello there"]}'), ('response', '{"parts": ["general kenobi"]}')],
    )


@pytest.fixture
async def seeded(tmp_path: Path) -> list[LedgerRecord]:
    records = [
        cli_record('acme', 'gpt-4o-mini', '0.000250', minute=0),
        cli_record('acme', 'gpt-4o', '0.004000', success=False, minute=1),
        cli_record('globex', 'gpt-4o-mini', '0.000750', minute=2),
    ]
    tracker = LLMRequestTracker(fast_config(tmp_path))
    for record in records:
        await tracker.track_request(record)
    await tracker.flush()
    return records


@pytest.fixture(autouse=True)
def _wide_console() -> Iterator[None]:
    """Tables rendered straight to the console are as wide as the CLI runner's."""
    width = console.width
    console.width = 240
    yield
    console.width = width
