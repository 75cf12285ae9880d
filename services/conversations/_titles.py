"""Post-turn work on a conversation row: a title from its first exchange and a short, current summary.

Titles and summaries are derived from conversation text, so secrets are redacted from every question and answer
(`redact_text`, the ledger's redaction) before any of it is squashed or shortened into them; the work runs in a
worker thread, off the event loop.

A chat turn hands the work the text it needs (`SummarySource`: the turn has the messages in memory), so the task
reads nothing and writes once; without one, the task reads the conversation's head and recent history itself.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydantic_ai.conversation_store import ConversationEntry
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, TextPart, UserPromptPart
from sqlalchemy import CursorResult, DateTime, String, Text, column, func, select, table, update

from agentrt.db.session import get_side_session
from agentrt.services.conversations._store import PostgresConversationStore
from agentrt.services.ledger.redaction import redact_text
from agentrt.services.pg_text import storable_text

logger = logging.getLogger('agentrt.conversations')

TITLE_MAX_CHARS = 80
SUMMARY_MAX_CHARS = 500
# The summary reads only the tail of the history: its cost must not grow with the conversation.
SUMMARY_WINDOW_MESSAGES = 12
RECENT_QUESTIONS = 3
# Titles and summaries show the first hundred or so characters of a text: only this much of each is redacted and
# kept, so the work is bounded however long a message is.
TEXT_SCAN_CHARS = 4000

# The columns added by migration 0004, addressed as a plain table so this module does not depend on
# which of them the `ConversationRow` model maps.
_conversations = table(
    'conversations',
    column('account_id'),
    column('conversation_id', String),
    column('head_id', String),
    column('title', String),
    column('summary', Text),
    column('summary_head_id', String),
    column('summarised_at', DateTime(timezone=True)),
)


@dataclass(frozen=True)
class Exchange:
    """A user's question and the text of the answer to it (empty when the answer was only tool calls)."""

    question: str
    answer: str


@dataclass(frozen=True)
class RawExchange:
    """An exchange as written (each text cut to `TEXT_SCAN_CHARS`), before redaction: `clean_exchanges` makes
    `Exchange`s of them."""

    question: str
    answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class SummarySource:
    """What a turn hands its post-turn work: the saved head and the text to title and summarise it from."""

    head_id: str
    """The conversation's head after the turn: the summary is written only while it still is."""
    title: str | None
    """The title the turn loaded; None when the conversation has none yet (then `first` makes one)."""
    first: RawExchange | None
    """The conversation's first exchange (only when there is no title)."""
    recent: tuple[RawExchange, ...]
    """The exchanges of its last `SUMMARY_WINDOW_MESSAGES` messages."""


def summary_source(
    head_id: str, messages: Sequence[ModelMessage], *, title: str | None, whole: bool
) -> SummarySource | None:
    """The `SummarySource` of a conversation whose last messages (all of them when `whole`) are `messages`.

    None when the work needs the stored history instead: no title yet and `messages` do not start the conversation,
    or fewer than the summary window of messages in memory while older ones exist.
    """
    if title is None and not whole:
        return None
    if not whole and len(messages) < SUMMARY_WINDOW_MESSAGES:
        return None
    first = None
    if title is None:
        firsts = raw_exchanges(_to_second_question(messages))
        first = firsts[0] if firsts else None
    return SummarySource(head_id, title, first, tuple(raw_exchanges(messages[-SUMMARY_WINDOW_MESSAGES:])))


async def refresh_title_and_summary(account_id: int, conversation_id: str, source: SummarySource | None = None) -> bool:
    """Background task: title the conversation if it has no title yet, and rewrite its summary.

    Idempotent and safe to run late or twice: it works from the conversation's current head, does
    nothing when the summary already reflects that head, never replaces an existing title, and writes
    only if the head has not moved meanwhile (the task of the newer turn then writes instead).

    Args:
        account_id: the conversation's account.
        conversation_id: the conversation (`session_id` in the chat layer).
        source: the text a turn handed over (one write, no read); else the task reads what it needs.

    Returns:
        True when the row was updated.
    """
    key = (_conversations.c.account_id == account_id) & (_conversations.c.conversation_id == conversation_id)
    if source is not None:
        title, summary = await asyncio.to_thread(title_and_summary_from, source)
        return await _write(account_id, key, conversation_id, source.head_id, title, summary)
    async with get_side_session(account=account_id) as session:
        row = (
            await session.execute(
                select(_conversations.c.head_id, _conversations.c.title, _conversations.c.summary_head_id).where(key)
            )
        ).first()
    if row is None or row.head_id is None or row.head_id == row.summary_head_id:
        return False

    store = PostgresConversationStore(account_id)
    if row.title is None:
        # Only until the conversation has a title, usually just its first turn: the whole history.
        history = await store.read_history(row.head_id)
    else:
        history = await store.read_history(row.head_id, limit=SUMMARY_WINDOW_MESSAGES)
    title, summary = await asyncio.to_thread(title_and_summary, history, row.title)
    return await _write(account_id, key, conversation_id, row.head_id, title, summary)


