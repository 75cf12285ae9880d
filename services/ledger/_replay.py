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
    entries, bad = await asyncio.to_thread(spool.read, path)
    counts = {'rows': 0, 'inserted': 0, 'duplicates': 0, 'contents': 0}
    for start in range(0, len(entries), REPLAY_CHUNK_ROWS):
        rows: list[dict[str, Any]] = []
        contents: list[dict[str, Any]] = []
        for entry in entries[start : start + REPLAY_CHUNK_ROWS]:
            try:
                row, row_contents = parse_spool_entry(entry)
            except (ValueError, TypeError, KeyError) as exc:
                logger.error('ledger spool: invalid row (%s)', exc)
                bad.append(json.dumps(entry, default=str))
                continue
            rows.append(row)
            contents += row_contents
        inserted = await retry_transient(
            partial(write_ledger_rows, session_factory, rows), policy, what='ledger replay', on_retry=on_retry
        )
        counts['rows'] += len(rows)
        counts['inserted'] += inserted
        counts['duplicates'] += len(rows) - inserted
        if contents:
            try:
                await retry_transient(
                    partial(insert_contents, session_factory, contents),
                    policy,
                    what='ledger replay contents',
                    on_retry=on_retry,
                )
                counts['contents'] += len(contents)
            except Exception as exc:
                if database_unavailable(exc):
                    raise
                logger.error('ledger spool: contents not stored (%s: %s)', type(exc).__name__, exc)
    await asyncio.to_thread(spool.reject, bad)
    await asyncio.to_thread(spool.release, path)
    return {**counts, 'rejected': len(bad)}
