"""`agentrt worker`: run the queued background jobs (titles, summaries, usage rollups; `AGENTRT_BACKGROUND=queue`)."""

from __future__ import annotations

import importlib.util
import signal

import typer

from agentrt.agents.cli.logs import show_job_logs
from agentrt.agents.cli.support import (
    EXIT_USAGE,
    Stopped,
    err_console,
    fail,
    long_running,
    run,
    stop_requests,
)


def worker(
    concurrency: int = typer.Option(4, '--concurrency', min=1, max=256, help='Jobs run at once by this process.'),
    burst: bool = typer.Option(False, '--burst', help='Run the jobs due now, then exit (cron, tests).'),
) -> None:
    """Run background jobs from the queue in PostgreSQL until stopped; run as many as needed.

    SIGTERM, Ctrl-C or SIGHUP stop it cleanly (exit code 0): no new job is taken, the running ones finish (at most
    AGENTRT_JOBS_SHUTDOWN_SECONDS, then they go back to the queue for the next worker); a second signal puts them back
    at once.
    """
    if importlib.util.find_spec('procrastinate') is None:
        fail(
            "the worker needs the queue extra (procrastinate not installed): pip install -e '.[queue]' in a clone of "
            "agentrt, pip install 'agentrt[queue]' where it was installed as a package",
            EXIT_USAGE,
        )
    show_job_logs()
    signals: list[int] = []
    if not burst:
        long_running()
    try:
        run(_worker, concurrency, burst, signals)
    except Stopped as stopped:  # before the worker started (connecting to the database)
        signals.append(stopped.signum)
    except KeyboardInterrupt:
        signals.append(signal.SIGINT)
    if signals:  # a stop is how a worker ends: exit code 0 (systemd counts 143 as a failure)
        err_console.print(f'worker stopped by {signal.Signals(signals[0]).name}', highlight=False)


async def _worker(concurrency: int, burst: bool, signals: list[int]) -> None:
    from agentrt.agents.runtime import shutdown_runtime
    from agentrt.db.engine import init_database
    from agentrt.services.heap import freeze_startup_heap
    from agentrt.services.jobs import WorkerStop, run_worker
    from agentrt.services.ledger import get_request_tracker
    from agentrt.services.warnings_log import log_warnings

    log_warnings()  # a library's warning as a line of the worker's log, not Python's paragraph
    await init_database()
    if not burst:  # a process that runs until stopped: its start-up objects out of the cyclic GC's way
        # Rows an earlier process spooled while the database was down reach the costs now, not at the first ledger
        # write of this one (a worker may never make one).
        get_request_tracker().replay_pending_in_background()
        freeze_startup_heap()
    stop = WorkerStop()

    def requested(signum: int) -> None:
        signals.append(signum)
        stop.request()

    with stop_requests(requested):  # the cleanup below too: a second signal cuts jobs short, never the cleanup
        try:
            await run_worker(concurrency=concurrency, burst=burst, stop=stop)
        finally:
            await shutdown_runtime(release_embedded_server=True)
