"""What of a conversation goes to the model: the latest turns whole, within a token budget, older turns folded.

The stored conversation stays complete (it is the record); only what a request sends is bounded. Two halves:

- `load_recent_conversation` loads only the tail of a long conversation, about what the budget can use (walking
  back from the head in SQL until the stored JSON reaches a cap, then from the first user prompt of what it read),
  so loading a turn costs the same at turn 500 as at turn 5;
- `fit_history` is the history processor: it keeps the turn being answered whole, then earlier turns newest first
  while they fit, and folds everything older into one short summary request at the front. A turn is cut only at
  its user prompt, so a tool call is never separated from its result.

Tokens are estimated without a tokenizer (`CHARS_PER_TOKEN` characters a token, plus a little per message).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pydantic_ai import Conversation
from pydantic_ai.conversation_store import ConversationRecord
from pydantic_ai.messages import (
    BaseToolCallPart,
    BaseToolReturnPart,
    ModelMessage,
    ModelRequest,
    ModelRequestPart,
    ModelResponsePart,
    RetryPromptPart,
    SystemPromptPart,
    TextContent,
)

from agentrt.db.driver import DriverTransaction
from agentrt.db.settings import CHARS_PER_TOKEN
from agentrt.services.conversations._pages import starts_turn
from agentrt.services.conversations._store import PostgresConversationStore
from agentrt.services.conversations._stored import StoredTail
from agentrt.services.conversations._titles import make_summary, message_exchanges

if TYPE_CHECKING:
    from agentrt.services.conversations._claims import TurnClaim

SUMMARY_MARK = 'agentrt.context_summary'
"""`ModelRequest.metadata` key of the summary request `fit_history` puts in front of the kept turns."""

SUMMARY_PREFIX = 'Earlier in this conversation (not shown here):'
MESSAGE_OVERHEAD_TOKENS = 4
"""Role and framing tokens a provider adds per message."""
MEDIA_CHARS = 4_000
"""What an image, audio clip or document in a prompt counts for (about 1,000 tokens): real costs vary by provider."""
LOAD_JSON_FACTOR = 3
"""Stored JSON (ids, timestamps, part kinds) per character of text sent: the load reads up to this many times
the budget, so the processor has whole turns to choose from."""
LOAD_MAX_MESSAGES = 2_000
"""A conversation of tiny messages still loads at most this many."""


@dataclass(frozen=True)
class SinceSummary:
    """How much a conversation grew after the head its stored summary was written from (post-turn work)."""

    turns: int
    """User turns stored after that head."""
    stored_chars: int
    """Their stored JSON, in characters."""


@dataclass(frozen=True)
class RecentConversation:
    """The tail of a conversation loaded for a turn, with what the processor needs to fold the rest."""

    conversation: Conversation
    """Ready for `agent.run(conversation=...)`; saving it appends to the whole stored conversation."""
    title: str | None
    """The conversation's title (from its first exchange, kept by the post-turn work), for the summary's topic."""
    earlier_omitted: bool
    """True when older messages were left in the database (the loaded tail does not start the conversation)."""
    record: ConversationRecord | None = None
    """The stored record the tail belongs to (None for a new conversation): `append_turn` saves without reading it."""
    stored: tuple[ModelMessage, ...] = ()
    """The loaded messages, as loaded: a save appends after them only while the run kept them."""
    since_summary: SinceSummary | None = None
    """Growth since the stored summary; None when it has none or its head is older than the loaded tail."""
    stored_json: tuple[str, ...] = ()
    """The stored JSON of each of `stored` (empty when not at hand): what the ledger would dump again."""


async def load_recent_conversation(
    store: PostgresConversationStore,
    conversation_id: str,
    *,
    max_tokens: int,
    scope: str | None = None,
    transaction: DriverTransaction | None = None,
    claim: TurnClaim | None = None,
) -> RecentConversation:
    """Load the last messages of a conversation, about what `max_tokens` of context can use, or start a new one.

    One query (`PostgresConversationStore.read_tail`), each message validated once from the stored JSON text. A tail
    cut within a turn starts at the next user prompt, so the run keeps every loaded message (`append_turn`'s one
    statement).

    Args:
        store: the account's conversation store.
        conversation_id: the conversation to continue or start.
        max_tokens: the context budget; the load reads stored JSON up to `LOAD_JSON_FACTOR` times its size.
        scope: only load it if it was saved with this scope.
        transaction: load in the caller's transaction (`driver_transaction`: a turn claims and loads its
            conversation in one); else in one of its own.
        claim: take this claim first, in the same statement (with `transaction` only): a chat turn's start.

    Raises:
        ConcurrentTurnError: `claim` was not taken: another turn holds the conversation (stage 'start').
    """
    cap_chars = max_tokens * CHARS_PER_TOKEN * LOAD_JSON_FACTOR
    if claim is not None:
        if transaction is None:
            raise ValueError("a claim is taken in the caller's transaction: give `transaction`")
        taken, tail = await store.claim_and_read_tail(
            transaction,
            conversation_id,
            claim_sql=claim.sql,
            claim_params=claim.params(),
            cap_chars=cap_chars,
            max_messages=LOAD_MAX_MESSAGES,
        )
        if not taken:
            # Raises, saying how long the conversation stays held, unless the claim was a dead process's: taken
            # over, and the tail read again (the snapshot above may predate that process's last save).
            await claim.refused(session=transaction)
            tail = await store.read_tail(
                conversation_id, cap_chars=cap_chars, max_messages=LOAD_MAX_MESSAGES, transaction=transaction
            )
        claim.taken(True)
    else:
        tail = await store.read_tail(
            conversation_id, cap_chars=cap_chars, max_messages=LOAD_MAX_MESSAGES, transaction=transaction
        )
    if tail is None or (scope is not None and tail.record.scope != scope):
        new = Conversation(conversation_id=conversation_id)
        new.new_message_index = 0  # nothing stored: everything the run adds is new
        return RecentConversation(new, None, False)
    if not tail.reached_first:
        tail = _from_a_turn(tail)
    record = tail.record
    conversation = Conversation(
        messages=list(tail.messages),
        usage=record.usage,
        conversation_id=record.conversation_id,
        deferred_tool_requests=record.deferred_tool_requests,
        revision=record.revision,
    )
    # The run appends after these; `append_turn` checks that it kept them (pydantic-ai's own marks are private).
    conversation.new_message_index = len(conversation.messages)
    since = None
    if tail.summary_head_id is not None and tail.summary_head_id in tail.entry_ids:
        after = tail.entry_ids.index(tail.summary_head_id) + 1
        turns = sum(1 for message in tail.messages[after:] if starts_turn(message))
        since = SinceSummary(turns, sum(tail.sizes[after:]))
    return RecentConversation(
        conversation,
        tail.title,
        not tail.reached_first,
        record=record,
        stored=tuple(tail.messages),
        since_summary=since,
        stored_json=tuple(tail.bodies),
    )


def _from_a_turn(tail: StoredTail) -> StoredTail:
    """`tail` from its first user prompt on: a walk cut at the cap begins anywhere in a turn, nearly always at a
    request of tool returns whose calls it left in the database, and pydantic-ai drops such a leading orphan, so the
    run would no longer hold the loaded messages and the save would leave its one-statement path (`append_turn`).
    The older messages of that turn stay in the database with the rest (`earlier_omitted`); without any user prompt
    (one turn over the whole cap) nothing is loaded."""
    start = next((i for i, message in enumerate(tail.messages) if starts_turn(message)), len(tail.messages))
    if start == 0:
        return tail
    return replace(
        tail,
        entry_ids=tail.entry_ids[start:],
        sizes=tail.sizes[start:],
        messages=tail.messages[start:],
        bodies=tail.bodies[start:],
    )


def fit_history(
    messages: Sequence[ModelMessage],
    *,
    max_tokens: int,
    title: str | None = None,
    earlier_omitted: bool = False,
    memo: FitMemo | None = None,
) -> list[ModelMessage]:
    """The history processor: the messages to send, within `max_tokens` (estimated) where the turns allow it.

    The turn being answered (from the last user prompt on) is always kept whole, even over the budget: the
    per-turn usage limits bound it. Earlier turns are added newest first while they fit, each whole. What is left
    out (and what `earlier_omitted` says the load left in the database) becomes one summary request in front:
    the conversation's title and the latest questions and answer of the turns left out.

    The kept messages are the same objects, in the same order (pydantic-ai records on the last request it sends).

    Args:
        messages: the run's history, ending with the request about to be sent.
        max_tokens: the budget for the history sent (the agent's instructions and tool definitions come on top).
        title: the conversation's title, the topic of the summary.
        earlier_omitted: older messages exist that `messages` does not hold.
        memo: estimates and summaries kept from the run's earlier requests (`FitMemo`), which resend the same
            messages: each message is estimated once, and a summary of the same messages is made once.
    """
    memo = memo or FitMemo()
    estimate = memo.estimate
    messages = list(messages)
    starts = [i for i, message in enumerate(messages) if starts_turn(message)]
    if not starts:
        return messages
    turns = [messages[start:end] for start, end in zip(starts, [*starts[1:], len(messages)], strict=True)]
    before_first = [m for m in messages[: starts[0]] if not _is_summary(m)]
    carried = next((m for m in messages[: starts[0]] if _is_summary(m)), None)
    kept_from = len(turns) - 1
    used = estimate(turns[-1])
    while kept_from > 0 and used + (cost := estimate(turns[kept_from - 1])) <= max_tokens:
        kept_from, used = kept_from - 1, used + cost
    while True:
        left_out = before_first + [m for turn in turns[:kept_from] for m in turn]
        if not left_out and not earlier_omitted and carried is None:
            return messages[starts[0] :]
        summary = memo.summary(title, left_out, carried)
        # The summary is part of the budget: give up the oldest kept turn until it fits (never the current one).
        if kept_from == len(turns) - 1 or used + estimate([summary]) <= max_tokens:
            return [summary, *messages[starts[kept_from] :]]
        used -= estimate(turns[kept_from])
        kept_from += 1


class FitMemo:
    """What `fit_history` computed for one run's requests: token estimates by message and the latest summary.

    Messages are recognised by identity (kept alive here): a request resends the run's earlier messages as the same
    objects. Use one per run (`ContextWindow` does), not one per process.
    """

    __slots__ = ('_summary', '_tokens')

    def __init__(self) -> None:
        """Start with nothing estimated."""
        self._tokens: dict[int, tuple[ModelMessage, int]] = {}
        self._summary: tuple[tuple[ModelMessage, ...], str | None, ModelMessage | None, ModelRequest] | None = None

    def estimate(self, messages: Sequence[ModelMessage]) -> int:
        """`estimate_tokens`, each message estimated once."""
        total = 0
        for message in messages:
            seen = self._tokens.get(id(message))
            if seen is None or seen[0] is not message:
                seen = self._tokens[id(message)] = (message, estimate_tokens([message]))
            total += seen[1]
        return total

    def summary(self, title: str | None, left_out: list[ModelMessage], carried: ModelMessage | None) -> ModelRequest:
        """`_summary_request`, made once for the same messages left out (the turn's later requests leave out the
        same older turns)."""
        kept = self._summary
        if (
            kept is not None
            and kept[1] == title
            and kept[2] is carried
            and len(kept[0]) == len(left_out)
            and all(a is b for a, b in zip(kept[0], left_out, strict=True))
        ):
            return kept[3]
        summary = _summary_request(title, left_out, carried)
        self._summary = (tuple(left_out), title, carried, summary)
        return summary


def estimate_tokens(messages: Sequence[ModelMessage]) -> int:
    """Estimated tokens of `messages` as a provider counts them: text at `CHARS_PER_TOKEN`, plus framing."""
    total = 0
    for message in messages:
        chars = sum(_part_chars(part) for part in message.parts)
        total += math.ceil(chars / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS
    return total


def _part_chars(part: ModelRequestPart | ModelResponsePart) -> int:
    if isinstance(part, BaseToolCallPart):
        return len(part.tool_name) + len(part.args_as_json_str())
    if isinstance(part, BaseToolReturnPart):
        return len(part.tool_name) + len(part.model_response_str())
    if isinstance(part, RetryPromptPart):
        return len(part.model_response())
    content = getattr(part, 'content', None)
    if isinstance(content, str):
        return len(content)
    if isinstance(content, Sequence):
        return sum(_item_chars(item) for item in content)
    return 0


def _item_chars(item: object) -> int:
    if isinstance(item, str):
        return len(item)
    if isinstance(item, TextContent):
        return len(item.content)
    return MEDIA_CHARS


def _is_summary(message: ModelMessage) -> bool:
    return isinstance(message, ModelRequest) and bool(message.metadata) and SUMMARY_MARK in (message.metadata or {})


def _summary_request(title: str | None, left_out: list[ModelMessage], carried: ModelMessage | None) -> ModelRequest:
    """One request holding the summary of what was left out, or the carried one when nothing new was left out.

    A processor that rewrites the run's history (pydantic-ai's `ProcessHistory`) hands back its own summary on
    the next request of the turn; it is kept rather than re-summarised from nothing.
    """
    found = message_exchanges(left_out)
    if carried is not None and not found:
        assert isinstance(carried, ModelRequest)
        return carried
    body = make_summary(title, found) if (title or found) else 'its earlier turns are not repeated.'
    return ModelRequest(parts=[SystemPromptPart(f'{SUMMARY_PREFIX} {body}')], metadata={SUMMARY_MARK: True})


def summary_due(recent: RecentConversation, added_chars: int, *, every_turns: int, every_tokens: int) -> bool:
    """Whether the turn that added `added_chars` of stored JSON to `recent` should refresh the title and summary.

    Yes when the conversation has no title or no summary yet (its first turn), when the summary's head is older
    than the loaded tail, and once `every_turns` turns or `every_tokens` estimated tokens (the stored JSON over
    `LOAD_JSON_FACTOR` characters per character of text, at `CHARS_PER_TOKEN`) were added since the summary.
    """
    since = recent.since_summary
    if recent.title is None or since is None:
        return True
    tokens = (since.stored_chars + added_chars) / (LOAD_JSON_FACTOR * CHARS_PER_TOKEN)
    return since.turns + 1 >= every_turns or tokens >= every_tokens
