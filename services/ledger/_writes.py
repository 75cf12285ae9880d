"""Database writes of the ledger (idempotent inserts), the spool's entry format, and replaying the spool."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.errors import DatabaseNotInitializedError
from agentrt.db.models.ledger import LLMRequestContentRow, LLMRequestRow
from agentrt.services.ledger._record import ContentItem, row_from_json, row_to_json
from agentrt.services.ledger._retry import RetryPolicy, is_transient_db_error, retry_transient
from agentrt.services.ledger._spool import SPOOL_FORMAT_VERSION, LedgerSpool

logger = logging.getLogger('agentrt.ledger')

SessionFactory = Callable[[], AbstractAsyncContextManager[AsyncSession]]

LEDGER_INSERT = pg_insert(LLMRequestRow.__table__).on_conflict_do_nothing(index_elements=['id'])
CONTENT_INSERT = pg_insert(LLMRequestContentRow.__table__).on_conflict_do_nothing(index_elements=['request_id', 'kind'])
# A multi-row VALUES binds every column of every row: stay well under PostgreSQL's 32767 parameters.
REPLAY_CHUNK_ROWS = 500


def database_unavailable(exc: BaseException) -> bool:
    """True when a write failed because the database cannot be reached (now): spool it, don't drop it."""
    return is_transient_db_error(exc) or isinstance(exc, DatabaseNotInitializedError)


async def insert_rows(session_factory: SessionFactory, statement: Any, rows: list[dict[str, Any]]) -> None:
    """Execute an `INSERT ... ON CONFLICT DO NOTHING` for `rows` in one side-session transaction."""
    async with session_factory() as session:
        await session.execute(statement, rows)


async def insert_ledger_counting(session_factory: SessionFactory, rows: list[dict[str, Any]]) -> int:
    """Insert ledger rows and return how many were new (the rest were already there)."""
    if not rows:
        return 0
    async with session_factory() as session:
        result = await session.execute(LEDGER_INSERT.values(rows).returning(LLMRequestRow.id))
        return len(result.all())


def content_rows(request_id: Any, raw: list[tuple[str, bytes | str]], max_bytes: int) -> list[dict[str, Any]]:
    """Redact and cap raw contents into `llm_request_contents` rows."""
    rows = []
    for kind, body in raw:
        item = ContentItem.build(kind, body, max_bytes)  # type: ignore[arg-type]
        rows.append(
            {
                'request_id': request_id,
                'kind': item.kind,
                'body': item.body,
                'size_bytes': item.size_bytes,
                'truncated': item.truncated,
                'redactions': item.redactions,
            }
        )
    return rows


def spool_entry(row: dict[str, Any], contents: list[dict[str, Any]]) -> dict[str, Any]:
    """One spool line: the ledger row and its (already redacted) contents."""
    return {
        'v': SPOOL_FORMAT_VERSION,
        'row': row_to_json(row),
        'contents': [{k: v for k, v in c.items() if k != 'request_id'} for c in contents],
    }


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
    return ReplayReport(**totals)


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
        rows, contents = [], []
        for entry in entries[start : start + REPLAY_CHUNK_ROWS]:
            try:
                row = row_from_json(entry['row'])
            except (ValueError, TypeError, KeyError) as exc:
                logger.error('ledger spool: invalid row (%s)', exc)
                bad.append(json.dumps(entry, default=str))
                continue
            rows.append(row)
            contents += [{**content, 'request_id': row['id']} for content in entry.get('contents') or []]
        inserted = await retry_transient(
            lambda r=rows: insert_ledger_counting(session_factory, r), policy, what='ledger replay', on_retry=on_retry
        )
        counts['rows'] += len(rows)
        counts['inserted'] += inserted
        counts['duplicates'] += len(rows) - inserted
        if contents:
            try:
                await retry_transient(
                    lambda c=contents: insert_rows(session_factory, CONTENT_INSERT, c),
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
