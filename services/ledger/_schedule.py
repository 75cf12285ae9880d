"""When the ledger writer commits: which rows it holds are ready, how long the commit delay holds them still, and the
responses it seals itself so that no row waits longer than the delay (`LLMRequestTracker`, its docstring says why)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agentrt.services.ledger._config import LedgerConfig
from agentrt.services.ledger._prepare import check_prepared
from agentrt.services.ledger._queues import LoopQueues, PendingRow

Prepare = Callable[[PendingRow], None]
"""Start preparing a row's record once it is sealed (`LLMRequestTracker._prepare` on the writer's event loop)."""


def commit_wait(queues: LoopQueues, config: LedgerConfig, prepare: Prepare) -> float | None:
    """Seconds until the rows that are ready should be committed (0 or less: now); None when none is ready.

    Now when there is no commit delay, a flush is waiting, a batch is full, or every row of a run that ended is
    ready; otherwise when the oldest ready row has waited the commit delay since it was submitted (or since the
    loop came back from a stall, `LoopQueues.sleep_past_stalls`).
    """
    delay = config.commit_delay_ms / 1000
    sealing = seal_due(queues, delay, prepare)
    ready = 0
    size = 0
    oldest: float | None = None
    hurried: set[object] = set()
    preparing: set[object] = set()
    for item in queues.pending:
        if not item.ready:
            if item.hurried is not None:
                preparing.add(item.hurried)
            continue
        if delay <= 0 or queues.flushing:
            return 0.0
        ready += 1
        oldest = item.waits_from if oldest is None else min(oldest, item.waits_from)
        if item.hurried is not None:
            hurried.add(item.hurried)
        check_prepared(item)
        size += sum(len(content['body']) for content in contents_of(item, config.content_cap))
    if oldest is None:
        return sealing
    if hurried - preparing or ready >= config.max_batch_rows or size >= config.max_batch_content_bytes:
        return 0.0
    wait = oldest + delay - time.perf_counter()
    return wait if sealing is None else min(wait, sealing)


def seal_due(queues: LoopQueues, delay: float, prepare: Prepare) -> float | None:
    """Prepare the records waiting to be sealed that are: sealed by their run (at its next model request or its
    end), or due all the same, sealed here as they are (their commit delay passed, their run ended, a flush is
    waiting), so a row is never held longer than the commit delay; seconds until the next is due (None: none)."""
    wait: float | None = None
    now = time.perf_counter()
    for item in queues.pending:
        if not item.sealing:
            continue
        if not item.record.sealed():
            left = item.waits_from + delay - now
            if left > 0 and item.hurried is None and not queues.flushing:
                wait = left if wait is None else min(wait, left)
                continue
            item.record.seal()
        item.sealing = False
        prepare(item)
    return wait


def seal_stamped(queues: LoopQueues, prepare: Prepare) -> None:
    """A batch is due: seal and prepare the records waiting to be sealed whose responses pydantic-ai has stamped
    already, so they join it as they would have had they been ready (one transaction, not one more later)."""
    for item in queues.pending:
        if item.sealing and item.record.stamped():
            item.record.seal()
            item.sealing = False
            prepare(item)


def take_ready(queues: LoopQueues, config: LedgerConfig) -> list[PendingRow]:
    """The prepared rows, in order, up to a batch's rows and content bytes; the others stay queued."""
    batch: list[PendingRow] = []
    waiting: list[PendingRow] = []
    size = 0
    for item in queues.pending:
        if item.ready and len(batch) < config.max_batch_rows and size < config.max_batch_content_bytes:
            check_prepared(item)
            batch.append(item)
            size += sum(len(content['body']) for content in contents_of(item, config.content_cap))
        else:
            waiting.append(item)
    queues.pending[:] = waiting
    return batch


def contents_of(item: PendingRow, cap: int | None) -> list[dict[str, Any]]:
    """The content rows of a prepared record (none when contents are not stored)."""
    return item.record.content_rows(cap) if cap is not None and item.record.raw_contents else []
