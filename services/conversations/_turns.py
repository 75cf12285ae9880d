"""Loading a conversation for a chat turn and saving what the turn added, with `ConcurrentTurnError` on a race."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic_ai import Conversation
from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
    ConversationStore,
)
from pydantic_ai.run import AgentRunResult
from pydantic_ai.usage import RunUsage

from agentrt.db.errors import AgentRuntimeError
from agentrt.services.conversations._context import RecentConversation, summary_due
from agentrt.services.conversations._store import PostgresConversationStore, Summariser
from agentrt.services.conversations._stored import message_json
from agentrt.services.conversations._titles import summary_source, title_and_summary_from

if TYPE_CHECKING:
    from agentrt.services.conversations._claims import TurnClaim

logger = logging.getLogger('agentrt.conversations')

TurnStage = Literal['start', 'request', 'save']
"""Where a turn learnt it lost the conversation: before it ran, before a model request, or when saving."""

_STAGE_MESSAGES = {
    'start': (
        'another turn is running on conversation {id!r}; this turn sent nothing; retry when that one ends (a turn '
        'whose process died on another host holds it until its lease lapses, AGENTRT_TURN_LEASE_SECONDS after it last '
        'renewed it; one on this host is taken over at once)'
    ),
    # The compare-and-swap cannot tell a record another turn saved from one that was deleted (the HTTP API's DELETE).
    'request': (
        'conversation {id!r} was changed by another turn, or was deleted; this turn stopped before its next model '
        'request and saved nothing; reload and retry'
    ),
    'save': (
        'conversation {id!r} was changed by another turn, or was deleted; this turn was not saved; reload and retry'
    ),
}


class ConcurrentTurnError(AgentRuntimeError):
    """Another turn holds or changed this conversation; this turn's messages were not stored.

    Attributes:
        conversation_id: the conversation.
        stage: 'start' (another turn was running: nothing was sent), 'request' (another turn saved meanwhile: this
            one stopped before its next model request) or 'save' (it learnt only when saving).
        expires_in_s: at stage 'start', the longest the other turn's claim still holds the conversation (its lease,
            renewed while that turn runs); None when unknown.
    """

    ending_here: asyncio.Event | None = None
    """At stage 'start': set when the claim is held by a turn of this process that is ending (cancelled), the event
    set once that turn has handed its claim to its release; a start tried again after it takes the claim over."""

    def __init__(self, conversation_id: str, *, stage: TurnStage = 'save', expires_in_s: float | None = None) -> None:
        self.conversation_id = conversation_id
        self.stage: TurnStage = stage
        self.expires_in_s = expires_in_s
        message = _STAGE_MESSAGES[stage].format(id=conversation_id)
        if stage == 'start' and expires_in_s is not None:
            # The claim may be a turn's that can no longer release it (its process was killed on another host, where
            # it cannot be seen dead, or the database was down when it ended): then the lease is how long the
            # conversation stays held, and the user needs to know.
            # A live turn renews its claim while it runs: its claim's expiry is no promise, so the time left is said
            # of the dead turn only (a live one's "for up to 58 s more" was renewed, again and again, under a retry).
            message = (
                f'another turn holds conversation {conversation_id!r}: one running now holds it until it ends; one '
                'whose process died on another host (or under an earlier version, which records no holder), or lost '
                'the database before it could let go, holds it for up to '
                f'{expires_in_s:.0f} s more (its lease lapses AGENTRT_TURN_LEASE_SECONDS after it last renewed it); '
                'this turn sent nothing; retry when that one ends'
            )
        super().__init__(message)

    @property
    def stopped_early(self) -> bool:
        """True when the turn stopped before sending everything it would have (stage 'start' or 'request').

        For tests: nothing in the runtime reads it."""
        return self.stage != 'save'


async def load_conversation(
    store: ConversationStore, conversation_id: str, *, scope: str | None = None
) -> Conversation:
    """Load a conversation for the next turn, or start an empty one with that id.

    A conversation stored under another `scope` loads as a new empty one; saving that then fails with
    `ConcurrentTurnError` (via `save_turn`) rather than overwriting it.

    Args:
        store: The conversation store, e.g. a `PostgresConversationStore` for the caller's account.
        conversation_id: The conversation to continue or start.
        scope: Only load it if it was saved with this scope (the user or channel it belongs to).

    Returns:
        The stored conversation, or `Conversation(conversation_id=conversation_id)` when there is none.
    """
    conversation = await store.load(conversation_id, scope=scope)
    return conversation if conversation is not None else Conversation(conversation_id=conversation_id)


async def save_turn(
    store: ConversationStore,
    result: AgentRunResult[Any],
    *,
    scope: str | None = None,
    usage_before: RunUsage | None = None,
) -> list[ConversationEntry]:
    """Save the messages a run added to its conversation.

    Two turns run on the same loaded revision race here: the first save wins, the other raises
    `ConcurrentTurnError` and stores nothing, so the chat layer can reload the conversation and retry.

    Args:
        store: The store the conversation was loaded from.
        result: The run's result; `result.conversation` carries the new revision afterwards (unless
            `usage_before` is given).
        scope: The scope to save under; defaults to the one it was saved with before.
        usage_before: The conversation's lifetime usage before the run, when the run started counting from zero
            (per-turn usage limits): the record then stores this plus the run's usage.

    Returns:
        The entries this save stored, in order.

    Raises:
        ConcurrentTurnError: If the conversation was saved, deleted or created by another turn since it
            was loaded, or it belongs to another scope.
    """
    saved: Conversation | AgentRunResult[Any] = result
    if usage_before is not None:
        # A copy of the run's conversation with the lifetime usage: `result.conversation` keeps the old revision.
        saved = result.conversation
        saved.usage = usage_before + saved.usage
    try:
        return await store.save(saved, scope=scope)
    except ConversationConflict as exc:
        raise ConcurrentTurnError(exc.conversation_id) from exc


@dataclass(frozen=True)
class SavedTurn:
    """What `append_turn` stored."""

    entries: list[ConversationEntry]
    """The entries this save stored, in order."""
    stored_chars: int
    """Their stored JSON, in characters."""
    summarised: bool = False
    """The conversation's title and summary were refreshed by the save itself (they were due)."""
    usage: RunUsage | None = None
    """The conversation's lifetime usage the save stored (None: not given, as by a stand-in save)."""


