"""Conversation titles and summaries: written from the stored history, idempotent, never stale."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic_ai import Agent, Conversation, ModelResponse, RequestUsage, TextPart
from pydantic_ai.conversation_store import ConversationEntry
from pydantic_ai.messages import ModelMessage, ModelRequest, UserPromptPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from sqlalchemy import text

from agentrt.db.models import Account
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.conversations import (
    Exchange,
    PostgresConversationStore,
    RecentConversation,
    SinceSummary,
    load_conversation,
    make_summary,
    make_title,
    refresh_title_and_summary,
    save_turn,
    summary_due,
    summary_source,
)
from agentrt.services.conversations._titles import (
    TEXT_SCAN_CHARS,
    bidi_closed,
    title_and_summary,
    title_and_summary_from,
)


def _answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    prompt = messages[-1].parts[-1].content  # type: ignore[union-attr]
    return ModelResponse(parts=[TextPart(f'Answer to: {prompt}')], usage=RequestUsage(input_tokens=10, output_tokens=3))


AGENT = Agent(FunctionModel(_answer, model_name='test-model'))


async def _account(slug: str = 'acme') -> int:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        account = Account(slug=slug, name=slug.title())
        session.add(account)
        await session.flush()
        return account.id


async def _turn(account_id: int, conversation_id: str, prompt: str) -> None:
    store = PostgresConversationStore(account_id)
    conversation = await load_conversation(store, conversation_id)
    await save_turn(store, await AGENT.run(prompt, conversation=conversation))


async def _row(account_id: int, conversation_id: str) -> dict[str, Any]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        row = await session.execute(
            text(
                'SELECT title, summary, summary_head_id, head_id, summarised_at FROM conversations '
                'WHERE account_id = :a AND conversation_id = :c'
            ),
            {'a': account_id, 'c': conversation_id},
        )
        return dict(row.mappings().one())


async def test_first_turn_titles_and_summarises_the_conversation() -> None:
    account_id = await _account()
    await _turn(account_id, 'c1', 'Who runs  the cardiology\ndepartment?')

    assert await refresh_title_and_summary(account_id, 'c1') is True
    row = await _row(account_id, 'c1')
    assert row['title'] == 'Who runs the cardiology department'
    assert row['summary'] == (
        'Topic: Who runs the cardiology department. Recent questions: Who runs the cardiology department? '
        'Latest answer: Answer to: Who runs the cardiology department?'
    )
    assert row['summary_head_id'] == row['head_id'] and row['summarised_at'] is not None


async def test_later_turns_keep_the_title_and_refresh_the_summary() -> None:
    account_id = await _account()
    for prompt in ('Find the pharmacy', 'Opening hours?', 'And on Sunday?', 'Phone number?'):
        await _turn(account_id, 'c1', prompt)
        assert await refresh_title_and_summary(account_id, 'c1') is True
    row = await _row(account_id, 'c1')
    assert row['title'] == 'Find the pharmacy'
    assert 'Recent questions: Opening hours?; And on Sunday?; Phone number? ' in row['summary']
    assert row['summary'].endswith('Latest answer: Answer to: Phone number?')


async def test_a_retry_or_late_task_does_nothing() -> None:
    account_id = await _account()
    await _turn(account_id, 'c1', 'Where is radiology?')
    assert await refresh_title_and_summary(account_id, 'c1') is True
    before = await _row(account_id, 'c1')
    assert await refresh_title_and_summary(account_id, 'c1') is False
    assert await _row(account_id, 'c1') == before
    assert await refresh_title_and_summary(account_id, 'no-such-conversation') is False


async def test_an_existing_title_is_never_replaced() -> None:
    account_id = await _account()
    await _turn(account_id, 'c1', 'Where is radiology?')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(
            text("UPDATE conversations SET title = 'Chosen by the user' WHERE conversation_id = 'c1'")
        )
    await refresh_title_and_summary(account_id, 'c1')
    row = await _row(account_id, 'c1')
    assert row['title'] == 'Chosen by the user' and row['summary'].startswith('Topic: Chosen by the user.')


async def test_a_turn_saved_meanwhile_wins_over_the_stale_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    account_id = await _account()
    await _turn(account_id, 'c1', 'First question')
    read_history = PostgresConversationStore.read_history
    calls = 0

    async def read_then_race(self: PostgresConversationStore, head_id: str | None, *, limit: int | None = None) -> Any:
        nonlocal calls
        calls += 1
        history = await read_history(self, head_id, limit=limit)
        if calls == 1:
            await _turn(account_id, 'c1', 'Second question')  # lands between the task's read and its write
        return history

    monkeypatch.setattr(PostgresConversationStore, 'read_history', read_then_race)
    assert await refresh_title_and_summary(account_id, 'c1') is False
    assert (await _row(account_id, 'c1'))['summary'] is None
    monkeypatch.undo()
    assert await refresh_title_and_summary(account_id, 'c1') is True
    assert 'Second question' in (await _row(account_id, 'c1'))['summary']


async def test_accounts_are_kept_apart() -> None:
    first, second = await _account('first'), await _account('second')
    await _turn(first, 'shared-id', 'About billing')
    await _turn(second, 'shared-id', 'About parking')
    await refresh_title_and_summary(second, 'shared-id')
    assert (await _row(first, 'shared-id'))['title'] is None
    assert (await _row(second, 'shared-id'))['title'] == 'About parking'


def test_titles_are_cut_at_a_word_boundary() -> None:
    title = make_title(Exchange('word ' * 40, ''))
    assert len(title) <= 80 and title.endswith('word…')
    assert make_title(Exchange('?', '')) == 'Untitled conversation'
    assert make_title(Exchange('Hi', 'Hello, how can I help with the directory?')) == (
        'Hi: Hello, how can I help with the directory'
    )
    assert len(make_summary('t', [Exchange('q ' * 300, 'a ' * 300)] * 5)) <= 500


def test_a_bidi_override_in_a_question_ends_with_it_in_the_summary() -> None:
    # A right-to-left override in a question ran on over the rest of the summary: "Recent questions:", the answer
    # and the server's own words shown reversed (QA).
    summary = make_summary('Dermatologists in \u202eBoston', [Exchange('in \u202eBoston and \u2067more', 'Found 3.')])
    assert summary == (
        'Topic: Dermatologists in \u202eBoston\u202c. Recent questions: in \u202eBoston and \u2067more\u2069\u202c. '
        'Latest answer: Found 3.'
    )
    assert bidi_closed('a\u202eb\u202c c') == 'a\u202eb\u202c c'  # closed already: as it is
    assert bidi_closed('\u2067a\u202eb\u2069c') == '\u2067a\u202eb\u2069c'  # a PDI ends its isolate's embeddings
    assert bidi_closed('x\u202c\u2069') == 'x\u202c\u2069'  # closers with nothing open: nothing added


def _chain(messages: list[ModelMessage]) -> list[ConversationEntry]:
    entries: list[ConversationEntry] = []
    for message in messages:
        entries.append(ConversationEntry(parent_id=entries[-1].id if entries else None, message=message))
    return entries


def _exchange(question: str, answer: str) -> list[ModelMessage]:
    return [ModelRequest(parts=[UserPromptPart(question)]), ModelResponse(parts=[TextPart(answer)])]


def test_a_turn_hands_over_the_text_for_the_same_title_and_summary_the_stored_history_gives() -> None:
    messages = [
        *_exchange('My password: Hunter2-secret?  What is   it?', 'It is\nsecret'),
        *_exchange('And the api key sk-abcdefghijklmnopqrstuvwxyz0123456789ABCD?', 'Redacted, sorry'),
        *[m for n in range(8) for m in _exchange(f'Question {n}', f'Answer {n}')],
    ]
    entries = _chain(messages)
    for title in (None, 'Chosen'):
        source = summary_source(entries[-1].id, messages, title=title, whole=True)
        assert source is not None
        assert title_and_summary_from(source) == title_and_summary(entries, title)
    made = title_and_summary_from(summary_source('h', messages, title=None, whole=True))  # type: ignore[arg-type]
    assert made[0] is not None and 'Hunter2' not in made[0] and 'sk-abc' not in made[1]
    # Without the first messages, a title cannot be made from memory; nor a summary from fewer than its window.
    assert summary_source('h', messages[-4:], title=None, whole=False) is None
    assert summary_source('h', messages[-4:], title='t', whole=False) is None
    assert summary_source('h', messages[-12:], title='t', whole=False) is not None


def test_a_summary_is_due_on_the_first_turn_then_every_n_turns_or_m_tokens() -> None:
    def recent(title: str | None, since: SinceSummary | None) -> RecentConversation:
        return RecentConversation(Conversation(conversation_id='c'), title, False, since_summary=since)

    due = lambda r, added=0: summary_due(r, added, every_turns=5, every_tokens=1_000)  # noqa: E731
    assert due(recent(None, None))  # first turn
    assert due(recent('t', None))  # no summary in the loaded tail
    assert due(recent(None, SinceSummary(0, 0)))  # no title yet
    assert not due(recent('t', SinceSummary(3, 100)))
    assert due(recent('t', SinceSummary(4, 100)))  # the fifth turn since
    assert not due(recent('t', SinceSummary(0, 11_000)), 900)  # 11,900 JSON characters: under 1,000 tokens
    assert due(recent('t', SinceSummary(0, 11_000)), 1_000)  # 12,000 JSON characters (12 a token): 1,000 tokens


async def test_the_handed_over_text_writes_once_and_only_while_the_head_is_current() -> None:
    account_id = await _account()
    await _turn(account_id, 'c1', 'Where is radiology?')
    head = (await _row(account_id, 'c1'))['head_id']
    history = await PostgresConversationStore(account_id).read_history(head)
    source = summary_source(head, [entry.message for entry in history], title=None, whole=True)
    assert source is not None
    assert await refresh_title_and_summary(account_id, 'c1', source) is True
    row = await _row(account_id, 'c1')
    assert row['title'] == 'Where is radiology' and row['summary_head_id'] == head
    await _turn(account_id, 'c1', 'And cardiology?')  # the head moves on: a late task writes nothing
    assert await refresh_title_and_summary(account_id, 'c1', source) is False
    assert (await _row(account_id, 'c1'))['summary_head_id'] == head


async def test_the_handed_over_text_of_a_model_is_stored_with_nul_and_lone_surrogates_replaced() -> None:
    """A turn hands over its messages as the model wrote them (the store replaces NUL and lone surrogates only in
    what it saves): the title and summary made from them are made storable before the update, which would fail."""
    account_id = await _account()
    await _turn(account_id, 'c1', 'Where is radiology?')
    head = (await _row(account_id, 'c1'))['head_id']
    messages: list[ModelMessage] = [
        ModelRequest(parts=[UserPromptPart('\x00Where is\ud800 radiology?')]),
        ModelResponse(parts=[TextPart('On floor\x00 2\udc80')]),
    ]
    source = summary_source(head, messages, title=None, whole=True)
    assert source is not None
    assert await refresh_title_and_summary(account_id, 'c1', source) is True
    row = await _row(account_id, 'c1')
    assert row['title'] == '\ufffdWhere is\ufffd radiology' and row['summary_head_id'] == head
    assert 'floor\ufffd 2\ufffd' in row['summary'], row['summary']


@pytest.mark.parametrize(('before', 'blank'), [('', ' '), ('', '\n'), ('My key:', '\n')])
def test_a_secret_the_scan_window_cuts_shows_none_of_itself_in_the_title_or_summary(before: str, blank: str) -> None:
    # Only the first TEXT_SCAN_CHARS of a text are redacted; a secret that window cut in two was no longer one the
    # rules knew, and once the whitespace before it was squashed its first part was the title.
    secret = 'sk-proj-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9fG1hJ3'
    question = before + blank * (TEXT_SCAN_CHARS - 20 - len(before)) + secret
    messages = _exchange(question, 'An answer')

    title, summary = title_and_summary(_chain(messages), None)

    assert title is not None and 'aB3dE5' not in title and 'aB3dE5' not in summary, (title, summary)
