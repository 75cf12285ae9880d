"""Loading a conversation for a chat turn and saving what the turn added, with `ConcurrentTurnError` on a race."""

from __future__ import annotations

from typing import Any

from pydantic_ai import Conversation
from pydantic_ai.conversation_store import ConversationConflict, ConversationEntry, ConversationStore
from pydantic_ai.run import AgentRunResult
from pydantic_ai.usage import RunUsage

from agentrt.db.errors import AgentRuntimeError


class ConcurrentTurnError(AgentRuntimeError):
    """Another turn saved the conversation after this turn loaded it; this turn's messages were not stored.

    Attributes:
        conversation_id: the conversation.
        stopped_early: True when the turn learnt it before a model request and stopped there (nothing more was
            sent); False when it learnt it only when saving.
    """

    def __init__(self, conversation_id: str, *, stopped_early: bool = False) -> None:
        self.conversation_id = conversation_id
        self.stopped_early = stopped_early
        when = 'stopped before its next model request' if stopped_early else 'was not saved'
        super().__init__(
            f'conversation {conversation_id!r} was changed by another turn; this turn {when}; reload and retry'
        )


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
