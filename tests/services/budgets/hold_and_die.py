"""A process that races model requests against a budget and never finishes them, so the test can SIGKILL it.

`python -m tests.services.budgets.hold_and_die DATABASE_URL ACCOUNT_ID TURNS DATA_DIR [go]`: runs TURNS runs at once
through an agent with the ledger capability, on a model that holds every admitted request forever; prints one JSON
line (`{"admitted": n, "refused": m}`) once every run is admitted (held at the model) or refused, then waits to be
killed. With `go`, it first prints `{"ready": true}` once its database is open and starts the runs when a line
arrives on its standard input (so two processes can start racing at once).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from pydantic_ai import Agent

from agentrt.agents.errors import BudgetExceededError
from agentrt.db.engine import init_database
from agentrt.db.settings import Settings
from agentrt.services.ledger import ledger_capability
from tests.factories import chat_deps
from tests.services.budgets.priced_model import PricedModel


async def main(url: str, account_id: int, turns: int, data_dir: Path, wait_for_go: bool = False) -> None:
    # A directory of the test's (this process is killed: it cannot remove one of its own).
    await init_database(Settings(database_url=url, data_dir=data_dir, pool_size=5), migrate=False)
    if wait_for_go:
        print(json.dumps({'ready': True}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    model = PricedModel(gate=asyncio.Event())  # never opened
    agent = Agent(model, capabilities=[ledger_capability()])
    runs = [
        asyncio.create_task(agent.run('How many cardiologists?', deps=chat_deps(f'doomed-{i:02d}', account_id)))
        for i in range(turns)
    ]
    while model.arrived + sum(run.done() for run in runs) < turns:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    refused = sum(1 for run in runs if run.done() and isinstance(run.exception(), BudgetExceededError))
    print(json.dumps({'admitted': model.arrived, 'refused': refused}), flush=True)
    await asyncio.Event().wait()


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5:] == ['go']))
