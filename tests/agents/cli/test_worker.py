"""`agentrt worker` in this process (`invoke`): what its log shows. Its stops and faults, as separate processes, are in
tests/services/jobs/."""

from __future__ import annotations

from sqlalchemy import text

from agentrt.db.session import Unscoped, get_db_session
from tests.agents.cli.helpers import invoke
from tests.services.jobs.helpers import PROCRASTINATE_TABLES, queue_url

_ROLLUP = (
    "INSERT INTO procrastinate_jobs (queue_name, task_name, args) VALUES ('post_turn', 'agentrt.usage_rollup', :a)"
)


async def _one_job_queued() -> None:
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text(f'TRUNCATE {PROCRASTINATE_TABLES} RESTART IDENTITY CASCADE'))
        await session.execute(text(_ROLLUP), {'a': '{"account_id": 1}'})


async def test_verbose_shows_each_job_and_how_it_ended(demo_data: None, database_url: str) -> None:
    # `agentrt -v worker` ("show debug logs") showed no line of the jobs it ran: procrastinate's lines were hidden.
    env = {'DATABASE_URL': queue_url(database_url)}
    await _one_job_queued()
    verbose = await invoke('-v', 'worker', '--burst', env=env)
    assert verbose.exit_code == 0, verbose.stderr[-2000:]
    assert 'Job agentrt.usage_rollup[1](account_id=1) ended with status: Success' in verbose.stderr, verbose.stderr
    await _one_job_queued()
    quiet = await invoke('worker', '--burst', env=env)
    assert quiet.exit_code == 0, quiet.stderr[-2000:]
    assert 'worker: queues' in quiet.stderr and 'ended with status' not in quiet.stderr, quiet.stderr
