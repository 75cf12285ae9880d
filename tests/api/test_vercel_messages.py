"""A conversation as AI SDK UI messages: each tool call shown with its own turn's result when call ids repeat."""

from __future__ import annotations

from typing import Any

from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, TextPart, ToolCallPart, ToolReturnPart

from agentrt.api.vercel_messages import vercel_messages
from agentrt.services.conversations import MessagePage


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
