"""The ledger's journal: rows the writer holds in memory (for the commit delay, or while it retries the database)
written to a file of this process's beside the spool, so a process that dies (SIGKILL, the OOM killer) before they
are committed loses none of them: a later replay writes them, exactly once.

A journal holds spool entries (`LedgerRecord.spool_entry()`: the row and its redacted contents) and is emptied
(truncated) each time no row in it is waiting any more, so it stays a few rows long. It is not fsynced: it survives
the death of the process (the kernel keeps what was written), not a crash of the host, which the spool's fsync is
for; fsyncing a row that is about to be committed anyway would cost each held row a disk flush.

Its format is the spool's line per entry with each stored body taken out of the JSON and written after it as it is
(`body_bytes` says how long): a body is JSON text, which a JSON string would escape (every quote), and escaping a
turn's prompts, which hold its history, cost more than the rest of the journal (0.3-0.4 ms of a demo turn's 40). A
replay turns a dead process's journal back into spool lines (`read_journal`); an entry its death cut off part way is
left out, as the row was not committed.

A journal's name says whose it is (`<spool>.journal-<host>-<pid>-<start>-<n>`, the start as `db/processes.py` reads
it), and its process holds a lock on it while it has it open, so a replay tells the journal of a process that is
gone, which it claims (`LedgerSpool.claim`: its entries written as a `.replaying-*` file, replayed as spooled rows
are, then the journal deleted), from that of a live one, which it leaves alone, even one whose pid it cannot see
(another PID namespace). Journals of other hosts (a spool directory shared over the network) are left to their
hosts.
"""

from __future__ import annotations

import fcntl
import glob
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentrt.db.forks import close_here, close_in_child
from agentrt.db.processes import is_alive, this_host, this_process

if TYPE_CHECKING:
    from agentrt.services.ledger._queues import PendingRow
    from agentrt.services.ledger._spool import LedgerSpool

logger = logging.getLogger('agentrt.ledger')

JOURNAL_INFIX = '.journal-'
_MAKING_INFIX = '.journal_making-'  # not a journal's name (`dead_journals` globs the infix above)
_serials = itertools.count(1)  # `next()` on it is atomic: no lock needed across threads


def host_tag(host: str) -> str:
    """A host name as a journal's name carries it: letters, digits, dots and dashes only."""
    return re.sub(r'[^A-Za-z0-9.-]', '_', host) or '_'


class RowJournal:
    """One journal file (a `LoopJournal`'s), opened when first written. Not thread-safe: one event loop uses it."""

    def __init__(self, spool_path: Path) -> None:
        holder = this_process()
        serial = next(_serials)
        name = f'{spool_path.name}{JOURNAL_INFIX}{host_tag(holder.host)}-{holder.pid}-{holder.started:.2f}-{serial}'
        self.path = spool_path.with_name(name)
        self._fd: int | None = None
        self._size = 0

    def write(self, entries: list[dict[str, Any]]) -> None:
        """Append spool entries (one `write`, no fsync). The spool's directory must exist and be private
        (`LedgerSpool.private_directory()`, the caller's check).

        Raises:
            OSError: the file cannot be made or written (a full disk): the rows are still in memory, as without one.
        """
        payload = framed_entries(entries)
        if self._fd is None:
            self._fd = _made_locked(self.path)
            close_in_child(self._fd, self._forget)
        append_whole(self._fd, payload, self._size, fsync=False)
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
            with suppress(OSError):  # before its lock goes with the descriptor: no replay takes it meanwhile
                self.path.unlink()
            with suppress(OSError):
                close_here(fd)

    def _forget(self) -> None:
        """In a forked child, once its copy of the descriptor is closed (`close_in_child`): the journal is the
        parent's, never written nor deleted here."""
        self._fd = None
        self._size = 0


