"""A spool this process cannot write is said when a long-lived process starts (`replay_pending_in_background`, what
`agentrt serve` and `agentrt worker` call), not found out during an outage: the default spool, which the configuration
does not check, under a home on a read-only file system (a container's), for one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agentrt.services.ledger import LLMRequestTracker
from tests.factories import fast_config
from tests.mounts import read_only_bind


async def test_a_spool_on_a_read_only_file_system_is_said_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / 'home'
    home.mkdir(mode=0o700)
    spool_path = home / '.local' / 'share' / 'agentrt' / 'ledger-spool' / 'llm-ledger.jsonl'
    tracker = LLMRequestTracker(fast_config(tmp_path, spool_path=spool_path))
    with read_only_bind(home) as mounted, caplog.at_level(logging.WARNING, logger='agentrt.ledger'):
        if not mounted:
            pytest.skip('bind mounts are not allowed here')
        assert tracker.replay_pending_in_background() is False  # nothing to replay; said all the same
    said = [record.getMessage() for record in caplog.records if record.name == 'agentrt.ledger']
    assert said == [
        f'ledger: {home} is on a read-only file system, so the spool file cannot be written there: rows written while '
        "the database is down would be held in this process's memory only (up to 64 MiB) and lost if it ended first; "
        'set AGENTRT_LEDGER_SPOOL to a file it can write'
    ]
    assert tracker.spool_warning() is None  # the same path, writable again: nothing to say
