"""Replaying the spool: every spooled row, then its contents, written exactly once; the files deleted after."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from agentrt.db.failures import causes, invalid_value, sqlstate_of
from agentrt.services.ledger._record import parse_spool_entry
from agentrt.services.ledger._retry import RetryPolicy, retry_transient
from agentrt.services.ledger._spool import LedgerSpool
from agentrt.services.ledger._writes import SessionFactory, database_unavailable, insert_contents, write_ledger_rows

logger = logging.getLogger('agentrt.ledger')

# Rows per statement of a replay (each column is one array parameter): bounds one statement's size and duration.
REPLAY_CHUNK_ROWS = 500


@dataclass(frozen=True)
class ReplayReport:
    """What one spool replay did."""

    files: int = 0
    rows: int = 0
    inserted: int = 0
    duplicates: int = 0
    contents: int = 0
    rejected: int = 0
    skipped: bool = False
    """True when another replay (in this or another process) held the lock."""


async def replay_spool(
    spool: LedgerSpool,
    session_factory: SessionFactory,
    policy: RetryPolicy,
    *,
    on_retry: Callable[[BaseException], None] | None = None,
) -> ReplayReport:
    """Write every spooled row, then its contents, and delete each file once all of it is in the database.

    Exactly once: rows carry the key minted before their model call, and inserts skip keys already
    present, so a file replayed twice (a crash before the delete) adds nothing the second time.
    Lines that can never be written are moved to the `.rejected` file.

    Raises:
        Exception: a database error that outlived the retries; the claimed files stay for the next replay.
    """
    with spool.replay_lock() as acquired:
        if not acquired:
            return ReplayReport(skipped=True)
        totals = dict.fromkeys(('files', 'rows', 'inserted', 'duplicates', 'contents', 'rejected'), 0)
        for path in await asyncio.to_thread(spool.claim):
            counts = await _replay_file(spool, path, session_factory, policy, on_retry)
            for key, value in counts.items():
                totals[key] += value
            totals['files'] += 1
    return ReplayReport(
        files=totals['files'],
        rows=totals['rows'],
        inserted=totals['inserted'],
        duplicates=totals['duplicates'],
        contents=totals['contents'],
        rejected=totals['rejected'],
    )


async def _replay_file(
    spool: LedgerSpool,
    path: Path,
    session_factory: SessionFactory,
    policy: RetryPolicy,
    on_retry: Callable[[BaseException], None] | None,
) -> dict[str, int]:
    counts = _no_counts()
    write = _Writer(session_factory, policy, on_retry)
    bad: list[str] = []
    offset, done = 0, False
    while not done:
        # A batch at a time, read and parsed in a worker thread: the loop only writes. Read whole and parsed on the
        # loop, 20,000 spooled rows (80 MB) held it up to 450 ms at a server's start (the GC's full collections of
        # every entry at once, and the parsing).
        parsed, rejected, offset, done = await asyncio.to_thread(_read_parsed, spool, path, offset)
        bad += rejected
        _add(counts, await _write_parsed(write, parsed, bad))
    await asyncio.to_thread(spool.reject, bad)
    await asyncio.to_thread(spool.release, path)
    return {**counts, 'rejected': len(bad)}


async def write_spooled_entries(
    entries: list[dict[str, Any]],
    bad: list[str],
    session_factory: SessionFactory,
    policy: RetryPolicy,
    on_retry: Callable[[BaseException], None] | None = None,
) -> dict[str, int]:
    """Write spool entries (rows, then their contents), exactly once: what a replay does with a file's lines, and
    the tracker with rows it held in memory while neither the database nor the spool took them.

    Entries the database refuses for their values are added to `bad` (as lines, for the `.rejected` file). Each
    `REPLAY_CHUNK_ROWS` are parsed in a worker thread, then written in one statement.

    Raises:
        Exception: a database error that outlived the retries (nothing is lost: every row is written again).
    """
    counts = _no_counts()
    write = _Writer(session_factory, policy, on_retry)
    for start in range(0, len(entries), REPLAY_CHUNK_ROWS):
        parsed = await asyncio.to_thread(_parsed, entries[start : start + REPLAY_CHUNK_ROWS], bad)
        _add(counts, await _write_parsed(write, parsed, bad))
    return counts


Parsed = list[tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]]
"""Spooled entries with the ledger row and content rows of each (`parse_spool_entry`)."""


def _read_parsed(spool: LedgerSpool, path: Path, offset: int) -> tuple[Parsed, list[str], int, bool]:
    """The next `REPLAY_CHUNK_ROWS` entries of `path` from `offset`, parsed; the lines set aside (not entries, or
    rows that are not valid); where the next batch starts; whether the file ended."""
    batch = spool.read_batch(path, offset, REPLAY_CHUNK_ROWS)
    bad = list(batch.bad)
    return _parsed(batch.entries, bad), bad, batch.end, batch.done


def _parsed(entries: list[dict[str, Any]], bad: list[str]) -> Parsed:
    """Each entry with its ledger row and content rows; an entry that is not a valid row goes to `bad`."""
    parsed: Parsed = []
    for entry in entries:
        try:
            row, row_contents = parse_spool_entry(entry)
        except (ValueError, TypeError, KeyError) as exc:
            logger.error('ledger spool: invalid row (%s)', exc)
            bad.append(_line(entry))
            continue
        parsed.append((entry, row, row_contents))
    return parsed


async def _write_parsed(write: _Writer, parsed: Parsed, bad: list[str]) -> dict[str, int]:
    """Write `parsed` (rows in one statement, then their contents); rows the database refuses go to `bad`."""
    counts = _no_counts()
    if not parsed:
        return counts
    try:
        inserted = await write.rows([row for _, row, _ in parsed])
    except Exception as exc:
        if not refused_for_its_values(exc):
            raise  # the database unavailable, or the statement failing (a schema not migrated): kept for later
        # A row whose values the database refuses must not hold back the rows beside it, replay after replay:
        # each row alone, and the ones refused on their own go to the `.rejected` file (their contents with them).
        logger.warning('ledger spool: %d row(s) refused (%s: %s)', len(parsed), type(exc).__name__, exc)
        inserted, refused = await write.one_at_a_time(parsed) if len(parsed) > 1 else (0, parsed)
        bad += [_line(entry) for entry, _, _ in refused]
        set_aside = {id(entry) for entry, _, _ in refused}
        parsed = [item for item in parsed if id(item[0]) not in set_aside]
    counts['rows'] = len(parsed)
    counts['inserted'] = inserted
    counts['duplicates'] = len(parsed) - inserted
    contents = [content for _, _, row_contents in parsed for content in row_contents]
    if contents:
        try:
            counts['contents'] = await write.contents(contents)  # the new ones: a replay again writes none (QA)
        except Exception as exc:
            if database_unavailable(exc):
                raise
            # One content the database refuses (a kind it does not know) dropped every row's contents of the
            # batch, the spool then deleted: the good rows' prompts and responses lost (QA). Each row's alone.
            logger.warning("ledger spool: contents refused (%s: %s); each row's alone", type(exc).__name__, exc)
            counts['contents'] = await _contents_one_row_at_a_time(write, parsed, bad)
    return counts


async def _contents_one_row_at_a_time(write: _Writer, parsed: Parsed, bad: list[str]) -> int:
    """Write each row's contents alone; the entry of a row whose contents the database refuses goes to `bad` (its
    row is written: a replay of the `.rejected` line finds it there and adds only what is new)."""
    written = 0
    for entry, row, row_contents in parsed:
        if not row_contents:
            continue
        try:
            written += await write.contents(row_contents)
        except Exception as exc:
            if database_unavailable(exc):
                raise
            logger.error('ledger spool: contents of row %s refused (%s: %s)', row['id'], type(exc).__name__, exc)
            bad.append(_line(entry))
    return written


def _no_counts() -> dict[str, int]:
    """What a replay counts, each at 0: rows read, inserted, already there (duplicates), contents written."""
    return dict.fromkeys(('rows', 'inserted', 'duplicates', 'contents'), 0)


def _add(totals: dict[str, int], counts: dict[str, int]) -> None:
    for key, value in counts.items():
        totals[key] += value


def refused_for_its_values(exc: BaseException) -> bool:
    """Whether the database (or the driver) refused a write for the values of its rows: a data exception (SQLSTATE
    class 22: a number out of range, text it cannot hold) or an integrity constraint (class 23: a CHECK, a NOT NULL).
    Anything else (the database unavailable, a statement that fails whatever the rows) is not the rows' fault."""
    if invalid_value(exc) is not None:
        return True
    return any(sqlstate_of(error).startswith('23') for error in causes(exc))


def _line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, default=str)


@dataclass(frozen=True)
class _Writer:
    """A replay's writes, each retried while the database is unavailable."""

    session_factory: SessionFactory
    policy: RetryPolicy
    on_retry: Callable[[BaseException], None] | None

    async def rows(self, rows: list[dict[str, Any]]) -> int:
        return await retry_transient(
            partial(write_ledger_rows, self.session_factory, rows),
            self.policy,
            what='ledger replay',
            on_retry=self.on_retry,
        )

    async def contents(self, contents: list[dict[str, Any]]) -> int:
        return await retry_transient(
            partial(insert_contents, self.session_factory, contents),
            self.policy,
            what='ledger replay contents',
            on_retry=self.on_retry,
        )

    async def one_at_a_time(
        self, parsed: list[tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]]
    ) -> tuple[int, list[tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]]]:
        """Write each row alone: how many were new, and the rows the database refused (logged)."""
        inserted, refused = 0, []
        for item in parsed:
            try:
                inserted += await self.rows([item[1]])
            except Exception as exc:
                if not refused_for_its_values(exc):
                    raise
                logger.error('ledger spool: row %s refused (%s: %s)', item[1]['id'], type(exc).__name__, exc)
                refused.append(item)
        return inserted, refused
