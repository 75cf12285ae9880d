"""Who holds a reservation: the host, process id and process start time, so a dead holder can be recognised.

A process id alone is reused; with its start time (`agentrt.db.processes.process_start`, counted from the host's boot)
it names one process. Only holders on this host can be checked; the others are released when their reservations
expire.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from agentrt.db.processes import process_start, same_process

# Slack when a holder's stored start (a double: stored exactly) is compared with its process's start now. A start
# since boot reads the same every time, so none is needed; a second errs the safe way: a new process with the same pid
# started within it keeps the hold until the hold expires, and a live holder's hold is never swept. (A start an earlier
# version recorded on the wall clock gets its second in `same_process` whatever this is.)
_START_TOLERANCE = 1.0
_HOST_MAX_CHARS = 255


@dataclass(frozen=True)
class Holder:
    """A process that holds reservations."""

    host: str
    pid: int
    started: float


_this: Holder | None = None


def this_process() -> Holder:
    """This process (recomputed in a forked child)."""
    global _this
    if _this is None or _this.pid != os.getpid():
        _this = Holder(host=this_host(), pid=os.getpid(), started=process_start(os.getpid()) or 0.0)
    return _this


def this_host() -> str:
    """This host's name, as holders record it."""
    return socket.gethostname()[:_HOST_MAX_CHARS]


def is_alive(pid: int, started: float) -> bool:
    """Whether the process `pid` that started at `started` still runs on this host."""
    return same_process(pid, started, tolerance=_START_TOLERANCE)
