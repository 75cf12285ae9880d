"""Preparing ledger records off the event loop: the worker threads, and what a failed preparation costs."""

from __future__ import annotations

import asyncio
import logging

from agentrt.services.ledger._queues import PendingRow
from agentrt.services.ledger._record import LedgerRecord
from agentrt.services.thread_pools import ProcessThreadPool

logger = logging.getLogger('agentrt.ledger')

PREPARE_THREADS = 4
INLINE_PREPARE_BYTES = 64 * 1024
"""A record whose bodies hold at most this much text not checked yet (and no possible secret) is prepared on the
event loop as it is submitted: checking it costs less than a hand-off to a thread (RE2 checks 64 KiB in well under a
millisecond); anything else is prepared in a worker thread."""
# RE2 releases the GIL while it scans, so preparations run beside the event loop on another core; records are
# prepared side by side, so a huge one delays only itself. A pool of its own (not asyncpg's host name lookups').
_PREPARERS = ProcessThreadPool(PREPARE_THREADS, 'agentrt-ledger-prepare')


def start_preparing(
    loop: asyncio.AbstractEventLoop, record: LedgerRecord, content_max_bytes: int | None
) -> asyncio.Future[None] | None:
    """Run `record.prepare()` (pricing, redaction, serialisation) in a worker thread; None when it has nothing
    worth a thread: no body to store and no error message (the writer then prices it on the loop), or bodies small
    and clean enough to be prepared here (`LedgerRecord.prepare_quickly`)."""
    if not record.needs_preparing(content_max_bytes):
        return None
    try:
        if record.prepare_quickly(content_max_bytes, INLINE_PREPARE_BYTES):
            return None
    except Exception:  # a bug: the worker thread tries again, and `check_prepared` handles its failure
        logger.debug('ledger: quick preparation of request %s failed', record.id, exc_info=True)
    return loop.run_in_executor(_PREPARERS.executor(), record.prepare, content_max_bytes)


def check_prepared(item: PendingRow) -> None:
    """A preparation that failed (a bug: redaction never raises) costs the record its contents, never its row.

    Checked once: the failure is logged and forgotten (`item.prepared` cleared)."""
    prepared = item.prepared
    if prepared is None or not (prepared.cancelled() or prepared.exception() is not None):
        return
    item.prepared = None
    error = None if prepared.cancelled() else prepared.exception()
    logger.error('ledger: could not prepare request %s; its contents are dropped', item.record.id, exc_info=error)
    item.record.discard_contents()
