"""`load_page`: a conversation read back a page at a time, its boundaries, positions while it grows, bad positions."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic_ai import Agent, ModelRequest, ModelResponse, RequestUsage, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agentrt.db.errors import InvalidInputError
from agentrt.db.models import Account
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.conversations import (
    MessagePage,
    PostgresConversationStore,
    UnknownPositionError,
    load_conversation,
    load_page,
    save_turn,
    starts_turn,
)


def two_tools_then_answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Two rounds of a tool call per turn, then an answer: a turn is 6 messages."""
    rounds = 0
    for message in reversed(messages):
        if starts_turn(message):
            break
        rounds += isinstance(message, ModelRequest)
    if rounds < 2:
        call = ToolCallPart('lookup', {'q': f'q{rounds}'}, tool_call_id=f'call-{len(messages)}')
        return ModelResponse(parts=[call], usage=RequestUsage(input_tokens=10, output_tokens=2))
    return ModelResponse(parts=[TextPart(f'answer after {len(messages)}')])


def tool_agent() -> Agent[None, str]:
    agent = Agent(FunctionModel(two_tools_then_answer, model_name='gpt-4o-mini'))

    @agent.tool_plain
    async def lookup(q: str) -> dict[str, Any]:
        return {'q': q}

    return agent


@pytest.fixture
async def account_ids() -> tuple[int, int]:
    accounts = [Account(slug='pager-a', name='Pager A'), Account(slug='pager-b', name='Pager B')]
    async with get_db_session(account=Unscoped.ADMIN) as session:
        session.add_all(accounts)
        await session.flush()
        return accounts[0].id, accounts[1].id


async def add_turns(store: PostgresConversationStore, conversation_id: str, prompts: list[str]) -> None:
    agent = tool_agent()
    for prompt in prompts:
        conversation = await load_conversation(store, conversation_id)
        await save_turn(store, await agent.run(prompt, conversation=conversation))


async def walk_back(store: PostgresConversationStore, conversation_id: str, limit: int) -> list[MessagePage]:
    """Every page, newest first, each read with the position the one after it gave."""
    pages: list[MessagePage] = []
    before: str | None = None
    while True:
        page = await load_page(store, conversation_id, limit=limit, before=before)
        assert page is not None
        pages.append(page)
        if page.earlier is None:
            return pages
        assert page.earlier == page.entry_ids[0] and page.messages, 'a page that says more are older makes progress'
        before = page.earlier


def tool_results(message: ModelMessage) -> set[str]:
    parts = message.parts if isinstance(message, ModelRequest) else []
    return {part.tool_call_id for part in parts if isinstance(part, ToolReturnPart)}


def tool_calls(message: ModelMessage) -> set[str]:
    parts = message.parts if isinstance(message, ModelResponse) else []
    return {part.tool_call_id for part in parts if isinstance(part, ToolCallPart)}


async def test_every_page_size_reads_the_whole_conversation_once_without_splitting_a_tool_call(
    account_ids: tuple[int, int],
) -> None:
    store = PostgresConversationStore(account_ids[0])
    await add_turns(store, 'long', ['one', 'two', 'three', 'four'])
    whole = await store.load('long')
    assert whole is not None and len(whole.messages) == 24
    for limit in range(1, 14):
        pages = await walk_back(store, 'long', limit)
        read = [message for page in reversed(pages) for message in page.messages]
        assert read == whole.messages, limit
        for page in pages:
            # A page holds the calls of the results it shows: none needs the page before it.
            called = set().union(*(tool_calls(message) for message in page.messages))
            answered = set().union(*(tool_results(message) for message in page.messages))
            assert answered <= called, (limit, page.entry_ids[0])
            assert len(page.messages) <= limit + 1
            if limit >= 6:  # a whole turn fits: pages start at a turn
                assert starts_turn(page.messages[0]), limit
    # A page of one turn: the latest, then the one before it.
    latest = await load_page(store, 'long', limit=6)
    assert latest is not None and latest.messages == whole.messages[-6:] and latest.revision == whole.revision
    second = await load_page(store, 'long', limit=11, before=latest.earlier)
    assert second is not None and second.messages == whole.messages[-12:-6]
    everything = await load_page(store, 'long', limit=None)
    assert everything is not None and everything.messages == whole.messages and everything.earlier is None
    first = await load_page(store, 'long', limit=3, before=everything.entry_ids[0])
    assert first == MessagePage(whole.revision, [], [], None)


