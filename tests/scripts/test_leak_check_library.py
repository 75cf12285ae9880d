"""scripts/leak_check_library.py (README "Benchmarks") runs as the README gives it, without `AGENTRT_DATA_DIR`, and
leaves the medical account's budget as it found it: its own budget, left in place, refused every later turn of the
demo model on that database (`agentrt chat` exit 10, "model 'demo' has no price ... has a budget")."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.budgets import Period, account_budget_status, set_budget
from agentrt.services.demo_data import MEDICAL_ACCOUNT
from tests.agents.cli.helpers import run_script

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
