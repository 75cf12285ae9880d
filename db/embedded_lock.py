"""The lock that orders the starts and stops of an embedded PostgreSQL across processes (`lifecycle_lock`).

A process that holds it runs initdb, pg_ctl start or stop: seconds, pg_ctl's own timeouts bound each. A holder that
does not let go (suspended with Ctrl-Z, stopped with SIGSTOP, hung) kept every other command on the directory waiting
in silence, and for good: the wait ran in a worker thread (`asyncio.to_thread`) that Ctrl-C and SIGTERM could not
stop, so `asyncio.run`'s end waited for it too. The wait is now said (who holds the lock, and whether it is suspended)
and gives up when its caller is stopped (`cancelled`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

from agentrt.db.errors import EmbeddedPostgresError

logger = logging.getLogger('agentrt.db')

SAY_AFTER_SECONDS = 2.0
"""How long a wait for the lock goes unsaid: a start or stop of another process normally ends within it."""
_POLL_SECONDS = 0.1
_WAITING = 'embedded PostgreSQL in %s: %s; waiting for it to finish'


def lock_path(data_dir: Path) -> Path:
    """The lock file of `data_dir`, beside it (the directory itself may not exist yet)."""
    return data_dir.parent / f'.{data_dir.name}.agentrt.lock'


@contextmanager
def lifecycle_lock(data_dir: Path, cancelled: threading.Event | None = None) -> Iterator[None]:
    """An exclusive lock (across processes) on starting and stopping the server of `data_dir`.

    Args:
        data_dir: the cluster's data directory.
        cancelled: set when the caller no longer waits (its task was cancelled: Ctrl-C, SIGTERM): a wait for the lock
            then ends with `EmbeddedPostgresError`; a lock already held is kept to the end of the block.

    Raises:
        EmbeddedPostgresError: the lock file cannot be made or belongs to another user; or the wait was given up.
    """
    path = lock_path(data_dir)
    try:
        # Owner-only, never through a symlink: beside a data directory under /tmp anyone could make it first.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:  # a place where root passes the access check but no file can be made (/proc)
        raise EmbeddedPostgresError(
            f'cannot use the embedded PostgreSQL data directory {data_dir}: {path} cannot be created '
            f'({exc.strerror or exc}). Set AGENTRT_DATA_DIR to a writable path.'
        ) from exc
    owner = os.fstat(fd).st_uid
    if owner not in (os.geteuid(), 0):
        os.close(fd)
        raise EmbeddedPostgresError(
            f'cannot use the embedded PostgreSQL data directory {data_dir}: its lock file {path} belongs to '
            f'another user (uid {owner}), who could hold every start and stop of the server. Set AGENTRT_DATA_DIR '
            'to a directory of your own.'
        )
    with open(fd, 'a') as handle:
        _acquire(handle.fileno(), data_dir, cancelled)
        try:
            with suppress(OSError):  # who holds it, for the next waiter's notice (a full disk: it says less)
                os.ftruncate(handle.fileno(), 0)
                os.write(handle.fileno(), str(os.getpid()).encode())
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _acquire(fd: int, data_dir: Path, cancelled: threading.Event | None) -> None:
    started = time.monotonic()
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if not said and time.monotonic() - started >= SAY_AFTER_SECONDS:
            logger.warning(_WAITING, data_dir, _holder(data_dir))
            said = True
        if cancelled is None:
            time.sleep(_POLL_SECONDS)
        elif cancelled.wait(_POLL_SECONDS):
            raise EmbeddedPostgresError(
                f'embedded PostgreSQL in {data_dir}: stopped while waiting ({_holder(data_dir)})'
            )


def _holder(data_dir: Path) -> str:
    """The process holding the lock, as its pid in the lock file names it (an older agentrt wrote none), and what it
    is doing: `another process (pid N, agentrt) is starting or stopping it`, and what to do when it is suspended."""
    try:
        pid = int(lock_path(data_dir).read_text().strip())
        process = psutil.Process(pid)
        name, status = process.name(), process.status()
    except (OSError, ValueError, psutil.Error):
        return 'another process is starting or stopping it'
    holder = f'another process (pid {pid}, {name}) is starting or stopping it'
    if status == psutil.STATUS_STOPPED:  # the wait would never end: say what lets it go on
        holder += f'; it is suspended (Ctrl-Z or SIGSTOP): resume it with `fg` or `kill -CONT {pid}`'
    return holder
