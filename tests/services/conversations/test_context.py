"""The bounded context: `fit_history` (the history processor) and `load_recent_conversation` (the tail load)."""

from __future__ import annotations

from pydantic_ai.conversation_store import ConversationEntry, ConversationRecord
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    SystemPromptPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from sqlalchemy import text

from agentrt.db.models import Account
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.conversations import (
    FitMemo,
    PostgresConversationStore,
    estimate_tokens,
    fit_history,
    load_recent_conversation,
)
from agentrt.services.conversations._context import SUMMARY_MARK, SUMMARY_PREFIX


def _turn(n: int, *, tools: int = 1, size: int = 400) -> list[ModelMessage]:
    """A turn: the question, a response calling `tools` tools, their results, the answer."""
    calls = [ToolCallPart('search', {'q': f'q{n}-{i}'}, tool_call_id=f't{n}-{i}') for i in range(tools)]
    returns = [ToolReturnPart('search', 'r' * size, tool_call_id=f't{n}-{i}') for i in range(tools)]
    return [
        ModelRequest(parts=[UserPromptPart(f'question {n}')]),
        ModelResponse(parts=list(calls)),
        ModelRequest(parts=list(returns)),
        ModelResponse(parts=[TextPart(f'answer {n}')]),
    ]


def _history(turns: int, **kwargs: int) -> list[ModelMessage]:
    messages = [m for n in range(1, turns + 1) for m in _turn(n, **kwargs)]
    return [*messages, ModelRequest(parts=[UserPromptPart('the new question')])]


def _questions(messages: list[ModelMessage]) -> list[str]:
    return [p.content for m in messages for p in m.parts if isinstance(p, UserPromptPart)]  # type: ignore[misc]


def test_everything_fits_nothing_changes() -> None:
    history = _history(3)
    fitted = fit_history(history, max_tokens=10_000)
    assert fitted == history
    assert all(a is b for a, b in zip(fitted, history, strict=True)), 'the same objects, in order'


def test_older_turns_are_folded_into_a_summary_within_the_budget() -> None:
    history = _history(20)
    fitted = fit_history(history, max_tokens=800, title='Cardiologists in Seattle')
    assert estimate_tokens(fitted) <= 800
    summary, *kept = fitted
    assert isinstance(summary, ModelRequest) and summary.metadata == {SUMMARY_MARK: True}
    content = summary.parts[0].content
    assert isinstance(summary.parts[0], SystemPromptPart) and content.startswith(SUMMARY_PREFIX)
    assert 'Topic: Cardiologists in Seattle.' in content
    assert 'Recent questions: question 13; question 14; question 15.' in content  # the latest ones left out
    assert _questions(kept) == [
        'question 16',
        'question 17',
        'question 18',
        'question 19',
        'question 20',
        'the new question',
    ]
    assert kept[-1] is history[-1], 'the request about to be sent is the run’s own object'
    # Whole turns only: the first kept message starts a turn, and every call has its result.
    assert _questions([kept[0]])
    calls = {p.tool_call_id for m in kept for p in m.parts if isinstance(p, ToolCallPart)}
    returns = {p.tool_call_id for m in kept for p in m.parts if isinstance(p, ToolReturnPart)}
    assert calls == returns


def test_the_turn_being_answered_is_kept_whole_even_over_the_budget() -> None:
    history = _history(2)
    current = [
        ModelRequest(parts=[UserPromptPart('big question')]),
        ModelResponse(parts=[ToolCallPart('search', {}, tool_call_id='big')]),
        ModelRequest(parts=[ToolReturnPart('search', 'x' * 20_000, tool_call_id='big')]),
    ]
    fitted = fit_history([*history[:-1], *current], max_tokens=1_000)
    assert fitted[-3:] == current and len(fitted) == 4  # the summary, then the current turn
    assert estimate_tokens(fitted) > 1_000


def test_a_window_that_starts_mid_turn_drops_the_partial_turn() -> None:
    history = _history(4)[6:]  # starts at turn 2's tool results, as a tail load can
    fitted = fit_history(history, max_tokens=10_000, earlier_omitted=True)
    assert isinstance(fitted[0], ModelRequest) and SUMMARY_MARK in (fitted[0].metadata or {})
    assert _questions(fitted[1:2]) == ['question 3'], 'the kept part starts at a user prompt'
    assert fitted[0].parts[0].content == f'{SUMMARY_PREFIX} its earlier turns are not repeated.'


def test_processing_its_own_output_again_changes_nothing() -> None:
    # pydantic-ai's ProcessHistory writes the processed history back: the next request hands it in again.
    once = fit_history(_history(12), max_tokens=900, title='T')
    twice = fit_history(once, max_tokens=900, title='T')
    assert twice == once and twice[0] is once[0]


