"""The embedded server started again, in the background, when a process that uses it finds it stopped.

PostgreSQL shuts itself down when its crash recovery fails (a full disk under `pg_wal`: a PANIC, then a recovery that
cannot write its first WAL segment). A long-lived process (`agentrt serve`, `agentrt worker`) then answered every
request with "no server is listening" until someone restarted it, though the disk had room again. Now a connection
that cannot be made to the embedded server asks for a revival (`db/session.py`'s `translated_error`): at most one at
a time, at most one every `INTERVAL_SECONDS`, in a thread of its own (a start takes seconds, the lifecycle lock
may wait for another process, and a stopped server is first given `REVIVAL_GRACE_SECONDS` to be started by whoever
is restarting it). The request that found it stopped still fails (`DatabaseUnavailableError`); the ones
after the revival go through.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from agentrt.db.embedded import revive_embedded

logger = logging.getLogger('agentrt.db')

INTERVAL_SECONDS = 5.0


class EmbeddedRevival:
    """Revivals of one process's embedded server: one thread at a time, spaced by `interval` seconds."""

    def __init__(self, interval: float = INTERVAL_SECONDS) -> None:
        self.interval = interval
        self.revived = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last: float | None = None

    def request(self, data_dir: Path) -> threading.Thread | None:
        """Start the server of `data_dir` again in the background if it stopped (a no-op while it runs): the thread
        doing it, or None when one is running or the last one started less than `interval` seconds ago."""
        now = time.monotonic()
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return None
            if self._last is not None and now - self._last < self.interval:
                return None
            self._last = now
            # A daemon: an exit does not wait for a start that may wait on another process's lifecycle lock.
            thread = threading.Thread(
                target=self._revive, args=(data_dir,), name='agentrt-embedded-revival', daemon=True
            )
            self._thread = thread
        thread.start()
        return thread

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the revival in progress, if any, to end (for tests and shutdown)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _revive(self, data_dir: Path) -> None:
        try:
            if revive_embedded(data_dir):
                self.revived += 1
                logger.warning('embedded PostgreSQL in %s: started again', data_dir)
        except Exception as exc:  # still no room, or another reason it cannot start: the next request tries again
            logger.warning('embedded PostgreSQL in %s could not be started again: %s', data_dir, exc)