async def _write(
    account_id: int, key: Any, conversation_id: str, head_id: str, title: str | None, summary: str
) -> bool:
    """Store the title (if the row has none) and the summary, only while the conversation's head is `head_id`.

    Both are made storable (`storable_text`): a turn's `SummarySource` holds the model's text as it came, before the
    store replaced its NUL and lone surrogates, and either would make the update fail.
    """
    title = None if title is None else storable_text(title)
    summary = storable_text(summary)
    async with get_side_session(account=account_id) as session:
        result = await session.execute(
            update(_conversations)
            .where(key, _conversations.c.head_id == head_id)
            .values(
                title=func.coalesce(_conversations.c.title, title),
                summary=summary,
                summary_head_id=head_id,
                summarised_at=func.now(),
            )
        )
    if cast(CursorResult[Any], result).rowcount == 0:
        logger.debug(
            'conversation %s moved on while it was summarised; the newer turn will summarise it', conversation_id
        )
        return False
    return True


def title_and_summary(history: Sequence[ConversationEntry], title: str | None) -> tuple[str | None, str]:
    """The title (`title` when there is one already, else from the first exchange) and the summary of `history`.

    CPU-bound (redaction): `refresh_title_and_summary` runs it in a worker thread.
    """
    if title is None:
        first = first_exchange(history)
        title = make_title(first) if first else None
    return title, make_summary(title, exchanges(history[-SUMMARY_WINDOW_MESSAGES:]))


def title_and_summary_from(source: SummarySource) -> tuple[str | None, str]:
    """`title_and_summary` from a turn's `SummarySource` (the same result for the same messages)."""
    title = source.title
    if title is None and source.first is not None:
        title = make_title(clean_exchanges([source.first])[0])
    return title, make_summary(title, clean_exchanges(source.recent))


def exchanges(entries: Sequence[ConversationEntry]) -> list[Exchange]:
    """Pair each user prompt with the text of the responses that follow it, in order, secrets redacted."""
    return message_exchanges([entry.message for entry in entries])


def message_exchanges(messages: Sequence[ModelMessage]) -> list[Exchange]:
    """`exchanges` of plain messages (a run's history rather than stored entries), secrets redacted."""
    return clean_exchanges(raw_exchanges(messages))


def raw_exchanges(messages: Sequence[ModelMessage]) -> list[RawExchange]:
    """Pair each user prompt with the texts of the responses that follow it, as written (no redaction yet)."""
    found: list[RawExchange] = []
    for message in messages:
        if isinstance(message, ModelRequest):
            question = ' '.join(_prompt_text(part) for part in message.parts if isinstance(part, UserPromptPart))
            if question.strip():
                found.append(RawExchange(question[:TEXT_SCAN_CHARS]))
        elif isinstance(message, ModelResponse) and found:
            text = ' '.join(part.content for part in message.parts if isinstance(part, TextPart))
            if text.strip():
                last = found[-1]
                found[-1] = RawExchange(last.question, (*last.answers, text[:TEXT_SCAN_CHARS]))
    return found


def clean_exchanges(raw: Sequence[RawExchange]) -> list[Exchange]:
    """`Exchange`s of `raw`: secrets redacted, each on one line (CPU-bound: run it in a worker thread)."""
    found: list[Exchange] = []
    for exchange in raw:
        answer = ''
        for text in exchange.answers:
            answer = _squash(f'{answer} {_clean(text)}')
        found.append(Exchange(_clean(exchange.question), answer))
    return found


def first_exchange(entries: Sequence[ConversationEntry]) -> Exchange | None:
    """The conversation's first question and its answer, if it has one (reading no further than the second)."""
    found = message_exchanges(_to_second_question([entry.message for entry in entries]))
    return found[0] if found else None


