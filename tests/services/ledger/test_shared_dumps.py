"""One JSON dump per new request per turn, shared by the ledger and the conversation store (issue 20).

The ledger dumps each request as it is sent; the store saves that same text (`dumped_message_json`) when nothing
pydantic-ai changes on a sent request has changed since, and dumps the message itself otherwise (responses, which
pydantic-ai stamps after the ledger recorded them; NUL; lone surrogates; values dumped with the ledger's fallback).
What the store saves must be, byte for byte, a fresh dump of the message as it is at the save.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import TypeAdapter
from pydantic_ai import ModelResponse, RequestUsage, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart, UserPromptPart, WorkspaceRef
from pydantic_ai.models.function import AgentInfo, FunctionModel
from sqlalchemy import text

from agentrt.agents.demo_model import next_response
from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.budgets import _estimate as budget_estimate
from agentrt.services.conversations import PostgresConversationStore
from agentrt.services.conversations._stored import message_adapter, message_json, storable_json
from agentrt.services.ledger import _contents as ledger_contents
from agentrt.services.ledger import dumped_message_json, get_request_tracker
from agentrt.services.ledger._contents import JsonBody, RunBodies
from tests.factories import listening
from tests.services.budgets.helpers import give_budget

QUESTION = 'Find me cardiologists in Seattle who accept Medicare'
_ADAPTER: TypeAdapter[ModelMessage] = TypeAdapter(ModelMessage)


def _fresh(message: ModelMessage) -> str:
    return _ADAPTER.dump_json(message).decode()


def _sent(*parts: Any, **fields: Any) -> ModelRequest:
    """A request as pydantic-ai sends it (stamped), its body taken by the ledger."""
    request = ModelRequest(parts=list(parts), run_id='run-1', conversation_id='conv-1', **fields)
    request.timestamp = datetime.now(UTC)
    RunBodies().prompt('be brief', [request])
    return request


def test_a_request_the_ledger_dumped_is_saved_from_that_very_text() -> None:
    request = _sent(UserPromptPart('hello'), ToolReturnPart('lookup', {'n': 1, 'x': 'caf\u00e9'}, tool_call_id='c1'))
    known = dumped_message_json(request)
    assert known is not None and known == _fresh(request)
    assert message_json(request) is known


@pytest.mark.parametrize(
    'change',
    [
        'run_id',
        'conversation_id',
        'timestamp',
        'instructions',
        'metadata',
        'state',
        'part appended',
        'parts replaced',
        'part replaced in place',
    ],
)
def test_a_request_changed_after_it_was_sent_is_dumped_again(change: str) -> None:
    request = _sent(UserPromptPart('hello'), ToolReturnPart('lookup', 'found', tool_call_id='c1'))
    if change == 'run_id':
        request.run_id = 'run-2'
    elif change == 'conversation_id':
        request.conversation_id = 'conv-2'
    elif change == 'timestamp':
        request.timestamp = datetime(2020, 1, 1, tzinfo=UTC)
    elif change == 'instructions':
        request.instructions = 'be thorough'
    elif change == 'metadata':
        request.metadata = {'k': 'v'}
    elif change == 'state':
        request.state = 'interrupted'  # type: ignore[assignment]
    elif change == 'part appended':
        request.parts.append(UserPromptPart('more'))  # type: ignore[attr-defined]
    elif change == 'parts replaced':
        request.parts = [UserPromptPart('hello'), ToolReturnPart('lookup', 'other', tool_call_id='c1')]
    else:
        request.parts[1] = replace(request.parts[1], content='other')  # type: ignore[index]
    assert dumped_message_json(request) is None
    assert message_json(request) == _fresh(request)


def _recorded_response() -> tuple[ModelResponse, RunBodies]:
    """A response as the ledger records it (not stamped yet), then stamped as `_append_response` does, then sealed."""
    response = ModelResponse(
        parts=[TextPart('hi'), ToolCallPart('lookup', {'n': 1}, tool_call_id='c1')],
        usage=RequestUsage(input_tokens=10, output_tokens=2, details={'reasoning_tokens': 1}),
        model_name='m',
        provider_details={'finish_reason': 'stop'},
    )
    bodies = RunBodies()
    body = bodies.response(response)
    assert not body.sealed and dumped_message_json(response) is None  # taken, not dumped yet
    response.run_id, response.conversation_id, response.model_id = 'run-1', 'conv-1', 'function:m'
    response.usage.cost = Decimal('0.5')  # `fill_response_cost`, in place
    bodies.seal()
    assert body.sealed
    return response, bodies


def test_a_response_is_dumped_once_stamped_and_saved_from_that_very_text() -> None:
    response, bodies = _recorded_response()
    known = dumped_message_json(response)
    assert known is not None and known == _fresh(response)
    assert '"run_id":"run-1"' in known and '"conversation_id":"conv-1"' in known and '"model_id":"function:m"' in known
    assert message_json(response) is known
    assert bodies.response(response).render() == (known, 0)  # the ledger stores that same text
    assert bodies.message(response).render() == (known, 0)  # and the next request's prompt resends it


@pytest.mark.parametrize(
    'change',
    [
        'run_id',
        'conversation_id',
        'model_id',
        'workspace_ref',
        'state',
        'finish_reason',
        'metadata',
        'timestamp',
        'cost in place',
        'usage details in place',
        'usage replaced',
        'provider details in place',
        'part appended',
        'part replaced in place',
    ],
)
def test_a_response_changed_after_it_was_sealed_is_dumped_again(change: str) -> None:
    response, _ = _recorded_response()
    if change == 'run_id':
        response.run_id = 'run-2'
    elif change == 'conversation_id':
        response.conversation_id = 'conv-2'
    elif change == 'model_id':
        response.model_id = 'function:other'
    elif change == 'workspace_ref':
        response.workspace_ref = WorkspaceRef(provider='local', id='ws-1')
    elif change == 'state':
        response.state = 'interrupted'
    elif change == 'finish_reason':
        response.finish_reason = 'length'
    elif change == 'metadata':
        response.metadata = {'k': 'v'}
    elif change == 'timestamp':
        response.timestamp = datetime(2020, 1, 1, tzinfo=UTC)
    elif change == 'cost in place':
        response.usage.cost = Decimal('0.7')
    elif change == 'usage details in place':
        response.usage.details['reasoning_tokens'] = 2
    elif change == 'usage replaced':
        response.usage = RequestUsage(input_tokens=10, output_tokens=2, details={'reasoning_tokens': 1})
    elif change == 'provider details in place':
        assert response.provider_details is not None
        response.provider_details['finish_reason'] = 'length'
    elif change == 'part appended':
        response.parts.append(TextPart('more'))  # type: ignore[attr-defined]
    else:
        response.parts[0] = TextPart('other')  # type: ignore[index]
    assert dumped_message_json(response) is None
    assert message_json(response) == _fresh(response)


def test_a_response_sealed_by_a_render_without_its_run_is_stored_as_it_was() -> None:
    """The tracker renders a record whose run never sealed it (its event loop went away): the response as it is."""
    response = ModelResponse(parts=[TextPart('hi')], model_name='m')
    body = RunBodies().response(response)
    response.run_id = 'run-1'
    text, _ = body.render()
    assert text == _fresh(response) and body.sealed and dumped_message_json(response) == text


def test_a_request_with_a_nul_is_stored_as_before() -> None:
    request = _sent(ToolReturnPart('lookup', 'a\x00b', tool_call_id='c1'))
    assert '\\u0000' in (dumped_message_json(request) or '')
    stored = message_json(request)
    assert '\\u0000' not in stored and stored == storable_json(message_adapter, request)


def test_a_request_with_a_lone_surrogate_is_stored_as_before() -> None:
    request = _sent(UserPromptPart('caf\ud800'))
    assert dumped_message_json(request) is None  # the ledger could not dump it to JSON text
    assert message_json(request) == storable_json(message_adapter, request)


def test_a_request_dumped_with_the_ledgers_fallback_is_not_shared() -> None:
    class Opaque:
        def __repr__(self) -> str:
            return 'opaque'

    request = _sent(ToolReturnPart('lookup', {'thing': Opaque()}, tool_call_id='c1'))
    assert dumped_message_json(request) is None
    with pytest.raises(ValueError):  # the store never stored such a value, and still does not
        message_json(request)


def _message_texts(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(v, str) and v.startswith('{"parts":') for v in value)
    )


@contextmanager
def _saved_bodies() -> Iterator[list[list[str]]]:
    """The `messages` array of every save statement, as sent to the driver."""
    saves: list[list[str]] = []

    def on_statement(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if 'INSERT INTO conversation_entries' in statement:
            values = parameters.values() if isinstance(parameters, dict) else parameters
            saves.extend(value for value in values if _message_texts(value))

    with listening(('before_cursor_execute', on_statement)):
        yield saves


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_saved_turn_stores_exactly_a_fresh_dump_of_each_message(
    demo_data: None, monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    appended: list[list[ModelMessage]] = []
    append = PostgresConversationStore.append

    async def spy(self: PostgresConversationStore, record: Any, messages: Any, **kwargs: Any) -> Any:
        appended.append(list(messages))
        return await append(self, record, messages, **kwargs)

    monkeypatch.setattr(PostgresConversationStore, 'append', spy)
    with _saved_bodies() as saves:
        for _ in range(2):
            if streamed:
                assert [
                    delta
                    async for delta in simple_chat_stream(QUESTION, session_id='shared-dumps', account='acme-health')
                ]
            else:
                await simple_chat(QUESTION, session_id='shared-dumps', account='acme-health')
    await get_request_tracker().flush()
    await get_supervisor().join()
    assert len(appended) == len(saves) == 2
    for messages, bodies in zip(appended, saves, strict=True):
        assert len(messages) == len(bodies) == 6  # the prompt, 2 tool results, 3 responses
        assert bodies == [_fresh(message) for message in messages]  # byte for byte, after every stamp
        # One dump per message: requests from their sending, responses once stamped, each shared with the ledger.
        assert all(bodies[i] is dumped_message_json(message) for i, message in enumerate(messages))
        for message in messages:
            assert message.run_id is not None and message.conversation_id == 'shared-dumps'
            if isinstance(message, ModelResponse):
                assert message.model_id is not None and f'"model_id":"{message.model_id}"' in _fresh(message)
    # The ledger stored the same messages, in full (the demo turn holds no secret), responses with their stamps.
    async with get_db_session(account=Unscoped.ADMIN) as session:
        stored = (
            await session.execute(
                text(
                    'SELECT r.run_id, c.kind, c.body FROM llm_request_contents c JOIN llm_requests r '
                    "ON r.id = c.request_id WHERE r.conversation_id = 'shared-dumps' ORDER BY r.started_at, c.kind"
                )
            )
        ).all()
    prompts = [body for _, kind, body in stored if kind == 'prompt']
    responses = [(run_id, body) for run_id, kind, body in stored if kind == 'response']
    assert len(prompts) == len(responses) == 6
    saved = [message for turn in appended for message in turn if isinstance(message, ModelResponse)]
    assert [body for _, body in responses] == [_fresh(response) for response in saved]
    for (run_id, body), response in zip(responses, saved, strict=True):
        assert response.run_id == run_id and f'"run_id":"{run_id}"' in body
        assert '"conversation_id":"shared-dumps"' in body and f'"model_id":"{response.model_id}"' in body
    last = appended[-1]
    for i in range(5):  # the last request resent the turn's messages as they were saved
        assert _fresh(last[i]) in prompts[-1]


def test_a_later_run_that_resends_a_request_dumps_it_again_for_its_own_bodies() -> None:
    request = _sent(UserPromptPart('hello'))
    first = dumped_message_json(request)
    body = RunBodies().message(request)  # a new run: its own dump, not the text kept for the store
    assert isinstance(body, JsonBody) and body._text is not first and body._text == first


@pytest.mark.parametrize('where', ['start', 'after a newline', 'after a tab', 'in a tool result', 'at the end'])
def test_the_ledger_redacts_its_copy_and_the_store_keeps_the_message_as_it_is(where: str) -> None:
    secret = 'ghp_0123456789abcdefghijABCDEFGHIJklmnop'
    content = {
        'start': f'{secret} is mine',
        'after a newline': f'key:\n{secret}',
        'after a tab': f'key\t{secret}',
        'in a tool result': {'config': f'token:\n{secret}'},
        'at the end': f'the key is {secret}',
    }[where]
    request = ModelRequest(parts=[ToolReturnPart('lookup', content, tool_call_id='c1')], run_id='run-1')
    prompt = RunBodies().prompt('be brief', [request])
    text, redactions = prompt.render()
    assert redactions == 1 and secret not in text  # what the ledger stores
    assert message_json(request) == _fresh(request) and secret in message_json(request)  # what the store stores
    assert dumped_message_json(request) == _fresh(request)  # shared: the text before redaction


def test_the_ledger_redacts_its_copy_of_a_response_and_the_store_keeps_it_as_it_is() -> None:
    secret = 'ghp_0123456789abcdefghijABCDEFGHIJklmnop'
    response = ModelResponse(parts=[TextPart(f'the key is\n{secret}')], model_name='m')
    bodies = RunBodies()
    body = bodies.response(response)
    response.run_id = 'run-1'
    bodies.seal()
    text, redactions = body.render()
    assert redactions == 1 and secret not in text and '"run_id":"run-1"' in text  # what the ledger stores
    assert message_json(response) == _fresh(response) and secret in message_json(response)  # what the store stores


def _priced_demo_model() -> FunctionModel:
    """The demo planner named `gpt-4o-mini`, so genai-prices prices it and a budget holds each of its requests."""

    async def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        move = next_response(messages, info)
        return ModelResponse(parts=[TextPart(move)] if isinstance(move, str) else list(move))

    return FunctionModel(respond, model_name='gpt-4o-mini')


class _CountingAdapter:
    """A message adapter that counts `dump_json` calls by message identity (and delegates everything)."""

    def __init__(self, adapter: TypeAdapter[ModelMessage], counts: Counter[int]) -> None:
        self._adapter, self._counts = adapter, counts

    def dump_json(self, message: Any, **kwargs: Any) -> bytes:
        self._counts[id(message)] += 1
        return self._adapter.dump_json(message, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)


async def test_with_a_budget_each_message_of_a_turn_is_dumped_once_for_its_hold_and_its_bodies(
    demo_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The budget bounds each request's input by the JSON size of what it sends, and the ledger stores the same JSON:
    # a message loaded with the conversation is measured by its stored text, a new one dumped once for both.
    await give_budget('acme-health', '100')
    model = _priced_demo_model()
    await simple_chat(QUESTION, session_id='budget-dumps', account='acme-health', model=model)
    counts: Counter[int] = Counter()
    for module in (budget_estimate, ledger_contents):
        monkeypatch.setattr(module, 'message_adapter', _CountingAdapter(module.message_adapter, counts))
    await simple_chat(QUESTION, session_id='budget-dumps', account='acme-health', model=model)
    await get_request_tracker().flush()
    await get_supervisor().join()
    # The turn's 6 new messages (its prompt, 2 tool results, 3 responses), each once; none of the 6 it loaded.
    assert sorted(counts.values()) == [1] * 6, counts
    async with get_db_session(account=Unscoped.ADMIN) as session:
        held = (
            await session.execute(
                text("SELECT count(*) FROM llm_requests WHERE conversation_id = 'budget-dumps' AND status = 'complete'")
            )
        ).scalar_one()
        spent = (
            await session.execute(
                text(
                    'SELECT p.spent_usd FROM budget_periods p JOIN accounts a ON a.id = p.account_id '
                    "WHERE a.slug = 'acme-health'"
                )
            )
        ).scalar_one()
    assert held == 6 and spent > 0, (held, spent)  # both turns' requests were held, sent, billed
