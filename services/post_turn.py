"""`schedule_post_turn_work`: what runs in the background after every chat turn."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agentrt.services.background import BackgroundQueueFull, SupervisorClosed, get_supervisor
from agentrt.services.conversations import refresh_title_and_summary
from agentrt.services.ledger import roll_up_account_usage

logger = logging.getLogger('agentrt.background')


def schedule_post_turn_work(
    account_id: int, conversation_id: str, *, run_id: str | None = None
) -> list[asyncio.Task[Any]]:
    """Spawn the post-turn tasks on this loop's supervisor; call it after the turn is saved.

    The tasks get ids only and open their own sessions: one titles and summarises the conversation,
    one adds the account's new ledger rows to the daily usage rollup. Both are idempotent, so a
    skipped task (backlog full, shutting down) is repaired by the next turn's. Never raises for that:
    post-turn work must not fail the chat.

    Args:
        account_id: the turn's account.
        conversation_id: the conversation the turn was saved to (`session_id` in the chat layer).
        run_id: the run, for log lines and spans.

    Returns:
        The spawned tasks (awaiting them is optional; `drain_supervisor()` at exit waits for them).
    """
    supervisor = get_supervisor()
    suffix = f' (run {run_id})' if run_id else ''
    work = (
        (refresh_title_and_summary, (account_id, conversation_id), f'conversation summary {conversation_id}{suffix}'),
        (roll_up_account_usage, (account_id,), f'usage rollup account {account_id}{suffix}'),
    )
    tasks: list[asyncio.Task[Any]] = []
    for fn, args, name in work:
        try:
            tasks.append(supervisor.spawn(fn, *args, name=name))
        except (BackgroundQueueFull, SupervisorClosed):
            pass  # `spawn` logged and counted it; the next turn's task covers this one's work
    return tasks
