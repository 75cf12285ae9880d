"""`schedule_post_turn_work`: what runs in the background after a chat turn, when it is worth running."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agentrt.db.engine import current_settings
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
    """Spawn the post-turn tasks on this loop's supervisor; call it after the turn is saved. With
    `AGENTRT_BACKGROUND=queue` the one task spawned queues them as durable jobs instead (`defer_post_turn_work`).

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
    # Span names stay few (a trace backend groups by them): the ids are the spans' attributes.
    run: dict[str, str | int] = {'agentrt.run_id': run_id} if run_id else {}
    of_conversation = {'gen_ai.conversation.id': conversation_id, **run}
    tasks: list[asyncio.Task[Any]] = []
    if current_settings().background == 'queue':
        # Durable jobs (AGENTRT_BACKGROUND=queue): queued by a task of this process, off the turn's path; what a
        # process that dies first never queues, the reconcile job queues (services/jobs/).
        from agentrt.services.jobs import defer_post_turn_work

        try:
            tasks.append(
                supervisor.spawn(
                    defer_post_turn_work,
                    account_id,
                    conversation_id,
                    summarise=summarise,
                    rollup_interval_s=rollup_interval_s,
                    name='queue post-turn jobs',
                    attributes=of_conversation,
                )
            )
        except (BackgroundQueueFull, SupervisorClosed):
            pass
        return tasks
    try:
        if summarise:
            tasks.append(
                supervisor.spawn(
                    refresh_title_and_summary,
                    account_id,
                    conversation_id,
                    summary,
                    name='conversation summary',
                    attributes=of_conversation,
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
            # At shutdown it stops after its batch under way: the backlog is the next process's (a one-shot command
            # would otherwise wait out the supervisor's shutdown on it).
            keep_going=lambda: supervisor.accepting,
            name='usage rollup',
            attributes={'agentrt.account_id': account_id, **run},
        )
        if rollup is not None:
            tasks.append(rollup)
    except (BackgroundQueueFull, SupervisorClosed):
        pass
    return tasks
