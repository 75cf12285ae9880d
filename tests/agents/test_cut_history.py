"""A turn on a conversation whose history ends with tool calls that have no results (a fork or branch cut between a
call and its result) is refused with a clear error before anything is sent, not pydantic-ai's UserError (an HTTP 500
with a traceback on every later turn of that conversation)."""

from __future__ import annotations

import pytest

from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
from agentrt.db.errors import InvalidInputError
from agentrt.services.conversations import PostgresConversationStore
from tests.agents.conftest import account_id
from tests.factories import ledger_rows, scalar

QUESTION = 'Cardiologists in Seattle who accept Medicare'


async def test_a_fork_cut_after_tool_calls_is_refused_before_any_request(demo_data: None) -> None:
    await simple_chat(QUESTION, session_id='whole', account='acme-health')
    store = PostgresConversationStore(await account_id('acme-health'))
    await store.fork('whole', at=2, new_conversation_id='cut')  # the user's request and the model's tool calls
    refused = r"conversation 'cut' ends with tool calls without their results"
    with pytest.raises(InvalidInputError, match=refused) as raised:
        await simple_chat(QUESTION, session_id='cut', account='acme-health')
    assert raised.value.field == 'session_id'
    with pytest.raises(InvalidInputError, match='ends with tool calls without'):
        async with simple_chat_stream(QUESTION, session_id='cut', account='acme-health') as stream:
            async for _ in stream:
                pass
    assert await ledger_rows(conversation_id='cut') == []
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0  # the claim was released
    assert len((await store.load('cut')).messages) == 2  # nothing saved

    whole_turn = len((await store.load('whole')).messages)
    await store.fork('whole', at=whole_turn, new_conversation_id='turn-end')  # cut at the end of a turn: it goes on
    result = await simple_chat(QUESTION, session_id='turn-end', account='acme-health')
    assert result.output.startswith('I found')