def test_estimate_counts_text_arguments_and_results() -> None:
    assert estimate_tokens([ModelRequest(parts=[UserPromptPart('x' * 400)])]) == 100 + 4
    call = ModelResponse(parts=[ToolCallPart('t', {'q': 'y' * 100})])
    assert estimate_tokens([call]) == (1 + len('{"q":"' + 'y' * 100 + '"}') + 3) // 4 + 4


async def test_the_tail_load_is_bounded_by_size_and_saving_appends_to_the_whole_record() -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        account = Account(slug='ctx', name='Ctx')
        session.add(account)
        await session.flush()
        account_id = account.id
    store = PostgresConversationStore(account_id)
    assert (await load_recent_conversation(store, 'none', max_tokens=1_000)).conversation.messages == []
    messages = [m for n in range(1, 41) for m in _turn(n, size=1_000)]
    entries: list[ConversationEntry] = []
    for message in messages:
        entries.append(ConversationEntry(parent_id=entries[-1].id if entries else None, message=message))
    record = ConversationRecord(conversation_id='long', head_id=entries[-1].id)
    await store.write_record(record, new_entries=entries, expected_revision=None)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(text("UPDATE conversations SET title = 'The topic' WHERE conversation_id = 'long'"))

    recent = await load_recent_conversation(store, 'long', max_tokens=1_000)
    loaded = recent.conversation.messages
    assert recent.title == 'The topic' and recent.earlier_omitted
    assert 4 < len(loaded) < 40, 'about what the budget can use, not all 160 messages'
    assert loaded == messages[-len(loaded) :]
    small = await load_recent_conversation(store, 'short', max_tokens=1_000)
    assert not small.earlier_omitted

    everything = await load_recent_conversation(store, 'long', max_tokens=1_000_000)
    assert len(everything.conversation.messages) == 160 and not everything.earlier_omitted

    # Saving a run's result continues the whole stored conversation, not the loaded tail.
    conversation = recent.conversation
    conversation.messages.append(ModelRequest(parts=[UserPromptPart('next')]))
    saved = await store.save(conversation)
    assert len(saved) == 1 and saved[0].parent_id == entries[-1].id
    assert len((await store.load('long')).messages) == 161  # type: ignore[union-attr]


async def test_the_tail_load_starts_at_a_user_prompt_wherever_the_cap_cuts() -> None:
    # A cut within a turn left a request of tool returns first, whose calls pydantic-ai did not see: it dropped it,
    # the run no longer held the loaded messages, and every save of a long conversation left its fast path (QA).
    async with get_db_session(account=Unscoped.ADMIN) as session:
        account = Account(slug='cut', name='Cut')
        session.add(account)
        await session.flush()
        account_id = account.id
    store = PostgresConversationStore(account_id)
    messages = [m for n in range(1, 11) for m in _turn(n, size=1_000)]
    entries: list[ConversationEntry] = []
    for message in messages:
        entries.append(ConversationEntry(parent_id=entries[-1].id if entries else None, message=message))
    await store.write_record(
        ConversationRecord(conversation_id='cut', head_id=entries[-1].id), new_entries=entries, expected_revision=None
    )
    sizes = (await store.read_tail('cut', cap_chars=10**9, max_messages=1_000)).sizes  # type: ignore[union-attr]
    cap_tokens = {(sum(sizes[-k:]) + 12) // 12 for k in range(1, 39)}  # a cut at every message (12 JSON chars a token)
    starts = set()
    for max_tokens in sorted(cap_tokens):
        recent = await load_recent_conversation(store, 'cut', max_tokens=max_tokens)
        loaded = recent.conversation.messages
        assert recent.earlier_omitted and loaded == messages[len(messages) - len(loaded) :]
        assert not loaded or isinstance(loaded[0].parts[0], UserPromptPart), (max_tokens, loaded[0])
        assert len(recent.stored) == len(recent.stored_json) == len(loaded) == recent.conversation.new_message_index
        starts.add(len(loaded))
    assert {0, 4, 8} <= starts, 'under one turn: nothing; else whole turns'


def test_a_runs_requests_share_estimates_and_the_summary() -> None:
    messages = [m for n in range(1, 41) for m in _turn(n, size=1_000)]
    memo = FitMemo()
    first = fit_history(messages, max_tokens=1_000, title='Topic', memo=memo)
    plain = fit_history(messages, max_tokens=1_000, title='Topic')
    assert first[1:] == plain[1:] and first[0].parts[0].content == plain[0].parts[0].content  # type: ignore[union-attr]
    again = fit_history(messages, max_tokens=1_000, title='Topic', memo=memo)
    assert again == first and again[0] is first[0], 'the same messages left out: the summary made once'
    assert memo.estimate(messages) == estimate_tokens(messages)
