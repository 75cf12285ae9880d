"""Queueing a turn's post-turn work: ids only, at most one pending job per conversation (summary) and per account and
day (rollup), the rollup at the end of its interval so one job covers every turn of it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from procrastinate.exceptions import AlreadyEnqueued

from agentrt.services.jobs._app import open_queue
from agentrt.services.jobs._tasks import conversation_summary, usage_rollup

logger = logging.getLogger('agentrt.jobs')


async def defer_post_turn_work(
    account_id: int, conversation_id: str, *, summarise: bool, rollup_interval_s: float
) -> None:
    """Queue the turn's jobs (the queue mode's `schedule_post_turn_work`).

    Args:
        account_id: the turn's account.
        conversation_id: its conversation.
        summarise: queue the title and summary (when due: the same cadence as the inline mode).
        rollup_interval_s: the rollup runs this long after the first turn that queued it; the turns meanwhile find
            it pending and add nothing (`AGENTRT_USAGE_ROLLUP_SECONDS`, the inline mode's throttle).
    """
    if summarise:
        await defer_summary(account_id, conversation_id)
    await open_queue()
    day = datetime.now(UTC).date().isoformat()
    deferrer = usage_rollup.configure(
        queueing_lock=f'rollup:{account_id}:{day}',
        lock=f'rollup:{account_id}',  # one rollup of an account at a time, across workers
        schedule_in={'seconds': int(rollup_interval_s)} if rollup_interval_s >= 1 else None,
    )
    try:
        await deferrer.defer_async(account_id=account_id)
    except AlreadyEnqueued:
        pass  # one is pending: it will take this turn's ledger rows too


async def defer_summary(account_id: int, conversation_id: str) -> int:
    """Queue the conversation's title and summary unless one is pending already; 1 when queued now, else 0."""
    await open_queue()
    deferrer = conversation_summary.configure(queueing_lock=f'summary:{account_id}:{conversation_id}')
    try:
        await deferrer.defer_async(account_id=account_id, conversation_id=conversation_id)
    except AlreadyEnqueued:
        return 0
    return 1
