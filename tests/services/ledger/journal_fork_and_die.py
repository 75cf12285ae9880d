"""A process whose ledger writer holds rows in its journal, which forks a child that lives on and is then killed.

`python -m tests.services.ledger.journal_fork_and_die SPOOL COUNT fork|pool OUT`: submits COUNT rows to a tracker whose
commit delay is 10 minutes (held, so journaled beside the spool SPOOL), starts a child that outlives it (`fork`: a bare
`os.fork()`, sleeping; `pool`: the worker of a fork-context `ProcessPoolExecutor`, orphaned as it is left) and, once
the child runs, writes `{"child": PID, "ids": [...]}` to the file OUT (not to stdout, which the child would hold open)
and SIGKILLs itself. No database: the rows are held, never written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

from agentrt.services.ledger import LLMRequestTracker
from tests.factories import fast_config, ledger_record


def _pid() -> int:
    return os.getpid()


def _forked() -> int:
    """A bare fork's child that sleeps; returned once it runs (its fork hooks have run by then)."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write_end, b'.')
        time.sleep(120)
        os._exit(0)
    os.read(read_end, 1)
    return child


async def main(spool: Path, count: int, kind: str, out: Path) -> None:
    tracker = LLMRequestTracker(fast_config(spool.parent, spool_path=spool, commit_delay_ms=600_000))
    records = [ledger_record(account_id=None) for _ in range(count)]
    for record in records:
        tracker.submit(record)
    for _ in range(1000):
        if tracker.stats.journaled == count:
            break
        await asyncio.sleep(0.01)
    if kind == 'pool':
        pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('fork'))
        child = pool.submit(_pid).result()
    else:
        child = _forked()
    said = {'child': child, 'journaled': tracker.stats.journaled, 'ids': [str(record.id) for record in records]}
    out.write_text(json.dumps(said))  # noqa: ASYNC240 - the last thing the process does: nothing waits on its loop
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == '__main__':
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])))