def _made_locked(path: Path) -> int:
    """Make the journal file `path`, locked (`flock`) for as long as this process has it open: a replay takes over
    only a journal it can lock (`dead_journals`), so a live holder its name's pid does not find keeps its journal (a
    process in another PID namespace: containers with one host name sharing the spool's directory). Made under
    another name and renamed once locked, so no replay finds it unlocked. A child this process forks does not keep the
    lock (its copy of the descriptor is closed there: `close_in_child`), so the journal of a process killed outright is
    replayed whatever children it left.

    Raises:
        OSError: it cannot be made.
    """
    making = path.with_name(path.name.replace(JOURNAL_INFIX, _MAKING_INFIX, 1))
    fd = os.open(making, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    close_in_child(fd)  # from the start: `RowJournal.write` names it again, with what to forget there
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(making, path)
    except BaseException:
        with suppress(OSError):
            making.unlink()
        close_here(fd)
        raise
    return fd


def held_by_a_live_process(path: Path) -> bool:
    """Whether a live process holds the journal `path` (its lock, `_made_locked`), or it cannot be looked at (gone,
    or not readable): either way not one to take over."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return True
    close_in_child(fd)  # a child forked meanwhile would keep the dead journal locked
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: it is held
        return True
    finally:
        close_here(fd)  # and the lock with it
    return False


def append_whole(fd: int, payload: bytes, start: int, *, fsync: bool) -> None:
    """Write `payload` at the end of the file `fd` (`start` bytes long) whole, or not at all: a write that fails part
    way (a full disk takes what fits, then raises ENOSPC), or its fsync, is cut back to `start`, so no torn entry
    swallows the next one. The spool's appends (fsynced) and the journal's (not) share it.

    Raises:
        OSError: the write or the fsync failed (the file is as it was, unless cutting it back failed too).
    """
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except OSError:
        with suppress(OSError):
            os.ftruncate(fd, start)
        raise


RETRY_SECONDS = 30.0
"""After the journal could not be written (a full disk), rows are held in memory only for this long; then it is tried
again (so a disk that has room again protects them again)."""


class LoopJournal:
    """What one event loop's writer journals (`LoopQueues.journal`): its file, made when it first holds a row; how
    many rows in it still wait; whether writing it failed (said once until it works again; meanwhile, and for
    `RETRY_SECONDS` after each failure, the loop's rows are in memory only).
    """

    def __init__(self) -> None:
        self._file: RowJournal | None = None
        self.waiting = 0
        self._failing_until: float | None = None

    def hold(self, items: Sequence[PendingRow], spool: LedgerSpool, content_max_bytes: int | None) -> int:
        """Write the prepared rows of `items` not in the journal yet to it: the writer holds them (for the commit delay,
        or while it retries the database). How many were written. A journal that cannot be written costs nothing but
        its protection: said once, and the rows stay in memory as they would without one."""
        items = [item for item in items if not item.journaled]
        failing_until = self._failing_until
        if not items or (failing_until is not None and time.monotonic() < failing_until):
            return 0
        try:
            entries = [item.record.spool_entry(content_max_bytes) for item in items]
            if self._file is None:
                spool.private_directory()
                self._file = RowJournal(spool.path)
            self._file.write(entries)
        except Exception as exc:  # a full disk, an unsafe directory (ConfigError), a bug: never the writer's end
            self._failing_until = time.monotonic() + RETRY_SECONDS
            if failing_until is None:
                logger.warning(
                    'ledger: the journal of held rows cannot be written (%s: %s); until it can, a process killed while '
                    'it holds rows loses them',
                    type(exc).__name__,
                    exc,
                )
            return 0
        if failing_until is not None:
            self._failing_until = None
            logger.warning('ledger: the journal of held rows is written again')
        for item in items:
            item.journaled = True
        self.waiting += len(items)
        return len(items)

    def release(self, items: Sequence[PendingRow]) -> None:
        """`items` were committed or spooled (or given up on): the journal is emptied once none of its rows waits."""
        done = sum(item.journaled for item in items)
        if not done:
            return
        self.waiting = max(self.waiting - done, 0)
        if self.waiting == 0 and self._file is not None:
            try:
                self._file.clear()
            except OSError as exc:  # replayed later as duplicates of committed rows: written once all the same
                logger.warning('ledger: the journal could not be emptied (%s); replayed if this process dies', exc)

    def close(self, *, released: bool = False) -> None:
        """Delete the journal: the loop's writer is done (the tracker closed, or the loop did), and none of its rows
        waits (or, `released`, the caller spooled them)."""
        if released:
            self.waiting = 0
        if self._file is not None and not self.waiting:
            self._file.close()
            self._file = None


def framed_entries(entries: list[dict[str, Any]]) -> bytes:
    """Entries as a journal holds them: each entry's JSON without its bodies and a newline, then each body and a
    newline."""
    chunks: list[bytes] = []
    for entry in entries:
        contents = entry['contents']
        bodies = [content['body'].encode('utf-8', 'surrogatepass') for content in contents]
        described = [
            {**{key: value for key, value in content.items() if key != 'body'}, 'body_bytes': len(body)}
            for content, body in zip(contents, bodies, strict=True)
        ]
        chunks.append(json.dumps({**entry, 'contents': described}, separators=(',', ':')).encode('ascii'))
        chunks.append(b'\n')
        for body in bodies:
            chunks += (body, b'\n')
    return b''.join(chunks)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The spool entries a journal holds. Bytes at its end that are no whole entry (its process died while writing
    it: that row was not committed, and is lost as a request in flight is) are logged and left out. Blocking.

    Raises:
        OSError: the file cannot be read.
    """
    data = path.read_bytes()
    entries: list[dict[str, Any]] = []
    position = 0
    while position < len(data):
        entry, end = _entry_at(data, position)
        if entry is None:
            break
        entries.append(entry)
        position = end
    if position < len(data):
        cut = len(data) - position
        logger.error('ledger: %s ends with %d bytes of no whole row (cut off as its process died)', path.name, cut)
    return entries


def _entry_at(data: bytes, position: int) -> tuple[dict[str, Any] | None, int]:
    """The entry that starts at `position` and where the next one starts; None when it is not whole."""
    end = data.find(b'\n', position)
    if end < 0:
        return None, position
    try:
        header = json.loads(data[position:end])
        contents: list[dict[str, Any]] = []
        position = end + 1
        for described in header['contents']:
            size = described.pop('body_bytes')
            if not isinstance(size, int) or data[position + size : position + size + 1] != b'\n':
                return None, position
            contents.append({**described, 'body': data[position : position + size].decode('utf-8', 'surrogatepass')})
            position += size + 1
    except (ValueError, KeyError, TypeError, AttributeError):  # cut off inside its JSON, or not an entry at all
        return None, position
    return {**header, 'contents': contents}, position


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
    """The journals beside the spool `spool_path` whose processes, on this host, are gone: theirs to replay. Gone: its
    name's pid and start name no process here, and no process holds its lock (one in another PID namespace would)."""
    here = host_tag(this_host())
    found: list[Path] = []
    for path in sorted(spool_path.parent.glob(glob.escape(spool_path.name) + JOURNAL_INFIX + '*')):
        holder = journal_holder(path)
        if holder is None or holder[0] != here or is_alive(holder[1], holder[2]):
            continue
        if path.is_file() and not path.is_symlink() and not held_by_a_live_process(path):
            found.append(path)
    return found