async def test_positions_stay_where_they_were_while_the_conversation_goes_on(account_ids: tuple[int, int]) -> None:
    store = PostgresConversationStore(account_ids[0])
    await add_turns(store, 'growing', ['one', 'two', 'three'])
    before_growth = await store.load('growing')
    assert before_growth is not None
    latest = await load_page(store, 'growing', limit=6)
    assert latest is not None and latest.earlier is not None
    await add_turns(store, 'growing', ['four', 'five'])  # turns saved while the reader pages back
    older: list[ModelMessage] = []
    before: str | None = latest.earlier
    while before is not None:
        page = await load_page(store, 'growing', limit=4, before=before)
        assert page is not None
        older[:0] = page.messages
        before = page.earlier
    assert older + latest.messages == before_growth.messages
    grown = await load_page(store, 'growing', limit=6)
    assert grown is not None and grown.messages != latest.messages and starts_turn(grown.messages[0])


async def test_an_unknown_or_foreign_position_is_refused(account_ids: tuple[int, int]) -> None:
    mine, theirs = (PostgresConversationStore(account) for account in account_ids)
    await add_turns(mine, 'c', ['one'])
    await add_turns(theirs, 'c', ['one'])
    their_page = await load_page(theirs, 'c', limit=2)
    assert their_page is not None and their_page.earlier is not None
    # Another account's entry is not one of this account's (row-level security and the account filter).
    with pytest.raises(UnknownPositionError):
        await load_page(mine, 'c', limit=2, before=their_page.earlier)
    with pytest.raises(UnknownPositionError):
        await load_page(mine, 'c', limit=2, before='no-such-entry')
    assert await load_page(mine, 'nothing-here', limit=2) is None
    assert await load_page(mine, 'nothing-here', limit=2, before=their_page.earlier) is None
    for bad, field in ((0, 'limit'), (-1, 'limit'), (2**31 - 1, 'limit')):
        with pytest.raises(InvalidInputError) as caught:
            await load_page(mine, 'c', limit=bad)
        assert caught.value.field == field
    with pytest.raises(InvalidInputError) as caught:
        await load_page(mine, 'c', limit=2, before='a\x00b')
    assert caught.value.field == 'before'


async def test_a_position_outside_the_conversations_history_is_refused(account_ids: tuple[int, int]) -> None:
    """A position names an entry; one of another conversation of the account, or one a `branch()` left behind, was
    read as this conversation's earlier messages (a QA run: another conversation's turns under this one's name)."""
    store = PostgresConversationStore(account_ids[0])
    await add_turns(store, 'a', ['one', 'two'])
    await add_turns(store, 'b', ['uno', 'dos'])
    page_of_b = await load_page(store, 'b', limit=2)
    assert page_of_b is not None and page_of_b.earlier is not None
    with pytest.raises(UnknownPositionError):
        await load_page(store, 'a', limit=2, before=page_of_b.earlier)

    in_turn_two = await load_page(store, 'a', limit=2)
    assert in_turn_two is not None and in_turn_two.earlier is not None
    older = await load_page(store, 'a', limit=2, before=in_turn_two.earlier)
    assert older is not None and older.messages
    loaded = await store.load('a')
    assert loaded is not None and len(loaded.messages) == 12  # two turns of 6 messages
    await store.branch('a', at=6, expected_revision=loaded.revision)  # turn two left behind, kept as a branch
    await add_turns(store, 'a', ['two, again'])
    with pytest.raises(UnknownPositionError):
        await load_page(store, 'a', limit=2, before=in_turn_two.earlier)
    whole = await store.load('a')
    assert whole is not None and len(whole.messages) == 12
    newest = await load_page(store, 'a', limit=2)
    assert newest is not None and newest.earlier is not None
    pages = [newest]
    while pages[-1].earlier is not None:  # the history as it is now reads back whole, page by page
        page = await load_page(store, 'a', limit=2, before=pages[-1].earlier)
        assert page is not None
        pages.append(page)
    assert [m for page in reversed(pages) for m in page.messages] == whole.messages
