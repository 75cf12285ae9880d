"""The ledger's journal: rows the writer holds in memory (for the commit delay, or while it retries the database)
written to a file of this process's beside the spool, so a process that dies (SIGKILL, the OOM killer) before they
are committed loses none of them: a later replay writes them, exactly once.

A journal holds spool lines (`LedgerRecord.spool_entry()`: the row and its redacted contents) and is emptied
(truncated) each time no row in it is waiting any more, so it stays a few rows long. It is not fsynced: it survives
the death of the process (the kernel keeps what was written), not a crash of the host, which the spool's fsync is
for; fsyncing a row that is about to be committed anyway would cost each held row a disk flush.

A journal's name says whose it is (`<spool>.journal-<host>-<pid>-<start>-<n>`, the start as `db/processes.py` reads
it), so a replay tells the journal of a process that is gone, which it claims like a spool file (renamed to
`.replaying-*`: `LedgerSpool.claim`), from that of a live one, which it leaves alone. Journals of other hosts (a
spool directory shared over the network) are left to their hosts.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any

from agentrt.db.processes import is_alive, this_host, this_process

logger = logging.getLogger('agentrt.ledger')

JOURNAL_INFIX = '.journal-'
_serials = iter(range(1, 2**62))
_serials_lock = threading.Lock()


def host_tag(host: str) -> str:
    """A host name as a journal's name carries it: letters, digits, dots and dashes only."""
    return re.sub(r'[^A-Za-z0-9.-]', '_', host) or '_'


class RowJournal:
    """One event loop's journal file (a tracker's writer per loop: `LoopQueues.journal`), opened when first written.

    Not thread-safe: the loop's writer is its only user.
    """

    def __init__(self, spool_path: Path) -> None:
        holder = this_process()
        with _serials_lock:
            serial = next(_serials)
        name = f'{spool_path.name}{JOURNAL_INFIX}{host_tag(holder.host)}-{holder.pid}-{holder.started:.2f}-{serial}'
        self.path = spool_path.with_name(name)
        self._fd: int | None = None
        self._size = 0

    def write(self, entries: list[dict[str, Any]]) -> None:
        """Append `entries` as spool lines (one `write`, no fsync). The spool's directory must exist and be private
        (`LedgerSpool.private_directory()`, the caller's check).

        Raises:
            OSError: the file cannot be made or written (a full disk): the rows are still in memory, as without one.
        """
        payload = ''.join(json.dumps(entry, separators=(',', ':')) + '\n' for entry in entries).encode('utf-8')
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        view = memoryview(payload)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            with suppress(OSError):  # a line torn by a full disk must not glue itself to the next one
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(payload)

    def clear(self) -> None:
        """Empty the journal: every row in it was committed or spooled."""
        if self._fd is not None and self._size:
            os.ftruncate(self._fd, 0)
            self._size = 0

    def close(self) -> None:
        """Close and delete the journal (its rows were all committed or spooled); safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with suppress(OSError):
                os.close(fd)
            with suppress(OSError):
                self.path.unlink()


def journal_holder(path: Path) -> tuple[str, int, float] | None:
    """The host tag, pid and start a journal's name gives, or None for a name that is not a journal's."""
    _, found, rest = path.name.rpartition(JOURNAL_INFIX)
    parts = rest.rsplit('-', 3)
    if not found or len(parts) != 4:
        return None
    host, pid, started, _serial = parts
    try:
        return host, int(pid), float(started)
    except ValueError:
        return None


def dead_journals(spool_path: Path) -> list[Path]:
    """The journals beside the spool `spool_path` whose processes, on this host, are gone: theirs to replay."""
    here = host_tag(this_host())
    found: list[Path] = []
    for path in sorted(spool_path.parent.glob(glob.escape(spool_path.name) + JOURNAL_INFIX + '*')):
        holder = journal_holder(path)
        if holder is None or holder[0] != here or is_alive(holder[1], holder[2]):
            continue
        if path.is_file() and not path.is_symlink():
            found.append(path)
    return found
