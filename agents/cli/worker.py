"""`agentrt worker`: run the queued background jobs (titles, summaries, usage rollups; `AGENTRT_BACKGROUND=queue`)."""

from __future__ import annotations

import importlib.util

import typer

from agentrt.agents.cli.support import EXIT_USAGE, fail, run


def worker(
    concurrency: int = typer.Option(4, '--concurrency', min=1, max=256, help='Jobs run at once by this process.'),
    burst: bool = typer.Option(False, '--burst', help='Run the jobs due now, then exit (cron, tests).'),
) -> None:
    """Run background jobs from the queue in PostgreSQL until stopped (Ctrl-C, SIGTERM); run as many as needed."""
    if importlib.util.find_spec('procrastinate') is None:
        fail("the worker needs the queue extra (procrastinate not installed): pip install 'agentrt[queue]'", EXIT_USAGE)
    run(_worker, concurrency, burst)


async def _worker(concurrency: int, burst: bool) -> None:
    from agentrt.agents.runtime import shutdown_runtime
    from agentrt.db.engine import init_database
    from agentrt.services.heap import freeze_startup_heap
    from agentrt.services.jobs import run_worker

    await init_database()
    if not burst:  # a process that runs until stopped: its start-up objects out of the cyclic GC's way
        freeze_startup_heap()
    try:
        await run_worker(concurrency=concurrency, burst=burst)
    finally:
        await shutdown_runtime(release_embedded_server=True)
