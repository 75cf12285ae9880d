"""A process on this host, named by its pid and when it started, counted from the host's boot; `Holder`: a process
that holds something in the database (a budget hold, a conversation's claim), so a dead holder can be recognised.

A pid alone is reused; with its start it names one process. On Linux the start is read as the kernel keeps it, in
clock ticks since boot (`/proc/<pid>/stat`), not as psutil's `create_time()`, which adds the boot time as the wall
clock puts it at the moment of the read: that moves whenever the clock is stepped or slewed, and one live process read
minutes apart then looked like another (measured on the 2-core test machine: wall clock minus boot clock moved by
0.14 s in 6 minutes, and a suite run saw a test process's own budget hold swept as a dead process's). The embedded
server's users file compared starts for equality: a live user dropped, the next process to leave took itself for the
last one and stopped the server under it.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

_CLOCK_TICKS = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100
_LINUX = sys.platform.startswith('linux')


def process_start(pid: int) -> float | None:
    """When process `pid` started: seconds since this host booted on Linux (elsewhere psutil's `create_time()`, a time
    those kernels record once); None when there is no such process, it is a zombie, or it cannot be read.

    Compare two values only from the same host: each is a start on its host's own clock.
    """
    if pid <= 0:
        return None
    if _LINUX:
        return _linux_start(pid)
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(process.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def _linux_start(pid: int) -> float | None:
    try:
        stat = Path(f'/proc/{pid}/stat').read_bytes()
    except OSError:  # gone, or not ours to read
        return None
    # `pid (comm) state ppid ...`: the command name may hold spaces and parentheses, so fields count from its last ')'.
    fields = stat[stat.rindex(b')') + 2 :].split()
    if fields[0] == b'Z':
        return None
    return int(fields[19]) / _CLOCK_TICKS  # field 22, `starttime`


_EPOCH_FLOOR = 1e9
"""A start above this is a wall-clock time (2001 on) that an earlier version recorded (psutil's `create_time()`); a
start since boot is never as large."""


def same_process(pid: int, started: float, *, tolerance: float = 0.0) -> bool:
    """Whether `pid` is still the process that started at `started` (a `process_start` value, or an earlier version's
    wall-clock start, compared as it was recorded, within a second, so its live processes are not taken for dead)."""
    current = process_start(pid)
    if current is None:
        return False
    if _LINUX and started >= _EPOCH_FLOOR:
        try:
            current = float(psutil.Process(pid).create_time())
        except psutil.Error:
            return False
        tolerance = max(tolerance, 1.0)
    return abs(current - started) <= tolerance


# Slack when a holder's stored start (a double: stored exactly) is compared with its process's start now. A start
# since boot reads the same every time, so none is needed; a second errs the safe way: a new process with the same pid
# started within it keeps the hold until the hold expires, and a live holder's hold is never swept. (A start an earlier
# version recorded on the wall clock gets its second in `same_process` whatever this is.)
_START_TOLERANCE = 1.0
_HOST_MAX_CHARS = 255


@dataclass(frozen=True)
class Holder:
    """A process that holds something in the database (budget reservations, a conversation's claim).

    Only holders on this host can be checked (`is_alive`); the others are let go when what they hold expires.
    """

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
