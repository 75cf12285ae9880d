"""A process on this host, named by its pid and when it started, counted from the host's boot.

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
import sys
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
