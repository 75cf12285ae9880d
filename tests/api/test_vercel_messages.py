"""A conversation as AI SDK UI messages: each tool call shown with its own turn's result when call ids repeat; an
answer cut off says why in its metadata."""

from __future__ import annotations

from typing import Any

import httpx2
from pydantic_ai.conversation_store import ConversationEntry, ConversationRecord
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.ui.vercel_ai.request_types import UIMessage

from agentrt.api.vercel_messages import vercel_messages
from agentrt.services.conversations import MessagePage, PostgresConversationStore
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, auth


def _turn(question: str, found: int) -> list[ModelMessage]:
    # The demo model names a turn's calls after its number among the prompts it is sent: `t1-search` comes back once
    # the context window leaves older turns out (seen in a 60-turn conversation, and in ones an older agentrt saved).
    return [
        ModelRequest.user_text_prompt(question),
        ModelResponse(parts=[ToolCallPart('search_directory', {'query': question}, tool_call_id='t1-search')]),
        ModelRequest(parts=[ToolReturnPart('search_directory', {'found': found}, tool_call_id='t1-search')]),
        ModelResponse(parts=[TextPart(f'{found} found')]),
    ]


def _tool_parts(dumped: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [part for message in dumped for part in message['parts'] if part['type'] == 'tool-search_directory']


def test_a_call_id_used_again_in_a_later_turn_keeps_each_turn_its_own_result() -> None:
    messages = _turn('Cardiologists in Seattle', 32) + _turn('Dermatologists in Boston', 0)
    page = MessagePage(None, messages, [f'e{n}' for n in range(len(messages))], None)
    dumped = vercel_messages(page)
    assert [(part['input']['query'], part['output']) for part in _tool_parts(dumped)] == [
        ('Cardiologists in Seattle', {'found': 32}),
        ('Dermatologists in Boston', {'found': 0}),
    ]
    # The same messages as two pages of one turn each (what `limit` reads): the same UI messages, ids and all.
    first = MessagePage(None, messages[:4], page.entry_ids[:4], None)
    second = MessagePage(None, messages[4:], page.entry_ids[4:], 'e3')
    assert vercel_messages(first) + vercel_messages(second) == dumped
    assert [message['id'] for message in dumped] == ['e0', 'e1', 'e3', 'e4', 'e5', 'e7']


async def test_a_stored_answer_cut_off_says_why_in_its_ui_messages_metadata(
    client: httpx2.AsyncClient, keys: Keys
) -> None:
    # The stream's finish event said an answer was cut off by the output limit; read back in `format=vercel`, the same
    # answer carried only a timestamp in its metadata (`pydantic` had `finish_reason: length`), so the web UI showed it
    # as a whole answer after a reload (qa168). Its last response's reason rides in `metadata.finishReason`, in the AI
    # SDK's words; a response that ended normally (`stop`, `tool_call`) adds nothing.
    messages = [
        *_turn('Cardiologists in Seattle', 3)[:3],
        ModelResponse(parts=[TextPart('The cardiologists are Dr')], finish_reason='length'),
        ModelRequest.user_text_prompt('and in Boston?'),
        ModelResponse(parts=[TextPart('None found.')], finish_reason='stop'),
        ModelRequest.user_text_prompt('and in Denver?'),
        ModelResponse(parts=[TextPart('Den')], finish_reason='content_filter', metadata={'finishReason': 'mine'}),
    ]
    await _store('cut-off', messages)
    read = await client.get('/api/v1/conversations/cut-off', params={'format': 'vercel'}, headers=auth(keys.acme))
    assert read.status_code == 200, read.text
    answers = [message for message in read.json()['messages'] if message['role'] == 'assistant']
    assert [answer['metadata'].get('finishReason') for answer in answers] == [None, 'length', None, 'mine']
    assert all('timestamp' in answer['metadata']['pydantic_ai'] for answer in answers)
    for message in read.json()['messages']:  # still UI messages the AI SDK (and pydantic-ai's adapter) takes
        UIMessage.model_validate(message)
    stored = await client.get('/api/v1/conversations/cut-off', params={'format': 'pydantic'}, headers=auth(keys.acme))
    assert [m.get('finish_reason') for m in stored.json()['messages'] if m['kind'] == 'response'] == [
        None,
        'length',
        'stop',
        'content_filter',
    ]


async def _store(conversation_id: str, messages: list[ModelMessage]) -> None:
    """Conversation `conversation_id` of acme's, holding `messages`, written as a turn's save writes them."""
    entries: list[ConversationEntry] = []
    for message in messages:
        entries.append(ConversationEntry(parent_id=entries[-1].id if entries else None, message=message))
    store = PostgresConversationStore(await account_id('acme-health'))
    record = ConversationRecord(conversation_id=conversation_id, head_id=entries[-1].id)
    await store.write_record(record, new_entries=entries, expected_revision=None)
