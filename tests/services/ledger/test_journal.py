"""The writer's journal: the rows it holds (for the commit delay, or while it retries the database) are in a file of
the process's beside the spool until they are committed, so a process killed meanwhile loses none; a replay takes over
the journal of a process that is gone, exactly once, and leaves a live one's alone.

The end to end case, a turn's process killed while its first row is held, is in `tests/agents/test_killed_turn.py`.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from agentrt.db.driver import DriverTransaction, driver_transaction
from agentrt.db.processes import process_start, this_host
from agentrt.db.roles import Unscoped
from agentrt.db.settings import SPOOL_NAME_MAX_BYTES
from agentrt.services.ledger import LedgerRecord, LLMRequestTracker, _journal, utc_now
from agentrt.services.ledger._journal import (
    RowJournal,
    dead_journals,
    framed_entries,
    held_by_a_live_process,
    host_tag,
    journal_holder,
    read_journal,
)
from agentrt.services.ledger._spool import LedgerSpool
from tests.factories import fast_config, journal_left_by_a_killed_process, ledger_record, ledger_rows, scalar

LONG_DELAY_MS = 600_000  # held until the test commits it


def _records(count: int) -> list[LedgerRecord]:
    now = utc_now()
    return [ledger_record(started_at=now, finished_at=now) for _ in range(count)]


def _journals(tracker: LLMRequestTracker) -> list[Path]:
    spool = tracker.spool.path
    return sorted(spool.parent.glob(spool.name + '.journal-*'))


async def _until(check: Any, what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f'timed out waiting for {what}')


async def test_a_held_row_is_in_the_journal_until_committed_and_the_journal_goes_when_the_tracker_closes(
    clean_database: None, tmp_path: Path
) -> None:
    tracker = LLMRequestTracker(fast_config(tmp_path, commit_delay_ms=LONG_DELAY_MS))
    first, second = _records(2)
    futures = [tracker.submit(first), tracker.submit(second)]
    await _until(lambda: tracker.stats.journaled == 2, 'the held rows to be journaled')
    [journal] = _journals(tracker)
    entries = read_journal(journal)
    # In the order they became ready (a row prepared in a worker thread may come second).
    assert sorted(entry['row']['id'] for entry in entries) == sorted([str(first.id), str(second.id)])
    assert all({content['kind'] for content in entry['contents']} == {'prompt', 'response'} for entry in entries)
    assert journal.stat().st_mode & 0o777 == 0o600
    assert await scalar('SELECT count(*) FROM llm_requests') == 0  # held, not committed

    tracker.commit_now(futures)
    assert await asyncio.gather(*futures) == ['written', 'written']
    assert journal.stat().st_size == 0  # emptied once none of its rows waits
    assert len(await ledger_rows()) == 2

    third = _records(1)[0]
    await tracker.track_request(third)  # committed at once: never held, never journaled
    assert tracker.stats.journaled == 2 and journal.stat().st_size == 0
    await tracker.aclose()
    assert _journals(tracker) == []


async def test_rows_are_journaled_while_the_writer_retries_a_database_that_is_away(
    clean_database: None, tmp_path: Path
) -> None:
    """A database outage keeps a batch in the writer's memory through its retries (minutes with the default policy):
    a process killed then took its rows with it (41 rows once, behind a PgBouncer outage)."""
    refused = asyncio.Event()
    journaled_during_outage: list[int] = []
    tracker: LLMRequestTracker

    @asynccontextmanager
    async def away_then_back() -> AsyncIterator[DriverTransaction]:
        if not refused.is_set():
            refused.set()
            raise ConnectionRefusedError('the database is restarting')
        journaled_during_outage.append(sum(len(read_journal(path)) for path in _journals(tracker)))
        async with driver_transaction(account=Unscoped.LEDGER) as transaction:
            yield transaction

    tracker = LLMRequestTracker(fast_config(tmp_path, commit_delay_ms=0), session_factory=away_then_back)
    record = _records(1)[0]
    assert await tracker.track_request(record) == 'written'
    assert journaled_during_outage == [1]  # the retry found the row in the journal
    assert tracker.stats.retries == 1 and tracker.stats.journaled == 1
    assert [row['id'] for row in await ledger_rows()] == [record.id]
    assert all(path.stat().st_size == 0 for path in _journals(tracker))
    await tracker.aclose()


async def test_a_write_to_a_database_that_hangs_journals_its_batch_and_the_rows_that_come_ready_behind_it(
    clean_database: None, tmp_path: Path
) -> None:
    """A database that accepts connections and never answers (a stopped server, a network partition, a pooler
    queueing its clients) holds the first attempt of a write up to its timeout, with no retry yet to journal the
    batch; the rows that come ready behind it wait for the writer, which is inside that attempt. A process killed
    then lost them all, though their responses had been shown (a QA run: 0 rows of 3 after a kill 3 and 12 s in)."""
    hanging = asyncio.Event()
    answer = asyncio.Event()

    @asynccontextmanager
    async def hangs_until_answered() -> AsyncIterator[DriverTransaction]:
        hanging.set()
        await answer.wait()
        async with driver_transaction(account=Unscoped.LEDGER) as transaction:
            yield transaction

    tracker = LLMRequestTracker(fast_config(tmp_path, commit_delay_ms=0), session_factory=hangs_until_answered)
    first, behind = _records(2)
    written = tracker.submit(first)
    await hanging.wait()
    behind_written = tracker.submit(behind)  # its run ended: due at once, but the writer is stuck in the first write
    tracker.commit_now([behind_written])

    def journaled() -> set[str]:
        return {entry['row']['id'] for path in _journals(tracker) for entry in read_journal(path)}

    await _until(
        lambda: journaled() == {str(first.id), str(behind.id)}, 'both rows to be journaled while the write hangs'
    )
    answer.set()
    assert await written == 'written' and await behind_written == 'written'
    assert sorted(row['id'] for row in await ledger_rows()) == sorted([first.id, behind.id])
    assert all(path.stat().st_size == 0 for path in _journals(tracker))  # committed: no longer held
    await tracker.aclose()


async def test_a_replay_takes_over_a_dead_processs_journal_once_and_leaves_a_live_ones_alone(
    clean_database: None, tmp_path: Path
) -> None:
    live = LLMRequestTracker(fast_config(tmp_path, commit_delay_ms=LONG_DELAY_MS))
    held = _records(1)[0]
    held_future = live.submit(held)
    await _until(lambda: live.stats.journaled == 1, 'the live row to be journaled')
    [live_journal] = _journals(live)

    committed, lost = _records(2)
    # In the database already (another tracker's: this one's batch would take its held row along); its journal line
    # outlived the commit, as when a process dies between the commit and emptying its journal.
    await LLMRequestTracker(fast_config(tmp_path)).track_request(committed)
    spool = live.spool.path
    dead = journal_left_by_a_killed_process(spool, [committed, lost])
    empty = spool.with_name(dead.name[:-1] + '2')
    empty.touch(0o600)
    elsewhere = journal_left_by_a_killed_process(spool, [committed, lost], host='another-host')
    assert sorted(dead_journals(spool)) == sorted([dead, empty])
    assert live.spool.has_pending()

    replayer = LLMRequestTracker(fast_config(tmp_path))
    report = await replayer.replay_spool()
    assert (report.rows, report.inserted, report.duplicates) == (2, 1, 1)  # each row once
    assert sorted(row['id'] for row in await ledger_rows()) == sorted([committed.id, lost.id])
    assert not dead.exists() and not empty.exists()
    assert elsewhere.exists()  # another host's process: its host tells whether it is gone
    assert live_journal.stat().st_size > 0  # this process's rows, still held
    assert (await replayer.replay_spool()).rows == 0

    live.commit_now([held_future])
    assert await held_future == 'written'
    assert live_journal.stat().st_size == 0
    await live.aclose()
    assert not live_journal.exists()
    assert len(await ledger_rows()) == 3


def test_the_empty_journal_of_a_killed_process_is_deleted_when_found_and_a_live_ones_is_kept(tmp_path: Path) -> None:
    """A process killed while it held nothing leaves an empty journal, which no replay takes over (there is nothing
    to replay): the check a process makes for something to replay (at a server's start, after writes, `agentrt
    ledger replay`) deletes it, so killed processes do not leave a file each for good."""
    spool = LedgerSpool(tmp_path / 'spool' / 'ledger.jsonl')
    empty = journal_left_by_a_killed_process(spool.path, [])
    assert empty.exists() and empty.stat().st_size == 0
    live = RowJournal(spool.path).path  # this process's name: a live holder
    live.touch(0o600)
    assert spool.pending_files() == [] and not spool.has_pending()
    assert not empty.exists()
    assert live.exists()


async def test_a_journal_that_cannot_be_taken_over_now_stays_for_the_next_replay_and_the_spool_is_replayed(
    clean_database: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk under the spool: a dead process's journal could not be turned into a claimed file, and that stopped
    the whole replay, spooled rows too, as an internal error, leaving an empty claimed file at each try."""
    tracker = LLMRequestTracker(fast_config(tmp_path))
    spooled, held = _records(2)
    tracker.spool.append([spooled.spool_entry(1 << 20)])
    journal = journal_left_by_a_killed_process(tracker.spool.path, [held])

    def disk_full(fd: int, payload: bytes) -> None:
        raise OSError(errno.ENOSPC, 'No space left on device')

    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING, logger='agentrt.ledger'):
        patched.setattr(LedgerSpool, '_append_locked', staticmethod(disk_full))
        report = await tracker.replay_spool()
    assert (report.rows, report.inserted) == (1, 1)  # the spooled row, written all the same
    assert journal.exists() and not list(journal.parent.glob('*.replaying-*'))
    assert f'{journal.name} cannot be taken over now (No space left on device)' in caplog.text

    report = await tracker.replay_spool()  # room again
    assert (report.rows, report.inserted) == (1, 1)
    assert not journal.exists()
    assert sorted(row['id'] for row in await ledger_rows()) == sorted([spooled.id, held.id])


async def test_the_journals_of_a_spool_with_the_longest_name_allowed_are_replayed(
    clean_database: None, tmp_path: Path
) -> None:
    """A dead process's journal was claimed under a name holding the spool's name twice: a spool name of about 100
    bytes went past a file system's 255, and every replay failed (ENAMETOOLONG)."""
    name = 'l' * (SPOOL_NAME_MAX_BYTES - len('.jsonl')) + '.jsonl'
    tracker = LLMRequestTracker(fast_config(tmp_path, spool_path=tmp_path / 'spool' / name))
    held = _records(1)[0]
    journal = journal_left_by_a_killed_process(tracker.spool.path, [held])
    report = await tracker.replay_spool()
    assert (report.rows, report.inserted) == (1, 1)
    assert not journal.exists()
    assert [row['id'] for row in await ledger_rows()] == [held.id]


async def test_a_journal_that_cannot_be_written_costs_only_its_protection_said_once_and_is_tried_again(
    clean_database: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disk_full = [True]
    write = RowJournal.write

    def full_disk(self: RowJournal, entries: list[dict[str, Any]]) -> None:
        if disk_full[0]:
            raise OSError(28, 'No space left on device')
        write(self, entries)

    monkeypatch.setattr(RowJournal, 'write', full_disk)
    monkeypatch.setattr(_journal, 'RETRY_SECONDS', 0.3)
    tracker = LLMRequestTracker(fast_config(tmp_path, commit_delay_ms=LONG_DELAY_MS))
    queues = tracker._queues(asyncio.get_running_loop())
    with caplog.at_level(logging.WARNING, logger='agentrt.ledger'):
        futures = [tracker.submit(record) for record in _records(3)]
        await _until(lambda: all(item.ready for item in queues.pending), 'the rows to be ready')
        for record in _records(3):  # more held rows, within the retry wait: not tried, not said again
            futures.append(tracker.submit(record))
            await asyncio.sleep(0.02)
        tracker.commit_now(futures)
        assert await asyncio.gather(*futures) == ['written'] * 6
        assert tracker.stats.journaled == 0
        disk_full[0] = False  # room again: after the wait, held rows are journaled again, and that is said
        await asyncio.sleep(0.35)
        later = tracker.submit(_records(1)[0])
        await _until(lambda: tracker.stats.journaled == 1, 'the journal to be written again')
        tracker.commit_now([later])
        assert await later == 'written'
    said = [r.getMessage() for r in caplog.records if 'journal of held rows' in r.getMessage()]
    assert len(said) == 2 and 'No space left on device' in said[0] and 'written again' in said[1], said
    assert len(await ledger_rows()) == 7
    await tracker.aclose()


def test_a_journal_whose_holder_lives_where_its_pid_cannot_be_seen_is_left_alone(tmp_path: Path) -> None:
    """Containers with one host name sharing the spool's directory, each in its own PID namespace: a replay in one
    looked the other's pid up in its own process table, took the live process for dead and deleted its journal (a QA
    run, with `unshare --pid`); the live process went on writing to a deleted file. A journal is locked by its process
    while open, and a replay takes over only one it can lock."""
    spool = tmp_path / 'spool' / 'ledger.jsonl'
    record = _records(1)[0]
    journal = journal_left_by_a_killed_process(spool, [record])  # named for a pid that is gone here
    holder = os.open(journal, os.O_RDONLY)  # its process, alive in another namespace, holds its lock
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert dead_journals(spool) == []
        assert not LedgerSpool(spool).has_pending()
    finally:
        os.close(holder)
    assert dead_journals(spool) == [journal]  # its holder is gone now

    written = RowJournal(spool)  # what a live process writes is locked, from the moment its name can be seen
    written.write([record.spool_entry(1 << 20)])
    assert held_by_a_live_process(written.path)
    assert not list(spool.parent.glob('*journal_making*'))
    written.close()
    assert not written.path.exists()


def test_a_journals_name_says_whose_it_is_and_other_names_are_not_journals(tmp_path: Path) -> None:
    journal = RowJournal(tmp_path / 'spool-a.jsonl')
    host, pid, started = journal_holder(journal.path) or ('', 0, 0.0)
    assert journal.path.parent == tmp_path and journal.path.name.startswith('spool-a.jsonl.journal-')
    assert pid > 0 and started == pytest.approx(process_start(pid) or -1, abs=0.01)
    assert host == host_tag(this_host())
    for name in ('spool-a.jsonl', 'spool-a.jsonl.journal-x', 'spool-a.jsonl.journal-h-notapid-1.0-1'):
        assert journal_holder(tmp_path / name) is None
    assert RowJournal(tmp_path / 'spool-a.jsonl').path != journal.path  # one per event loop, never shared


def test_bodies_go_into_the_journal_as_they_are_and_come_back_whole(tmp_path: Path) -> None:
    """Bodies are written unescaped after their entry's JSON: any text comes back as it went in, and an entry the
    process's death cut off (anywhere in it) is left out, logged, with the entries before it kept."""
    hostile = '{"a": "line\\nbreak", "q": "\\"quoted\\""}\n\n{"b": "é ∑ \U0001f600"}' + '\ud800' + '\x00' + 'x' * 70_000
    entries = [
        {'v': 1, 'row': {'id': str(index)}, 'contents': [{'kind': 'prompt', 'body': hostile, 'size_bytes': 1}]}
        for index in range(3)
    ]
    entries[1]['contents'].append({'kind': 'response', 'body': '', 'size_bytes': 0})
    path = tmp_path / 'journal'
    whole = framed_entries(entries)
    path.write_bytes(whole)
    assert read_journal(path) == entries
    first_two = len(framed_entries(entries[:2]))
    for cut in (first_two + 1, first_two + 40, len(whole) - 70_000, len(whole) - 1):
        path.write_bytes(whole[:cut])
        assert read_journal(path) == entries[:2], cut
    path.write_bytes(whole[:first_two] + b'not json\n' + whole[first_two:])
    assert read_journal(path) == entries[:2]


# --- a child forked while the journal (or a spool lock) is held -----------------------------------------------------

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize('kind', ['fork', 'pool'])
async def test_a_killed_processs_journal_is_replayed_while_a_child_it_forked_lives_on(
    clean_database: None, tmp_path: Path, kind: str
) -> None:
    """A forked child kept the journal's descriptor, and with it the lock the replay asks about: the rows of a process
    killed outright stayed out of the ledger for as long as any child lived, for good with an orphaned pool worker
    (qa189). The child's copy is closed at the fork (`db/forks.py`'s `close_in_child`)."""
    spool = tmp_path / 'spool' / 'ledger.jsonl'
    spool.parent.mkdir(mode=0o700)
    out = tmp_path / 'said.json'
    program = ['-m', 'tests.services.ledger.journal_fork_and_die', str(spool), '3', kind, str(out)]
    process = await asyncio.create_subprocess_exec(sys.executable, *program, cwd=ROOT)
    try:
        assert await asyncio.wait_for(process.wait(), 60) == -signal.SIGKILL
    finally:
        if process.returncode is None:  # it did not get as far as killing itself
            process.kill()
            await process.wait()
    said = json.loads(out.read_text())
    child = said['child']
    assert said['journaled'] == 3
    try:
        assert _alive(child), 'the child outlives its parent'
        [journal] = spool.parent.glob('*.journal-*')
        assert dead_journals(spool) == [journal]
        report = await LLMRequestTracker(fast_config(tmp_path, spool_path=spool)).replay_spool()
        assert (report.rows, report.inserted) == (3, 3)
        assert sorted(str(row['id']) for row in await ledger_rows()) == sorted(said['ids'])
        assert not journal.exists()
        assert _alive(child)  # replayed while it lives
    finally:
        with suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def _child_living_on() -> Iterator[None]:
    """A child forked here that lives until the block ends (it waits for its pipe to close), then is reaped; entered
    once the child runs (its fork hooks, which run before it, are done)."""
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing but wait (the test's other state is the parent's)
        os.close(write_end)
        os.write(ready_write, b'.')
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    os.close(ready_write)
    os.read(ready_read, 1)
    os.close(ready_read)
    try:
        yield
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)


def _lockable(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_a_child_forked_while_a_replay_or_an_append_holds_the_spools_lock_does_not_keep_it(tmp_path: Path) -> None:
    """A child forked during a replay kept the replay's lock (every later replay: "another replay is running"), during
    an append the spool's (every later append waited), for as long as it lived; the child's copy is closed at the
    fork."""
    spool = LedgerSpool(tmp_path / 'spool' / 'ledger.jsonl')
    with ExitStack() as living:
        with spool.replay_lock() as acquired:
            assert acquired
            living.enter_context(_child_living_on())  # forked while the replay holds its lock
        with spool.replay_lock() as again:
            assert again, 'the replay lock left with the replay'

    append_locked = LedgerSpool._append_locked
    with ExitStack() as living:

        def forking_append(fd: int, payload: bytes) -> None:
            append_locked(fd, payload)
            living.enter_context(_child_living_on())  # forked while the append holds the spool's lock

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(LedgerSpool, '_append_locked', staticmethod(forking_append))
            spool.append([ledger_record().spool_entry(1 << 20)])
        assert _lockable(spool.path), 'the append lock left with the append'
