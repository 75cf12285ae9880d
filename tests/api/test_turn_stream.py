"""A streamed turn over HTTP (`api/turn_stream.py`) while nothing happens: a slow tool gets `: keepalive` comments
(`AGENTRT_HTTP_STREAM_KEEPALIVE_SECONDS`), which an SSE parser skips; the events, the end and the errors stay as
they were."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx2
import pytest
from openai._streaming import SSEDecoder  # a parser that follows the SSE specification (comments are skipped)
from pydantic_ai import FunctionToolset
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from sqlalchemy import text

from agentrt.agents.simple_chat import create_simple_chat_agent
from agentrt.api.app import create_app
from agentrt.db.engine import current_settings
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import get_request_tracker
from tests.api.conftest import Keys, agui_body, auth, chat_body, chat_scope, serve
from tests.factories import ledger_rows

KEEPALIVE = ': keepalive'
released = asyncio.Event()


async def slow_lookup(fail: bool) -> str:
    """A tool that runs until the test has seen a keepalive (at most 30 s)."""
    await asyncio.wait_for(released.wait(), 30)
    if fail:
        raise RuntimeError('the lookup broke')
    return 'found it'


def _model() -> FunctionModel:
    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart('unused')])

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        if any(isinstance(part, ToolReturnPart) for part in messages[-1].parts):
            yield 'the answer'
            return
        fail = 'fail' in str(messages[-1])
        yield {0: DeltaToolCall('slow_lookup', json.dumps({'fail': fail}), tool_call_id='slow-1')}

    return FunctionModel(respond, stream_function=stream, model_name='slow')


@pytest.mark.parametrize(
    ('path', 'body', 'last'),
    [
        ('/api/v1/chat', chat_body('slow-vercel', 'look it up'), 'finish'),
        ('/api/v1/chat/ag-ui', agui_body('slow-agui', 'look it up'), 'RUN_FINISHED'),
        ('/api/v1/chat', chat_body('slow-fail', 'look it up and fail'), 'finish'),
        ('/api/v1/chat/ag-ui', agui_body('slow-agui-fail', 'look it up and fail'), 'RUN_ERROR'),
    ],
)
async def test_a_slow_tool_gets_keepalive_comments_that_parsers_skip(
    keys: Keys, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, object], last: str
) -> None:
    monkeypatch.setattr(current_settings(), 'http_stream_keepalive_seconds', 0.05)
    released.clear()
    agent = create_simple_chat_agent(toolsets=[FunctionToolset([slow_lookup])])
    app = create_app(manage_runtime=False, agent=agent, model=_model())
    raw = b''
    async for url in serve(app):
        async with (
            httpx2.AsyncClient(base_url=url, timeout=30) as client,
            client.stream('POST', path, json=body, headers=auth(keys.acme)) as response,
        ):
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                raw += chunk
                if KEEPALIVE.encode() in raw:
                    released.set()  # the tool was seen running with the connection kept alive: let it end
    text = raw.decode()
    blocks = [block for block in text.split('\n\n') if block]
    # Each keepalive is a whole comment between whole events, never inside one.
    assert all(block.startswith('data: ') or block == KEEPALIVE for block in blocks), blocks
    kept = [n for n, block in enumerate(blocks) if block == KEEPALIVE]
    assert kept and kept[0] > 0
    data = [block[len('data: ') :] for block in blocks if block != KEEPALIVE]
    # A parser that follows the specification sees the events alone, as they were without keepalives.
    assert [event.data for event in SSEDecoder().iter_bytes(iter([raw]))] == data
    kinds = [json.loads(item)['type'] for item in data if item != '[DONE]']
    assert kinds[-1] == last, kinds
    if 'fail' in str(body):
        assert 'error' in kinds or 'RUN_ERROR' in kinds
    else:
        assert 'error' not in kinds and 'RUN_ERROR' not in kinds
    if path == '/api/v1/chat':
        assert data[-1] == '[DONE]'


async def test_no_keepalive_when_it_is_off(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(current_settings(), 'http_stream_keepalive_seconds', 0)
    released.set()  # the tool ends at once: a run with keepalives off sends only its events
    agent = create_simple_chat_agent(toolsets=[FunctionToolset([slow_lookup])])
    app = create_app(manage_runtime=False, agent=agent, model=_model())
    async for url in serve(app):
        async with httpx2.AsyncClient(base_url=url, timeout=30) as client:
            response = await client.post('/api/v1/chat', json=chat_body('quick', 'look it up'), headers=auth(keys.acme))
    assert response.status_code == 200 and KEEPALIVE not in response.text and 'data: [DONE]' in response.text


def _texting_model() -> FunctionModel:
    """A model that streams its answer a word at a time, slowly: the turn is mid-answer for as long as a test likes."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart('unused')])

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        for _ in range(600):
            yield 'word '
            await asyncio.sleep(0.05)

    return FunctionModel(respond, stream_function=stream, model_name='slow')


@pytest.mark.parametrize('keepalive', [0, 0.01])
async def test_a_stream_cancelled_while_it_waits_in_send_stops_its_run_before_its_claim_is_released(
    keys: Keys, monkeypatch: pytest.MonkeyPatch, keepalive: float
) -> None:
    # A cancellation (the shutdown's, a client gone) that landed in `send` (a slow client; the keepalive's lock) left
    # the stream's generators suspended: the run went on in its own task, blocked on an event nobody pulled, and the
    # claim was released with it still running; a stopping server then closed the ledger with the cut-off request
    # never handed to it (seen once under load: no ledger row, "aclose(): asynchronous generator is already running").
    monkeypatch.setattr(current_settings(), 'http_stream_keepalive_seconds', keepalive)
    app = create_app(manage_runtime=False, model=_texting_model())
    conversation = f'cut-in-send-{keepalive}'
    body = json.dumps(chat_body(conversation, 'tell me a long story')).encode()
    scope = chat_scope(keys.acme, body, spec_version='2.4')
    sent = [{'type': 'http.request', 'body': body, 'more_body': False}]
    gone = asyncio.Event()
    answering = asyncio.Event()

    async def receive() -> dict[str, object]:
        if sent:
            return sent.pop()
        await gone.wait()
        return {'type': 'http.disconnect'}

    async def send(message: dict[str, object]) -> None:
        if b'text-delta' in message.get('body', b''):  # type: ignore[operator]
            answering.set()
            await asyncio.Event().wait()  # a client that reads no more: the response waits here

    request = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(answering.wait(), 30)
    request.cancel()  # as uvicorn does at the end of its shutdown's grace, or when the client has gone
    await asyncio.gather(request, return_exceptions=True)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        claims = (await session.execute(text('SELECT count(*) FROM conversation_turns'))).scalar_one()
    await get_request_tracker().flush()  # what a stopping server does once no claim is held
    assert claims == 0
    assert [row['status'] for row in await ledger_rows(chat_session_id=conversation)] == ['cancelled']
    gone.set()
