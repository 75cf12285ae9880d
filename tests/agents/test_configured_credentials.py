"""The runtime's own provider key, whatever its shape, is never stored or shown: a provider's error that echoes it
(`Incorrect API key provided: vllm-local-...`, as OpenAI and many compatible servers answer a key they refuse) through
`simple_chat` and `agentrt chat`, with the key in `OPENAI_API_KEY` (QA: a key without a known shape was stored in
`llm_requests.error_message`, the stored error body, the CLI's `error:` line and the server's log)."""

from __future__ import annotations

import logging

import pytest
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models.function import AgentInfo, FunctionModel
from sqlalchemy import text

from agentrt.agents.simple_chat import simple_chat
from agentrt.db.errors import AgentRuntimeError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger.redaction import REDACTED
from tests.agents.cli.helpers import invoke
from tests.fake_openai import FakeOpenAI, Reply

KEY = 'vllm-local-9f8e7d6c5b4a3210ffee'  # no rule knows this shape: only the configured value finds it
ECHO = f'Incorrect API key provided: {KEY}. You can find your API key at https://platform.openai.com/account/api-keys.'


async def _rows(session_id: str) -> list[dict[str, object]]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = await session.execute(
            text(
                'SELECT r.status, r.error_message, c.kind, c.body FROM llm_requests r '
                'LEFT JOIN llm_request_contents c ON c.request_id = r.id WHERE r.chat_session_id = :s ORDER BY c.kind'
            ),
            {'s': session_id},
        )
        return [dict(row._mapping) for row in rows]


def _echoing_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    raise ModelHTTPError(401, 'gpt-4o-mini', body={'error': {'message': ECHO, 'code': 'invalid_api_key'}})


async def test_a_provider_error_echoing_the_configured_key_is_stored_and_raised_redacted(
    demo_data: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv('OPENAI_API_KEY', KEY)
    with caplog.at_level(logging.DEBUG), pytest.raises(AgentRuntimeError) as raised:
        await simple_chat('hi', session_id='echoed-key', account='acme-health', model=FunctionModel(_echoing_model))
    assert KEY not in str(raised.value) and KEY not in caplog.text
    rows = await _rows('echoed-key')
    assert [row['kind'] for row in rows] == ['error', 'prompt']
    error_message, error_body = rows[0]['error_message'], rows[0]['body']
    assert isinstance(error_message, str) and isinstance(error_body, str)
    assert KEY not in error_message and f'Incorrect API key provided: {REDACTED}' in error_message
    assert KEY not in error_body and f'Incorrect API key provided: {REDACTED}' in error_body


@pytest.mark.usefixtures('allow_loopback_model_requests')
async def test_agentrt_chat_shows_and_stores_an_echoed_key_redacted(demo_data: None, database_url: str) -> None:
    reply = Reply(status=401, error_body={'error': {'message': ECHO, 'code': 'invalid_api_key'}})
    with FakeOpenAI(lambda body: reply).running() as fake:
        env = {
            'DATABASE_URL': database_url,
            'OPENAI_BASE_URL': fake.base_url,
            'OPENAI_API_KEY': KEY,
        }
        done = await invoke('chat', '-m', 'openai-chat:gpt-4o-mini', '--session', 'echoed-key-cli', 'hi', env=env)
    assert done.exit_code == 6, done.stderr
    assert KEY not in done.stdout + done.stderr
    assert f'Incorrect API key provided: {REDACTED}' in done.stderr, done.stderr
    rows = await _rows('echoed-key-cli')
    assert rows and all(KEY not in str(row['error_message']) + str(row['body']) for row in rows)
    assert REDACTED in str(rows[0]['error_message'])
