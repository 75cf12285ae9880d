"""Fixtures of the ledger tests: a small ledger of five requests over two days and two accounts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agentrt.services.ledger import LedgerRecord, LLMRequestTracker
from tests.factories import fast_config, ledger_record

DAY1 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DAY2 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _row(
    account: str, agent: str, model: str, started: datetime, cost: str | None, success: bool = True, **extra: object
) -> LedgerRecord:
    return ledger_record(
        success=success,
        started_at=started,
        cost=cost,
        model=model,
        latency_ms=100.0,
        account_id={'acme': 1, 'globex': 2}[account],
        account_slug=account,
        agent_instance_slug=agent,
        chat_session_id=f'{account}-chat',
        input_tokens=100,
        output_tokens=10,
        total_tokens=110,
        error_type=None if success else 'ModelHTTPError',
        raw_contents=[('prompt', '{"q": 1}'), ('response', '{"a": 2}')] if success else [('error', '{"e": 3}')],
        **extra,
    )


@pytest.fixture
async def seeded(tmp_path: Path) -> list[LedgerRecord]:
    records = [
        _row('acme', 'helper', 'gpt-4o-mini', DAY1, '0.001'),
        _row('acme', 'helper', 'gpt-4o-mini', DAY1 + timedelta(minutes=1), '0.002'),
        _row('acme', 'helper', 'gpt-4o', DAY2, '0.050', success=False),
        _row('globex', 'support', 'gpt-4o', DAY2 + timedelta(minutes=1), '0.100'),
        _row('globex', 'support', 'local-llama', DAY2 + timedelta(minutes=2), None),
    ]
    tracker = LLMRequestTracker(fast_config(tmp_path))
    for record in records:
        await tracker.track_request(record)
    await tracker.flush()
    return records
