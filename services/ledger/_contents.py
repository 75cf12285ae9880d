"""`ContentWriter`: the ledger tracker's second writer, for the contents (prompt, response, error) of committed rows."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from agentrt.services.ledger._config import LedgerConfig
from agentrt.services.ledger._queues import ContentJob, LoopQueues, PendingRow, TrackerStats, WriteOutcome
from agentrt.services.ledger._writes import CONTENT_INSERT, database_unavailable

logger = logging.getLogger('agentrt.ledger')

Insert = Callable[[Any, list[dict[str, Any]], str], Awaitable[None]]
"""Write rows with a statement, retrying connection failures (`LLMRequestTracker._retrying`)."""
Spool = Callable[[list[dict[str, Any]], int], Awaitable[WriteOutcome]]
"""Append spool entries (and count the ledger rows among them)."""
SpoolNow = Callable[[list[PendingRow], list[ContentJob], str], None]
"""Spool at once, without the event loop, what a stopped writer held."""


class ContentWriter:
    """Writes contents only after their ledger rows committed, so no content row exists without its row.

    Each record redacts and caps its own bodies; batches are bounded by `max_batch_content_bytes`. Contents the
    database cannot take for a connection reason are spooled with their row (replay skips the row, writes them);
    contents it refuses are logged and counted, and the ledger row stays.
    """

    def __init__(
        self, config: LedgerConfig, stats: TrackerStats, insert: Insert, spool: Spool, spool_now: SpoolNow
    ) -> None:
        """Share the tracker's configuration, counters, retrying insert and spool."""
        self.config = config
        self.stats = stats
        self._insert = insert
        self._spool = spool
        self._spool_now = spool_now

    def queue(self, queues: LoopQueues, items: list[PendingRow]) -> None:
        """Queue the contents of rows just committed, and start this loop's content task if it is not running."""
        if not self.config.store_content:
            return
        for item in items:
            if item.record.raw_contents:
                item.deferred = item.with_content
                queues.contents.append(ContentJob(item.record, item.future if item.deferred else None))
        if queues.contents and (queues.content_task is None or queues.content_task.done()):
            queues.content_task = asyncio.get_running_loop().create_task(
                self._worker(queues), name='agentrt-ledger-contents'
            )
            queues.content_task.add_done_callback(lambda task: self._done(queues, task))

    async def _worker(self, queues: LoopQueues) -> None:
        while queues.contents:
            batch: list[ContentJob] = []
            size = 0
            while queues.contents and (not batch or size < self.config.max_batch_content_bytes):
                job = queues.contents.pop(0)
                size += sum(len(body) for _, body in job.record.raw_contents)
                batch.append(job)
            queues.content_inflight = batch
            await self._write(batch)
            queues.content_inflight = []
            for job in batch:
                job.settle()
        queues.content_task = None

    def _done(self, queues: LoopQueues, task: asyncio.Task[None]) -> None:
        if queues.content_task is task:
            queues.content_task = None
        if task.cancelled() or task.exception() is not None:
            leftovers, queues.content_inflight, queues.contents = queues.content_inflight + queues.contents, [], []
            self._spool_now([], leftovers, 'content writer stopped')

    async def _write(self, batch: list[ContentJob]) -> None:
        cap = self.config.content_max_bytes
        rows_per_job = [job.record.content_rows(cap) for job in batch]
        try:
            await self._insert(CONTENT_INSERT, [row for rows in rows_per_job for row in rows], 'content write')
            self.stats.contents_written += sum(len(rows) for rows in rows_per_job)
            return
        except Exception as exc:
            if database_unavailable(exc) or len(batch) == 1:
                for job in batch:
                    await self._failed(job, exc)
                return
        # A failure that is about the data: find the culprit by writing one request's contents at a time.
        for job, rows in zip(batch, rows_per_job, strict=True):
            try:
                await self._insert(CONTENT_INSERT, rows, 'content write')
                self.stats.contents_written += len(rows)
            except Exception as exc:
                await self._failed(job, exc)

    async def _failed(self, job: ContentJob, exc: Exception) -> None:
        """The ledger row is committed and stays. Contents that failed for a connection reason are spooled."""
        if database_unavailable(exc):
            logger.warning('ledger: content of request %s not written (%s); spooling', job.record.id, exc)
            await self._spool([job.record.spool_entry(self.config.content_max_bytes)], 0)
            return
        self.stats.content_failures += 1
        logger.error('ledger: content of request %s not stored (%s: %s)', job.record.id, type(exc).__name__, exc)
