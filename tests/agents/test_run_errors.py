"""Provider failures on both paths: the ledger row and the error a caller sees, plain and streamed, on both APIs.

The loopback OpenAI-compatible server injects the failures seen behind real providers and proxies: HTTP 500 and
429, a connection dropped mid-answer and a corrupt chunk. `simple_chat` and `simple_chat_stream` must record the
same ledger outcome for the same failure and raise the same `ModelProviderError`.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
from openai import AsyncOpenAI
from pydantic_ai import ModelResponse, ToolCallPart
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models import Model
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agentrt.agents.errors import ModelBehaviorError, ModelProviderError
from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
from agentrt.db.engine import pool_status
from agentrt.services.conversations import PostgresConversationStore
from tests.agents.conftest import account_id, loopback_model
from tests.factories import content_rows, ledger_rows
from tests.fake_openai import FakeOpenAI, Reply

SECRET = 'sk-proj-PLANTEDsecretvalue0123456789abcdef'
TEXT = 'Nobody in Seattle matches.'

FAULTS = {
    '500': Reply(status=500, error=f'upstream exploded (key {SECRET})'),
    '429': Reply(status=429, error='Rate limit reached for requests'),
    # After a few text deltas (Chat: role, 4 deltas; Responses: created, item, part, 2 deltas).
    'dropped': Reply(text=TEXT, chunks=4, fault='drop', fault_after=5),
    'corrupt': Reply(text=TEXT, chunks=4, fault='corrupt', fault_after=5),
}
EXPECTED = {  # error type, status code, the words the caller's message has
    '500': ('ModelServerError', 500, 'HTTP 500'),
    '429': ('ModelRateLimitError', 429, 'Rate limited'),
    'dropped': ('ModelConnectionError', None, 'connection to the provider'),
    'corrupt': ('ModelAPIError', None, 'could not be used'),
}


pytestmark = pytest.mark.usefixtures('allow_loopback_model_requests')  # only ever to the loopback server


async def _turn(streamed: bool, model: Model, session_id: str) -> None:
    if not streamed:
        await simple_chat('Who is in Seattle?', session_id=session_id, account='acme-health', model=model)
        return
    async with simple_chat_stream(
        'Who is in Seattle?', session_id=session_id, account='acme-health', model=model
    ) as stream:
        async for _ in stream:
            pass


def _outcome(row: dict[str, Any]) -> tuple[Any, ...]:
    usage = (row['input_tokens'], row['output_tokens'], row['usage_reported'], row['total_cost'], row['price_source'])
    return (row['status'], row['success'], row['error_type'], row['error_status_code'], *usage)


@pytest.mark.parametrize('api', ['chat', 'responses'])
@pytest.mark.parametrize('fault', list(FAULTS))
async def test_a_failure_is_recorded_and_raised_alike_on_both_paths(
    demo_data: None, clients: list[AsyncOpenAI], api: str, fault: str
) -> None:
    error_type, status_code, words = EXPECTED[fault]
    outcomes, messages = {}, {}
    with FakeOpenAI(lambda body: copy.deepcopy(FAULTS[fault])).running() as fake:
        for streamed in (False, True):
            session_id = f'{api}-{fault}-{streamed}'
            with pytest.raises(ModelProviderError) as raised:
                await _turn(streamed, loopback_model(api, fake, clients), session_id)
            [row] = await ledger_rows(chat_session_id=session_id)
            assert row['streamed'] is streamed
            outcomes[streamed], messages[streamed] = _outcome(row), str(raised.value)
            assert raised.value.status_code == status_code and raised.value.model_name == 'gpt-4o-mini'
            error = {c['kind']: c for c in await content_rows(row['id'])}['error']['body']
            assert SECRET not in error and SECRET not in (row['error_message'] or '')
            assert SECRET not in str(raised.value) and SECRET not in (raised.value.body or '')
            # Nothing of the failed turn was saved.
            store = PostgresConversationStore(await account_id('acme-health'))
            assert await store.read_record(session_id) is None
    assert outcomes[False] == outcomes[True]
    # Never a cancellation, never a measured zero: no usage was reported, so none is claimed.
    assert outcomes[True] == ('error', False, error_type, status_code, 0, 0, False, None, 'unmeasured')
    # The same message, but for the JSON decoder's detail of where each corrupt answer broke.
    assert messages[False].split(' (')[0] == messages[True].split(' (')[0]
    assert words in messages[True] and 'the turn was not saved' in messages[True]
    assert '\n' not in messages[True]
    assert pool_status().checked_out == 0


@pytest.mark.parametrize('api', ['chat', 'responses'])
async def test_a_cut_stream_keeps_what_was_streamed_as_the_response(
    demo_data: None, clients: list[AsyncOpenAI], api: str
) -> None:
    with FakeOpenAI(lambda body: copy.deepcopy(FAULTS['dropped'])).running() as fake:
        with pytest.raises(ModelProviderError):
            await _turn(True, loopback_model(api, fake, clients), 'cut')
    [row] = await ledger_rows(chat_session_id='cut')
    response = {c['kind']: c for c in await content_rows(row['id'])}['response']['body']
    assert TEXT[:6] in response  # the text received before the cut


async def test_usage_reported_before_a_cut_is_kept_and_priced(demo_data: None, clients: list[AsyncOpenAI]) -> None:
    # A proxy that cuts after the usage chunk: the provider measured the request, so the row is billed.
    cut_after_usage = Reply(text=TEXT, chunks=2, prompt_tokens=92, completion_tokens=22)
    cut_after_usage.fault, cut_after_usage.fault_after, cut_after_usage.usage_before_fault = 'drop', 4, True
    with FakeOpenAI(lambda body: copy.deepcopy(cut_after_usage)).running() as fake:
        with pytest.raises(ModelProviderError):
            await _turn(True, loopback_model('chat', fake, clients), 'usage-then-cut')
    [row] = await ledger_rows(chat_session_id='usage-then-cut')
    assert (row['status'], row['error_type']) == ('error', 'ModelConnectionError')
    assert (row['input_tokens'], row['output_tokens'], row['usage_reported']) == (92, 22, True)
    assert row['total_cost'] is not None and row['total_cost'] > 0


async def test_a_stream_cut_after_its_finish_reason_keeps_it(demo_data: None, clients: list[AsyncOpenAI]) -> None:
    # The whole answer came (its finish reason included) and the connection dropped before the usage chunk: the row
    # is the run's error, unmeasured, and its finish reason was dropped with the usage (NULL although 'stop' came; QA).
    cut_before_usage = Reply(text=TEXT, chunks=2)
    cut_before_usage.fault, cut_before_usage.fault_after = 'drop', 4  # role, two text chunks, the finish reason
    with FakeOpenAI(lambda body: copy.deepcopy(cut_before_usage)).running() as fake:
        with contextlib.suppress(ModelProviderError):
            await _turn(True, loopback_model('chat', fake, clients), 'finished-then-cut')
    [row] = await ledger_rows(chat_session_id='finished-then-cut')
    assert (row['status'], row['usage_reported'], row['finish_reason']) == ('error', False, 'stop'), row


@pytest.mark.parametrize('usage', ['abc', [1, 2]], ids=['text', 'list'])
@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_usage_that_is_no_object_is_a_provider_error_not_an_internal_one(
    demo_data: None, clients: list[AsyncOpenAI], streamed: bool, usage: object
) -> None:
    # pydantic-ai's streamed usage mapping raised AttributeError ("'str' object has no attribute 'model_dump'"):
    # CLI exit 70, HTTP 500 with a traceback; the plain request's SDK already refused the body (QA).
    session_id = f'usage-{type(usage).__name__}-{streamed}'
    with FakeOpenAI(lambda body: Reply(text=TEXT, usage_sent=usage)).running() as fake:
        with pytest.raises(ModelProviderError) as raised:
            await _turn(streamed, loopback_model('chat', fake, clients), session_id)
    assert 'the turn was not saved' in str(raised.value) and '\n' not in str(raised.value)
    assert raised.value.model_name == 'gpt-4o-mini'
    store = PostgresConversationStore(await account_id('acme-health'))
    assert await store.read_record(session_id) is None


async def test_a_model_functions_arguments_it_cannot_serialise_are_a_behavior_error_not_an_internal_one(
    demo_data: None,
) -> None:
    # pydantic-ai's usage estimate of a `FunctionModel` answer serialises dict arguments as JSON: a lone surrogate in
    # them ended the turn with pydantic's bare `PydanticSerializationError` (QA).
    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[ToolCallPart('search_directory', {'query': 'card\ud800io', 'schema_name': 'x'})])

    session_id = 'function-surrogate-arguments'
    with pytest.raises(ModelBehaviorError) as raised:
        await simple_chat('hi', session_id=session_id, account='acme-health', model=FunctionModel(respond))
    message = str(raised.value)
    assert message.startswith('the model function answered with text that cannot be encoded as JSON')
    assert 'surrogates not allowed' in message and 'the turn was not saved' in message and '\n' not in message
    store = PostgresConversationStore(await account_id('acme-health'))
    assert await store.read_record(session_id) is None
