"""`schedule_post_turn_work`: what runs in the background after a chat turn, when it is worth running."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agentrt.services.background import BackgroundQueueFull, SupervisorClosed, get_supervisor
from agentrt.services.conversations import SummarySource, refresh_title_and_summary
from agentrt.services.ledger import roll_up_account_usage

logger = logging.getLogger('agentrt.background')

DEFAULT_ROLLUP_INTERVAL_S = 5.0


def schedule_post_turn_work(
    account_id: int,
    conversation_id: str,
    *,
    run_id: str | None = None,
    summarise: bool = True,
    summary: SummarySource | None = None,
    rollup_interval_s: float = DEFAULT_ROLLUP_INTERVAL_S,
) -> list[asyncio.Task[Any]]:
    """Spawn the post-turn tasks on this loop's supervisor; call it after the turn is saved.

    The tasks get ids (and text to summarise) only and open their own sessions: one titles and summarises the
    conversation, when `summarise` (the chat turn asks when it is worth it: `summary_due`); one adds the account's
    new ledger rows to the daily usage rollup, at most once per `rollup_interval_s` per account (the roll-up takes
    every row not counted yet, so one run covers the turns before it; the last one runs at the end of the interval,
    or when the supervisor shuts down). Both are idempotent, so a skipped task (backlog full, shutting down) is
    repaired by a later turn's. Never raises for that: post-turn work must not fail the chat.

    Args:
        account_id: the turn's account.
        conversation_id: the conversation the turn was saved to (`session_id` in the chat layer).
        run_id: the run, for log lines and spans.
        summarise: refresh the title and summary.
        summary: the text to do it from (`summary_source`), so the task reads nothing; else it reads the history.
        rollup_interval_s: the least time between two roll-ups of the account (0: after every turn).

    Returns:
        The tasks spawned now (awaiting them is optional; `drain_supervisor()` at exit waits for them and starts a
        pending roll-up).
    """
    supervisor = get_supervisor()
    suffix = f' (run {run_id})' if run_id else ''
    tasks: list[asyncio.Task[Any]] = []
    try:
        if summarise:
            tasks.append(
                supervisor.spawn(
                    refresh_title_and_summary,
                    account_id,
                    conversation_id,
                    summary,
                    name=f'conversation summary {conversation_id}{suffix}',
                )
            )
    except (BackgroundQueueFull, SupervisorClosed):
        pass  # `spawn` logged and counted it; a later turn's task covers this one's work
    try:
        rollup = supervisor.spawn_throttled(
            ('usage rollup', account_id),
            rollup_interval_s,
            roll_up_account_usage,
            account_id,
            name=f'usage rollup account {account_id}{suffix}',
        )
        if rollup is not None:
            tasks.append(rollup)
    except (BackgroundQueueFull, SupervisorClosed):
        pass
    return tasks
