"""The ledger's local spool: an append-only JSON-lines file for rows the database could not take, replayed later."""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentrt.db.errors import ConfigError
from agentrt.db.forks import close_here, close_in_child
from agentrt.db.settings import unsafe_directory
from agentrt.services.ledger._journal import append_whole, dead_journals, journal_holder, read_journal

logger = logging.getLogger('agentrt.ledger')


@dataclass(frozen=True)
class SpoolBatch:
    """Entries of a claimed spool file read together (`LedgerSpool.read_batch`)."""

    entries: list[dict[str, Any]]
    bad: list[str]
    """The lines that are not valid entries (a torn line, another file's text)."""
    end: int
    """Where the next batch starts (an opaque position of the file)."""
    done: bool
    """The file ended: no batch after this one."""


class LedgerSpool:
    """Append-only spool of ledger entries, one JSON object per line (`LedgerRecord.spool_entry()` makes them).

    Appends are flushed and fsynced before they return, and safe across processes (`flock`).
    Replay claims the file by renaming it (new appends start a fresh file), so a replay never races
    a writer, and a claimed file is deleted only after every row in it was written. Rows carry
    their minted key, so replaying a file twice (after a crash) still writes each row once.
    Contents are redacted before they are spooled: no secret reaches the disk either.

    The spool is private: its directory is made owner-only, and one that another user owns or that others may write
    (a data directory under `/tmp` puts the default spool in `/tmp/ledger-spool`, which anyone could make first) is
    refused (`ConfigError`), for writing and for replaying alike: someone who can plant a file there has a replay
    write rows of their choosing into any account's ledger. Files are opened without following a symlink, and the
    lines a replay sets aside (`.rejected`) are as private as the spool.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def lock_path(self) -> Path:
        """The lock file that serialises replays across processes."""
        return self.path.with_name(self.path.name + '.lock')

    @property
    def rejected_path(self) -> Path:
        """Where lines that can never be written (unparseable, invalid) are moved, for a person to look at."""
        return self.path.with_name(self.path.name + '.rejected')

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Append entries as JSON lines, then flush and fsync. Blocking: call it in a thread from async code.

        Raises:
            OSError: the spool cannot be written (disk full, permissions).
        """
        if not entries:
            return
        payload = _lines(entries)
        self.private_directory()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)  # read: its last byte
            close_in_child(fd)  # a child forked meanwhile kept the lock, and every later append waited for its end
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # A replay may have renamed the file between our open and our lock: write to the live one.
                if not self._is_live(fd):
                    continue
                self._append_locked(fd, payload)
                return
            finally:
                close_here(fd)

    @staticmethod
    def _append_locked(fd: int, payload: bytes) -> None:
        """Write `payload` at the end of the file whole, or not at all (under the append lock).

        A write that fails part way (a full disk takes what fits, then raises ENOSPC) is cut off again: left there, the
        torn line swallowed the next append's first row, which the replay then set aside as unreadable with it. A
        file that does not end with a newline (torn by a crash) gets one first, for the same reason.
        """
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b'\n':
            payload = b'\n' + payload
        append_whole(fd, payload, start, fsync=True)

    def _is_live(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def private_directory(self) -> None:
        """Make the spool's directory (owner-only) if missing; refuse one someone else could write.

        Raises:
            ConfigError: the directory is another user's, or writable by its group or by anyone.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        problem = unsafe_directory(self.path.parent)
        if problem is not None:
            raise ConfigError(
                f'ledger spool: the directory {self.path.parent} {problem}, so others could read, replace or plant '
                'spooled rows; refusing to use it. Point AGENTRT_LEDGER_SPOOL (or AGENTRT_DATA_DIR, the default '
                'spool sits beside it) at a directory of your own, or make it owner-only (chmod 700)'
            )

    def pending_files(self) -> list[Path]:
        """The live spool file (if not empty), any claimed files a crashed replay left behind, and the journals of
        processes that died holding rows (`_journal.py`); nothing in a directory others may write
        (`private_directory`). The empty journal of a process that died holding nothing is deleted as it is found:
        nothing would replay it, so each killed process left one file behind for good."""
        if self.path.parent.exists() and unsafe_directory(self.path.parent) is not None:
            return []
        found = self.claimed_files() if self.path.parent.exists() else []
        if self.path.parent.exists():
            for journal in dead_journals(self.path):
                if _size(journal):
                    found.append(journal)
                else:
                    _delete_empty(journal)
        try:
            status = self.path.lstat()  # a symlink is no spool file (`claim`), whatever it points at
        except FileNotFoundError:
            return found
        # A directory, a device or someone else's file is no spool of ours.
        if stat.S_ISREG(status.st_mode) and status.st_size > 0 and self.holds_spooled_rows():
            found.append(self.path)
        return found

    def holds_spooled_rows(self) -> bool:
        """Whether the spool file is missing, blank, or one of its first lines is a spooled row. A replay claims
        nothing else: it renames the file, moves what it cannot write to `.rejected` and deletes it, so a spool path
        naming someone's file (AGENTRT_LEDGER_SPOOL=~/.bashrc) would take it away. Three lines, not one: a crash can
        tear the first append, and the next one continues that line."""
        try:
            with self.path.open('rb') as handle:
                lines = [line for line in (handle.readline(_FIRST_LINE_BYTES) for _ in range(64)) if line.strip()][:3]
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return not lines or any(_is_spooled_row(line) for line in lines)

    def has_pending(self) -> bool:
        """True when there is anything to replay."""
        return bool(self.pending_files())

    @contextmanager
    def replay_lock(self) -> Iterator[bool]:
        """Hold the cross-process replay lock without waiting; yields False when another replay holds it.

        Raises:
            ConfigError: the spool's directory is not private (`private_directory`).
        """
        self.private_directory()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        # A child forked during the replay (a worker pool the process starts) kept the lock: every later replay said
        # another one was running, for as long as that child lived.
        close_in_child(fd)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            close_here(fd)

    def claim(self) -> list[Path]:
        """Rename the live spool aside (under the append lock) and return every claimed file, oldest first.

        Call only while holding `replay_lock()`.
        """
        if self.path.is_symlink():
            # Its target may be anyone's file, under any directory: the private directory holds only the link (QA:
            # a link to a world-writable file was replayed into the ledger).
            logger.error('ledger spool: %s is a symlink, which is not followed; left as it is', self.path)
        elif self.path.exists():
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            close_in_child(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                status = os.fstat(fd)
                # Only a regular file: a spool path naming a directory (`--spool /tmp`) renamed the directory away.
                live = self._is_live(fd) and stat.S_ISREG(status.st_mode) and status.st_size > 0
                if live and not self.holds_spooled_rows():
                    logger.error('ledger spool: %s holds no spooled rows (another file?); left as it is', self.path)
                elif live:
                    target = self.path.with_name(f'{self.path.name}.replaying-{time.time_ns()}-{os.getpid()}')
                    os.rename(self.path, target)
            finally:
                close_here(fd)
        self._claim_dead_journals()
        return self.claimed_files()

    def _claim_dead_journals(self) -> None:
        """Take over the journals of processes that died (their rows, held for the commit delay or retries, were
        never committed): each becomes a claimed file, replayed as spooled rows are, exactly once; an empty one is
        deleted. A journal that cannot be taken over now (a full disk under the spool) stays for the next replay,
        said in a warning, and the rest is replayed: it stopped the whole replay, spooled rows too, as an internal
        error."""
        for journal in dead_journals(self.path):
            try:
                entries = read_journal(journal)
                if entries:
                    logger.warning('ledger: replaying %d row(s) an ended process left: %s', len(entries), journal.name)
                    self._write_claimed(entries, journal)
                journal.unlink()
            except FileNotFoundError:  # gone meanwhile: another replay took it
                continue
            except OSError as exc:
                logger.warning(
                    'ledger: the rows an ended process left in %s cannot be taken over now (%s); left for the next '
                    'replay',
                    journal.name,
                    exc.strerror or exc,
                )

    def _write_claimed(self, entries: list[dict[str, Any]], journal: Path) -> None:
        """Write `entries` as a claimed file of their own, whole and fsynced (before their `journal` is deleted: a
        crash in between replays both, each row once). Named for the journal's process, not with the journal's whole
        name, which holds the spool's name already: twice that went past a file system's 255-byte names.

        Raises:
            OSError: the file cannot be made or written whole (none is left behind).
        """
        holder = journal_holder(journal)
        claimed = self.path.with_name(f'{self.path.name}.replaying-{time.time_ns()}-j{holder[1] if holder else 0}')
        fd = os.open(claimed, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            self._append_locked(fd, _lines(entries))
        except OSError:
            with suppress(OSError):
                claimed.unlink()
            raise
        finally:
            os.close(fd)

    def claimed_files(self) -> list[Path]:
        """The `.replaying-*` files beside the spool: claimed by a replay, and left there if it did not finish."""
        # Escaped: a spool named `spool[1].jsonl` otherwise matched nothing (`[1]` is a character class).
        return sorted(self.path.parent.glob(glob.escape(self.path.name) + '.replaying-*'))

    def read_batch(self, path: Path, offset: int, size: int) -> SpoolBatch:
        """Parse at most `size` entries of a claimed file from `offset` (0, or the `end` of the batch before), and
        the lines among them that are not valid entries. Blocking: call it in a thread from async code.

        A replay reads a file a batch at a time, so a large spool is never all in memory at once.
        """
        entries: list[dict[str, Any]] = []
        bad: list[str] = []
        with open(path, encoding='utf-8', errors='replace') as handle:
            handle.seek(offset)
            while len(entries) < size:
                line = handle.readline()
                if not line:
                    return SpoolBatch(entries, bad, handle.tell(), done=True)
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    torn, entry = _glued(line)
                    bad.append(torn)
                    if entry is None:
                        continue
                if _is_entry(entry):
                    entries.append(entry)
                else:
                    bad.append(line)
            return SpoolBatch(entries, bad, handle.tell(), done=False)

    def reject(self, lines: list[str]) -> None:
        """Keep lines that can never be written in the `.rejected` file, fsynced, and log how many."""
        if not lines:
            return
        fd = os.open(self.rejected_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with open(fd, 'a', encoding='utf-8') as handle:
            handle.writelines(line if line.endswith('\n') else line + '\n' for line in lines)
            handle.flush()
            os.fsync(handle.fileno())
        logger.error('ledger spool: %d unwritable line(s) moved to %s', len(lines), self.rejected_path)

    def release(self, path: Path) -> None:
        """Delete a claimed file once all of its rows are in the database."""
        path.unlink(missing_ok=True)


def _lines(entries: list[dict[str, Any]]) -> bytes:
    """Entries as spool lines: one JSON object per line."""
    return ''.join(json.dumps(entry, separators=(',', ':')) + '\n' for entry in entries).encode('utf-8')


def _delete_empty(journal: Path) -> None:
    """Delete the empty journal of a process that is gone (no one writes it again). Another process may have deleted it
    already; a spool directory that became read-only keeps it, which costs nothing but the file."""
    with suppress(OSError):
        journal.unlink()


def _size(path: Path) -> int:
    """A file's size; 0 for one that is gone (a replay took it meanwhile)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


_FIRST_LINE_BYTES = 8 * 1024 * 1024
_ENTRY_START = '{"v"'  # how `LedgerRecord.spool_entry()` lines begin


def _glued(line: str) -> tuple[str, dict[str, Any] | None]:
    """A line that is not JSON: a torn write with a whole entry glued after it (a spool written before appends cut
    off what they tore), split into the torn part (set aside) and that entry; else the line and None."""
    start = line.find(_ENTRY_START, 1)
    while start > 0:
        try:
            entry = json.loads(line[start:])
        except json.JSONDecodeError:
            start = line.find(_ENTRY_START, start + 1)
            continue
        if _is_entry(entry):
            return line[:start] + '\n', entry
        break
    return line, None


def _is_spooled_row(line: bytes) -> bool:
    try:
        entry = json.loads(line)
    except UnicodeDecodeError:
        return False
    except ValueError:  # not JSON, or cut at _FIRST_LINE_BYTES; or a torn write with an entry glued after it
        entry = _glued(line.decode('utf-8', errors='replace'))[1]
    return _is_entry(entry)


def _is_entry(value: Any) -> bool:
    """Whether a parsed line is a spool entry (an object with its ledger row), not some other JSON."""
    return isinstance(value, dict) and isinstance(value.get('row'), dict)
