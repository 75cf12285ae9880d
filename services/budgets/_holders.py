"""Who holds a reservation: the host, process id and process start time, so a dead holder can be recognised.

A process id alone is reused; with its start time it names one process. Only holders on this host can be checked
(`psutil`); the others are released when their reservations expire.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import psutil

# Process start times are kept to the second: `create_time()` of one process can differ by rounding between reads.
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
        _this = Holder(host=this_host(), pid=os.getpid(), started=_start_time(os.getpid()) or 0.0)
    return _this


def this_host() -> str:
    """This host's name, as holders record it."""
    return socket.gethostname()[:_HOST_MAX_CHARS]


def is_alive(pid: int, started: float) -> bool:
    """Whether the process `pid` that started at `started` still runs on this host."""
    current = _start_time(pid)
    return current is not None and abs(current - started) <= _START_TOLERANCE


def _start_time(pid: int) -> float | None:
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(process.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None
