"""Two processes racing one account's budget: each its own engine and pool, admitted together no further than it.

Both open their database first, then are let go at once; with room for 20 of their 50 requests, each was seen to get
part of it (10/10, 17/3, 13/7 in three runs).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from agentrt.services.budgets import sweep_reservations
from tests.factories import scalar
from tests.services.budgets.helpers import give_budget, period_row, reservations
from tests.services.budgets.test_sweep import ROOT, _one_request_holds

TURNS = 25
FITS = 20


async def test_two_processes_racing_one_budget_are_admitted_together_as_far_as_it_fits(
    two_accounts: tuple[int, int], database_url: str, tmp_path: Path
) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1000')
    per_request = await _one_request_holds(alpha)
    spent = (await period_row(alpha) or {})['spent_usd']
    limit = spent + per_request * FITS + per_request / 1000
    await give_budget('alpha', str(limit))
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            '-m',
            'tests.services.budgets.hold_and_die',
            database_url,
            str(alpha),
            str(TURNS),
            str(tmp_path / str(index)),
            'go',
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for index in range(2)
    ]
    try:
        for process in processes:  # both started and connected, then both let go at once
            assert process.stdout is not None
            assert json.loads(await asyncio.wait_for(process.stdout.readline(), 60)) == {'ready': True}
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(b'go\n')
            await process.stdin.drain()
        outcomes = []
        for process in processes:
            assert process.stdout is not None
            outcomes.append(json.loads(await asyncio.wait_for(process.stdout.readline(), 60)))
        assert sum(o['admitted'] for o in outcomes) == FITS and sum(o['refused'] for o in outcomes) == 2 * TURNS - FITS
        row = await period_row(alpha)
        assert row is not None and row['reserved_usd'] == per_request * FITS and len(await reservations(alpha)) == FITS
        assert row['spent_usd'] + row['reserved_usd'] <= limit
    finally:
        for process in processes:
            process.send_signal(signal.SIGKILL)
            await process.wait()
    await sweep_reservations()
    row = await period_row(alpha)
    assert row is not None and row['reserved_usd'] == 0 and row['spent_usd'] == spent
    assert await scalar("SELECT count(*) FROM llm_requests WHERE status = 'refused'") == 2 * TURNS - FITS
