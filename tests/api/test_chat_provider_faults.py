"""A real provider's faults through the HTTP API's three chat routes: the JSON turn, the Vercel AI data stream and
AG-UI, from the loopback OpenAI-compatible server. The client reads what it can do about it (never the provider's text
or a secret), the ledger has the request once, nothing of the turn is saved, and the conversation's next turn runs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
from openai import AsyncOpenAI
from pydantic_ai.exceptions import UsageLimitUnavailableWarning
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from agentrt.api.app import create_app
from tests.api.conftest import Keys, auth, chat_body, of_type, sse_events
from tests.factories import ledger_rows, scalar
from tests.fake_openai import FakeOpenAI, Faulty, Reply, as_unusable_answer

SECRET = 'sk-proj-PLANTEDsecretvalue0123456789abcdef'

FAULTS = {
    'bad key': Reply(
        status=401,
        error_body={'error': {'message': f'Incorrect API key provided: {SECRET}', 'code': 'invalid_api_key'}},
    ),
    '429 retry-after': Reply(status=429, error=f'Rate limit reached for {SECRET}', headers={'retry-after': '7'}),
    # Fractional seconds, which pydantic-ai does not read and OpenAI-compatible servers send: it was dropped (QA).
    '429 half a second': Reply(status=429, error='Rate limit reached', headers={'retry-after': '0.5'}),
    'html page': Reply(raw_body=f'<html><body>proxy error {SECRET}</body></html>'.encode(), content_type='text/html'),
    'cut': Reply(text='Nobody in Seattle matches.', chunks=4, fault='drop', fault_after=3),
    'stall': Reply(text='Nobody in Seattle matches.', chunks=4, fault='stall', fault_after=3),
}
# What the client reads (the JSON turn's `type` and words of every route's message) and the ledger's row.
EXPECTED = {
    'bad key': (
        'model_provider_error',
        "refused this server's credentials (HTTP 401); the server's operator must fix its key",
        ('error', 'ModelAuthenticationError', 401),
    ),
    '429 retry-after': (
        'model_provider_error',
        'rate limiting this server (HTTP 429); try again in 7 s',
        ('error', 'ModelRateLimitError', 429),
    ),
    '429 half a second': (
        'model_provider_error',
        'rate limiting this server (HTTP 429); try again in 1 s',
        ('error', 'ModelRateLimitError', 429),
    ),
    'html page': (
        'model_provider_error',
        'the model provider failed; try again shortly',
        ('error', 'UnexpectedModelBehavior', None),
    ),
    'cut': (
        'model_provider_error',
        'the model provider failed; try again shortly',
        ('error', 'ModelConnectionError', None),
    ),
    'stall': (
        'model_provider_error',
        'did not answer in time; try again shortly',
        ('error', 'ModelTimeoutError', None),
    ),
}


pytestmark = pytest.mark.usefixtures('allow_loopback_model_requests')  # only ever to the loopback server


async def _client(fake: FakeOpenAI, read_timeout_s: float = 30) -> AsyncIterator[httpx2.AsyncClient]:
    # A stalled answer fails after `read_timeout_s`; the other answers get time enough on a loaded machine.
    openai_client = AsyncOpenAI(base_url=fake.base_url, api_key='sk-test', max_retries=0, timeout=read_timeout_s)
    model = OpenAIChatModel('gpt-4o-mini', provider=OpenAIProvider(openai_client=openai_client))
    transport = httpx2.ASGITransport(app=create_app(manage_runtime=False, model=model), raise_app_exceptions=False)
    async with httpx2.AsyncClient(transport=transport, base_url='http://test', timeout=30) as client:
        yield client
    await openai_client.close()


def _ag_ui(thread: str, text: str) -> dict[str, Any]:
    message = {'id': 'u1', 'role': 'user', 'content': text}
    return {'threadId': thread, 'runId': 'r1', 'messages': [message], 'tools': [], 'context': []}


@pytest.mark.parametrize('fault', list(FAULTS))
async def test_a_provider_fault_on_each_chat_route_says_what_to_do_and_leaves_the_conversation_free(
    keys: Keys, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    type_, words, row = EXPECTED[fault]
    script = Faulty(FAULTS[fault])
    name = fault.replace(' ', '-')
    with FakeOpenAI(script).running() as fake, caplog.at_level(logging.INFO, logger='agentrt'):
        async for client in _client(fake, 0.5 if fault == 'stall' else 30):
            plain = await client.post(
                f'/api/v1/conversations/json-{name}/turns', json={'message': 'hi'}, headers=auth(keys.acme)
            )
            vercel = await client.post('/api/v1/chat', json=chat_body(f'vercel-{name}', 'hi'), headers=auth(keys.acme))
            agui = await client.post('/api/v1/chat/ag-ui', json=_ag_ui(f'agui-{name}', 'hi'), headers=auth(keys.acme))
            assert plain.status_code == 502 and plain.json()['type'] == type_, plain.text
            assert words in plain.json()['detail'], plain.text
            # The wait the provider asked for is a header too, as the 409's and 503's are (it was only in the text).
            waits = {'429 retry-after': '7', '429 half a second': '1'}
            assert plain.headers.get('retry-after') == waits.get(fault), plain.headers
            [error] = of_type(sse_events(vercel.text), 'error')
            assert words in error['errorText'] and 'error id err_' in error['errorText']
            [run_error] = of_type(sse_events(agui.text), 'RUN_ERROR')
            assert words in run_error['message']
            for shown in (
                plain.text,
                vercel.text,
                agui.text,
                *(r.getMessage() + (r.exc_text or '') for r in caplog.records),
            ):
                assert SECRET not in shown
            # The log line of each route's error names the model the server asked for (a stream's error named the
            # version the stream reported, gpt-4o-mini-2024-07-18; an unusable streamed answer, None).
            logged = [r.getMessage() for r in caplog.records if 'ModelProviderError' in r.getMessage()]
            assert len(logged) == 3 and all("model 'gpt-4o-mini'" in line for line in logged), logged
            # One WARNING line each: the provider's failure is no bug of the server's, no traceback of its code.
            provider_lines = [r for r in caplog.records if 'ModelProviderError' in r.getMessage()]
            assert all(r.levelno == logging.WARNING and not r.exc_info for r in provider_lines), provider_lines
            for conversation in (f'json-{name}', f'vercel-{name}', f'agui-{name}'):
                rows = [
                    (r['status'], as_unusable_answer(r['error_type']), r['error_status_code'])
                    for r in await ledger_rows(chat_session_id=conversation)
                ]
                assert rows == [row], conversation
                assert (
                    await scalar('SELECT count(*) FROM conversations WHERE conversation_id = :c', c=conversation) == 0
                )
                assert (
                    await scalar('SELECT count(*) FROM conversation_turns WHERE conversation_id = :c', c=conversation)
                    == 0
                )
            # The next turn on each conversation runs: nothing was left claimed.
            script.healed = True
            plain = await client.post(
                f'/api/v1/conversations/json-{name}/turns', json={'message': 'again'}, headers=auth(keys.acme)
            )
            assert plain.status_code == 200 and plain.json()['output'] == 'Nobody matches.'
            vercel = await client.post(
                '/api/v1/chat', json=chat_body(f'vercel-{name}', 'again', 'm2'), headers=auth(keys.acme)
            )
            assert of_type(sse_events(vercel.text), 'finish')[-1]['finishReason'] == 'stop'
            agui = await client.post(
                '/api/v1/chat/ag-ui', json=_ag_ui(f'agui-{name}', 'again'), headers=auth(keys.acme)
            )
            assert of_type(sse_events(agui.text), 'RUN_FINISHED')


@pytest.mark.parametrize('cut_off', ['length', None])
async def test_a_json_turn_says_why_its_answer_ended(keys: Keys, cut_off: str | None) -> None:
    # A text answer cut off at its output token limit is saved as it is; the JSON turn said nothing of it (the Vercel
    # stream's finish event says `length`).
    with FakeOpenAI(lambda body: Reply(text='The cardiologists are Dr', cut_off=cut_off)).running() as fake:  # type: ignore[arg-type]
        async for client in _client(fake):
            answer = await client.post(
                f'/api/v1/conversations/cut-{cut_off}/turns', json={'message': 'hi'}, headers=auth(keys.acme)
            )
    assert answer.status_code == 200, answer.text
    assert (answer.json()['output'], answer.json()['finish_reason']) == ('The cardiologists are Dr', cut_off or 'stop')


async def test_a_json_turn_says_which_requests_reported_no_usage(keys: Keys) -> None:
    # A provider that reports no usage read as a measured 0 tokens in the JSON turn's `usage`, where `agentrt chat`
    # says "tokens unknown" and the ledger `usage_reported = false` (QA).
    with FakeOpenAI(lambda body: Reply(text='Nobody in Seattle matches.', reports_usage=False)).running() as fake:
        async for client in _client(fake):
            with pytest.warns(UsageLimitUnavailableWarning):  # pydantic-ai's, for a response without usage
                response = await client.post(
                    '/api/v1/conversations/no-usage/turns', json={'message': 'hi'}, headers=auth(keys.acme)
                )
    assert response.status_code == 200, response.text
    usage = response.json()['usage']
    assert usage['requests'] == 1 and usage['unmeasured_requests'] == 1, usage
