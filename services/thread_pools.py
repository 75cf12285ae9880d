"""`ProcessThreadPool`: a process's own pool of worker threads for one kind of CPU-bound work, made on first use."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor


class ProcessThreadPool:
    """A `ThreadPoolExecutor` of its own for one kind of work, apart from the event loop's default executor (a burst
    of that work must not hold up the other users of `asyncio.to_thread`), made on first use and shared by every
    event loop of the process. A forked child, where the parent's threads do not exist, makes a new one."""

    def __init__(self, threads: int, name: str) -> None:
        """Describe the pool; nothing is started before `executor()` is first called.

        Args:
            threads: at most this many run side by side.
            name: the threads' name prefix.
        """
        self.threads = threads
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def executor(self) -> ThreadPoolExecutor:
        """The pool, made now if this process has none yet."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=self.name)
            return self._pool

    def _forget(self) -> None:
        self._pool, self._lock = None, threading.Lock()