def _to_second_question(messages: Sequence[ModelMessage]) -> Sequence[ModelMessage]:
    """`messages` up to (not including) the second request with a user question."""
    asked = 0
    for index, message in enumerate(messages):
        if isinstance(message, ModelRequest) and any(
            isinstance(part, UserPromptPart) and _prompt_text(part).strip() for part in message.parts
        ):
            asked += 1
            if asked == 2:
                return messages[:index]
    return messages


def make_title(exchange: Exchange) -> str:
    """A title from the first question (the answer only when the question is too short to say much)."""
    title = exchange.question
    if len(title) < 12 and exchange.answer:
        title = f'{title}: {exchange.answer}'
    return _shorten(title.rstrip('?!.:; '), TITLE_MAX_CHARS) or 'Untitled conversation'


def make_summary(title: str | None, recent: Sequence[Exchange]) -> str:
    """A few sentences: the topic, the latest questions, and the latest answer.

    Each piece of the user's or the model's text ends every bidirectional embedding, override or isolate it opened
    (`bidi_closed`): a right-to-left override in a question ran on over the rest of the summary, the summary's own
    words and the answer shown reversed (QA).
    """
    parts = [_sentence(f'Topic: {bidi_closed(title)}')] if title else []
    questions = [bidi_closed(_shorten(e.question, 100)) for e in recent[-RECENT_QUESTIONS:]]
    if questions:
        parts.append(_sentence('Recent questions: ' + '; '.join(questions)))
    answer = next((e.answer for e in reversed(recent) if e.answer), '')
    if answer:
        parts.append(_sentence(f'Latest answer: {bidi_closed(_shorten(answer, 200))}'))
    return bidi_closed(_shorten(' '.join(parts), SUMMARY_MAX_CHARS))  # the cut may fall inside a piece


_EMBEDDINGS = frozenset('\u202a\u202b\u202d\u202e')  # LRE, RLE, LRO, RLO: each ended by a PDF (U+202C)
_ISOLATES = frozenset('\u2066\u2067\u2068')  # LRI, RLI, FSI: each ended by a PDI (U+2069)


def bidi_closed(text: str) -> str:
    """`text` with the bidirectional embeddings, overrides and isolates it leaves open closed at its end (Unicode's
    bidirectional algorithm, UAX #9: a PDF ends the last embedding of the current isolate, a PDI its isolate and the
    embeddings inside it), so text after it is laid out as if it were not there."""
    if not any(char in _EMBEDDINGS or char in _ISOLATES for char in text):
        return text
    opened: list[str] = []
    for char in text:
        if char in _EMBEDDINGS or char in _ISOLATES:
            opened.append(char)
        elif char == '\u202c' and opened and opened[-1] in _EMBEDDINGS:
            opened.pop()
        elif char == '\u2069' and any(kind in _ISOLATES for kind in opened):
            while opened.pop() not in _ISOLATES:
                pass
    return text + ''.join('\u2069' if kind in _ISOLATES else '\u202c' for kind in reversed(opened))


def _prompt_text(part: UserPromptPart) -> str:
    if isinstance(part.content, str):
        return part.content
    # Multimodal prompts: keep the text items, skip images, audio and documents.
    return ' '.join(item for item in part.content if isinstance(item, str))


def _sentence(text: str) -> str:
    return text if text.endswith(('.', '?', '!', '…')) else f'{text}.'


def _clean(text: str) -> str:
    """The start of `text`, secrets redacted (before squashing: a PEM key or a line-start secret needs its newlines),
    on one line.

    A text as long as the scan window may have been cut there (`raw_exchanges` cuts each to it): its last word is then
    left out, since it may be the first part of a secret the cut made unrecognisable (after whitespace squashed to
    nothing, that part was the title).
    """
    redacted = redact_text(text[:TEXT_SCAN_CHARS])[0]
    if len(text) >= TEXT_SCAN_CHARS:
        redacted = _LAST_WORD.sub('…', redacted)
    return _squash(redacted)


_LAST_WORD = re.compile(r'\S+\Z')


def _squash(text: str) -> str:
    return re.sub(r'\s+', ' ', text).strip()


def _shorten(text: str, limit: int) -> str:
    """Cut at a word boundary with an ellipsis, so titles never end mid-word."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(' ')
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(' ,;:-') + '…'