async def append_turn(
    store: PostgresConversationStore,
    result: AgentRunResult[Any],
    recent: RecentConversation,
    *,
    usage_before: RunUsage | None = None,
    claim: TurnClaim | None = None,
    summary_every: tuple[int, int] | None = None,
) -> SavedTurn:
    """Save what a run added to the conversation `recent` loaded: one statement, nothing read first.

    The new record is built from the loaded one (`recent.record`) and the run's messages after the loaded ones are
    appended under a compare-and-swap on the loaded revision, so a turn saved meanwhile by anyone makes this one
    fail, as `save_turn` would. The turn's claim is released in the same transaction. When the run did not keep
    the loaded messages as they were (a capability rewrote the history), `save_turn`'s comparison decides instead.

    Args:
        store: the store `recent` was loaded from.
        result: the run's result.
        recent: what the turn loaded (`load_recent_conversation`).
        usage_before: as for `save_turn`: the record stores this plus the run's usage.
        claim: the turn's claim, deleted by the save (then `claim.released`); after the comparing save, released in
            a task of its own that the turn does not wait for (`TurnClaim.settled`).
        summary_every: `(turns, tokens)`: when the title and summary are due (`summary_due`) and the run's messages
            are enough to make them (`summary_source`), the save stores them too (`SavedTurn.summarised`), so the
            post-turn work needs no session of its own for them.

    Raises:
        ConcurrentTurnError: another turn saved, deleted or created the conversation since it was loaded.
    """
    conversation = result.conversation  # a copy: `result.conversation` keeps the old revision
    if usage_before is not None:
        conversation.usage = usage_before + conversation.usage
    record, index = recent.record, conversation.new_message_index
    kept = (
        index == len(recent.stored)
        and conversation.revision == (record.revision if record is not None else None)
        and all(message is loaded for message, loaded in zip(conversation.messages, recent.stored, strict=False))
    )
    if not kept:
        try:
            entries = await store.save(conversation)  # compares with the stored history; the claim goes after it
        except ConversationConflict as exc:
            raise ConcurrentTurnError(exc.conversation_id) from exc
        if claim is not None:
            claim.settled(still_held=True)  # saved: released in a task of its own, which the turn does not wait for
        return SavedTurn(entries, sum(len(message_json(entry.message)) for entry in entries), usage=conversation.usage)
    assert index is not None
    updated = ConversationRecord(
        conversation_id=conversation.conversation_id,
        head_id=record.head_id if record is not None else None,
        usage=conversation.usage,
        deferred_tool_requests=conversation.deferred_tool_requests,
        scope=record.scope if record is not None else None,
        forked_from=record.forked_from if record is not None else None,
        forked_at=record.forked_at if record is not None else None,
        branches=list(record.branches) if record is not None else [],
    )
    try:
        appended = await store.append(
            updated,
            conversation.messages[index:],
            expected_revision=conversation.revision,
            claim_id=claim.claim_id if claim is not None else None,
            summarise=_summariser(result, recent, summary_every) if summary_every is not None else None,
        )
    except ConversationConflict as exc:
        raise ConcurrentTurnError(exc.conversation_id) from exc
    if claim is not None:
        claim.settled()  # deleted by the save, or no longer this turn's: nothing left to release
    return SavedTurn(appended.entries, sum(appended.sizes), appended.summarised, usage=conversation.usage)


def _summariser(result: AgentRunResult[Any], recent: RecentConversation, every: tuple[int, int]) -> Summariser:
    """What `append` calls before writing: the title and summary when they are due and the run's messages can make
    them, else None (then the post-turn work decides, as without it)."""

    async def summarise(entries: list[ConversationEntry], sizes: list[int]) -> tuple[str | None, str] | None:
        every_turns, every_tokens = every
        if not entries or not summary_due(recent, sum(sizes), every_turns=every_turns, every_tokens=every_tokens):
            return None
        source = summary_source(
            entries[-1].id, result.all_messages(), title=recent.title, whole=not recent.earlier_omitted
        )
        if source is None:
            return None
        try:  # redaction is CPU-bound: off the event loop, as the post-turn task did it
            return await asyncio.to_thread(title_and_summary_from, source)
        except Exception:  # the turn is saved without them; the post-turn work tries again
            logger.exception(
                'conversation %s: title and summary not made with the save', recent.conversation.conversation_id
            )
            return None

    return summarise
