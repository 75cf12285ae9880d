"""Rows neither the database nor the spool took (a full disk under both), kept in memory for a later write."""

from __future__ import annotations

import threading
from typing import Any

# Memory the held rows may take (their bodies, and 1 KiB a row for the rest); past it, a row is lost and logged.
HELD_MAX_BYTES = 64 * 1024 * 1024


class HeldRows:
    """Spool entries kept in memory, oldest first: taken whole by the writer that tries them next, given back whole
    when it fails. Thread-safe: a closing event loop spools from whichever thread closes it."""

    def __init__(self, max_bytes: int = HELD_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def hold(self, entries: list[dict[str, Any]]) -> bool:
        """Keep `entries` if they fit within `max_bytes` with those held already; whether they were kept."""
        with self._lock:
            if sum(map(_size, self._entries + entries)) > self.max_bytes:
                return False
            self._entries.extend(entries)
            return True

    def take(self) -> list[dict[str, Any]]:
        """Every entry held, which are no longer held."""
        with self._lock:
            taken, self._entries = self._entries, []
        return taken

    def give_back(self, entries: list[dict[str, Any]]) -> None:
        """Hold again entries taken for a write that failed, ahead of any held since."""
        if entries:
            with self._lock:
                self._entries[:0] = entries


def _size(entry: dict[str, Any]) -> int:
    return 1024 + sum(len(str(content.get('body', ''))) for content in entry.get('contents') or [])
