"""scripts/leak_check_library.py (README "Benchmarks") runs as the README gives it, without `AGENTRT_DATA_DIR`, and
leaves the medical account's budget as it found it: its own budget, left in place, refused every later turn of the
demo model on that database (`agentrt chat` exit 10, "model 'demo' has no price ... has a budget")."""

from __future__ import annotations

import asyncio
import json
import os
import runpy
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import text

from agentrt.db.processes import this_host
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.budgets import Holder, Period, account_budget_status, reserve, set_budget
from agentrt.services.demo_data import MEDICAL_ACCOUNT
from agentrt.services.ledger import new_request_id, utc_now
from tests.agents.cli.helpers import invoke, run_script
from tests.agents.conftest import account_id
from tests.services.budgets.helpers import give_budget

SCRIPT = Path(__file__).resolve().parents[2] / 'scripts' / 'leak_check_library.py'
SMALL = ['--turns', '6', '--concurrency', '2', '--long-turns', '3', '--sample-every', '3', '--idle-seconds', '0']


async def _run(database_url: str, tmp_path: Path) -> None:
    # No AGENTRT_DATA_DIR (a KeyError before the fix); DATABASE_URL: the suite's database, as the script's doc allows.
    env = {'DATABASE_URL': database_url, 'AGENTRT_DATA_DIR': None, 'AGENTRT_LEDGER_SPOOL': str(tmp_path / 's.jsonl')}
    result = await run_script(SCRIPT, *SMALL, env=env)  # type: ignore[arg-type]
    assert result.exit_code == 0, result.stdout + result.stderr
    assert 'checks:' in result.stdout


async def _budget() -> tuple[Decimal, str] | None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        status = await account_budget_status(session=session, account=MEDICAL_ACCOUNT)
    return None if status is None else (status.limit_usd, status.period)


@pytest.mark.timeout(180)
async def test_an_account_without_a_budget_has_none_after_the_run(
    demo_data: None, database_url: str, tmp_path: Path
) -> None:
    assert await _budget() is None
    await _run(database_url, tmp_path)
    assert await _budget() is None


@pytest.mark.timeout(180)
async def test_an_accounts_own_budget_is_put_back(demo_data: None, database_url: str, tmp_path: Path) -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await set_budget(session=session, account=MEDICAL_ACCOUNT, limit_usd=Decimal('7.5'), period=Period.parse('2d'))
    await _run(database_url, tmp_path)
    assert await _budget() == (Decimal('7.5'), '2d')


STOPPED_AT_ITS_FIRST_REQUEST = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a shell's: the test worker's (xdist) is ignored
import bench_common

stop, built, sent = getattr(signal, sys.argv[1]), bench_common.demo_planner_model, []

def stopping_model(latency):
    model = built(latency)
    respond = model.function

    async def first_request_stops(messages, info):
        if not sent:  # once: a second signal would be a second Ctrl-C
            sent.append(stop)
            os.kill(os.getpid(), stop)
        return await respond(messages, info)

    model.function = first_request_stops
    return model

bench_common.demo_planner_model = stopping_model
sys.argv = ['leak_check_library.py', *sys.argv[2:]]
runpy.run_path('leak_check_library.py', run_name='__main__')
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize('signal_name', ['SIGTERM', 'SIGINT'])
async def test_a_stopped_run_puts_the_budget_back_and_says_so_in_one_line(
    signal_name: str, demo_data: None, database_url: str, tmp_path: Path
) -> None:
    # SIGTERM killed it with its $100,000 budget (and the holds of its turns in flight) left on the account: every
    # later demo chat was refused; Ctrl-C put the budget back but ended in a KeyboardInterrupt traceback (QA).
    # The signal comes from the run's own process as its model answers its first request: the turns are under way.
    env = {**os.environ, 'DATABASE_URL': database_url, 'AGENTRT_LEDGER_SPOOL': str(tmp_path / 's.jsonl')}
    args = ['--turns', '40', '--concurrency', '3', '--kinds', 'new', '--latency', '0.05', '--idle-seconds', '0']
    command = [sys.executable, '-c', STOPPED_AT_ITS_FIRST_REQUEST, signal_name, *args]
    scripts = SCRIPT.parent
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=90, env=env, cwd=scripts, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 130, output
    assert result.stderr.strip().splitlines() == [
        "interrupted; its clean-up ran: the account's budget is as it was (its turns' rows stay, as after a run)"
    ], output
    assert await _budget() is None
    async with get_db_session(account=Unscoped.ADMIN) as session:
        assert (await session.execute(text('SELECT count(*) FROM budget_reservations'))).scalar_one() == 0
        assert (await session.execute(text('SELECT count(*) FROM conversation_turns'))).scalar_one() == 0


async def test_its_cut_short_line_names_the_sweep_that_releases_the_holds_it_left(
    demo_data: None, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run whose clean-up a second Ctrl-C cut short left 2 budget holds, which its line did not mention (QA). They are
    # its process's, which has ended: `agentrt budget sweep`, which the line names, gives them back.
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # its `from bench_common import ...`
    said = runpy.run_path(str(SCRIPT))['CUT_SHORT']
    assert '`agentrt budget sweep` on the same database releases' in said
    medical = await account_id(MEDICAL_ACCOUNT)
    await give_budget(medical, '100000')
    await reserve(
        request_id=new_request_id(),
        account_id=medical,
        full_usd=Decimal('0.01'),
        minimum_usd=Decimal('0.01'),
        input_usd=Decimal('0.001'),
        at=utc_now(),
        ttl_seconds=3600,
        holder=Holder(this_host(), os.getpid(), 1.0),  # this pid, another start: a process that has ended
    )
    swept = await invoke('budget', 'sweep', '--json', env={'DATABASE_URL': database_url})
    assert swept.exit_code == 0 and json.loads(swept.stdout)['released_dead'] == 1, swept.stdout + swept.stderr
    async with get_db_session(account=Unscoped.ADMIN) as session:
        assert (await session.execute(text('SELECT count(*) FROM budget_reservations'))).scalar_one() == 0
