"""The runtime's bounds on a provider, for models built from a model string (`AGENTRT_MODEL_TIMEOUT_SECONDS`,
`AGENTRT_MODEL_MAX_RETRIES`): a provider that stalls ends as the documented timeout, plain and streamed, leaving the
conversation free; the SDK repeats nothing behind the ledger's back; a `Model` or settings a caller passed are left
alone. The model strings reach the loopback server through `OPENAI_BASE_URL`, as a real deployment's would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from pydantic_ai import Agent
from pydantic_ai.models import Model
from pydantic_ai.models.function import FunctionModel
from pydantic_ai.settings import ModelSettings

from agentrt.agents.errors import ModelProviderError
from agentrt.agents.model_resolution import resolve_model, with_provider_bounds
from agentrt.agents.simple_chat import ChatResult, create_simple_chat_agent, simple_chat, simple_chat_stream
from agentrt.db.engine import current_settings, init_database, pool_status
from agentrt.db.errors import ConfigError
from agentrt.services.conversations import PostgresConversationStore
from agentrt.tools.dependencies import SessionDependencies
from tests.agents.conftest import account_id
from tests.factories import ledger_rows, scalar
from tests.fake_openai import FakeOpenAI, Faulty, Reply

STALL = {
    False: Reply(text='Nobody in Seattle matches.', fault='stall'),  # the head, then no body
    True: Reply(text='Nobody in Seattle matches.', chunks=4, fault='stall', fault_after=3),  # some chunks, then none
}


pytestmark = pytest.mark.usefixtures('allow_loopback_model_requests')  # only ever to the loopback server


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeOpenAI, Faulty]]:
    """The loopback server, which `openai-chat:` and `openai:` model strings reach (`OPENAI_BASE_URL`)."""
    script = Faulty(Reply(text='Nobody matches.'))
    with FakeOpenAI(script).running() as fake:
        monkeypatch.setenv('OPENAI_BASE_URL', fake.base_url)
        monkeypatch.setenv('OPENAI_API_KEY', 'sk-test')
        yield fake, script


async def _turn(
    streamed: bool, model: str, session_id: str, message: str = 'Who is in Seattle?', **kw: Any
) -> ChatResult:
    if not streamed:
        return await simple_chat(message, session_id=session_id, account='acme-health', model=model, **kw)
    async with simple_chat_stream(message, session_id=session_id, account='acme-health', model=model, **kw) as stream:
        async for _ in stream:
            pass
    assert stream.result is not None
    return stream.result


@pytest.mark.parametrize('api', ['openai-chat', 'openai'])
@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_stalled_provider_ends_as_a_timeout_and_leaves_the_conversation_free(
    demo_data: None, monkeypatch: pytest.MonkeyPatch, served: tuple[FakeOpenAI, Faulty], streamed: bool, api: str
) -> None:
    # Before the bound, a stall held the turn 600 s per read (the HTTP client's default), three times over.
    await init_database()
    monkeypatch.setattr(current_settings(), 'model_timeout_seconds', 0.5)
    fake, script = served
    script.fault = STALL[streamed]
    session_id = f'stall-{api}-{streamed}'
    with pytest.raises(ModelProviderError) as raised:
        await _turn(streamed, f'{api}:gpt-4o-mini', session_id)
    message = str(raised.value)
    assert "model 'gpt-4o-mini' did not answer in time" in message and 'the turn was not saved' in message, message
    recorded = await ledger_rows(chat_session_id=session_id)
    assert [(r['status'], r['error_type']) for r in recorded] == [('error', 'ModelTimeoutError')]
    assert len(fake.requests) == 1  # the provider got what the ledger recorded: the SDK repeated nothing
    assert await PostgresConversationStore(await account_id('acme-health')).read_record(session_id) is None
    assert await scalar('SELECT count(*) FROM conversation_turns WHERE conversation_id = :c', c=session_id) == 0
    assert pool_status().checked_out == 0
    script.healed = True  # the next turn is not refused as concurrent
    result = await _turn(streamed, f'{api}:gpt-4o-mini', session_id, 'And in Boston?')
    assert result.output == 'Nobody matches.' and result.conversation_usage.requests == 1


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_rate_limited_request_is_not_repeated_behind_the_ledger(
    demo_data: None, served: tuple[FakeOpenAI, Faulty], streamed: bool
) -> None:
    # The SDK's two silent retries waited out `retry-after` (up to 60 s each) holding the conversation's claim, and
    # the provider got three requests for the ledger's one row.
    fake, script = served
    script.fault = Reply(status=429, error='Rate limit reached for requests', headers={'retry-after': '1'})
    session_id = f'rate-limited-{streamed}'
    with pytest.raises(ModelProviderError, match=r'answered HTTP 429.*the provider asked for 1 s'):
        await _turn(streamed, 'openai-chat:gpt-4o-mini', session_id)
    assert len(fake.requests) == 1
    assert [r['error_status_code'] for r in await ledger_rows(chat_session_id=session_id)] == [429]


async def test_an_agents_own_model_settings_win_over_the_runtimes(
    demo_data: None, served: tuple[FakeOpenAI, Faulty]
) -> None:
    # The runtime's bounds are the model's own settings, the lowest layer: an agent that asks for retries gets them.
    fake, script = served
    script.fault = Reply(status=500, error='upstream failed')
    agent = create_simple_chat_agent()
    agent.model_settings = {'max_retries': 1}
    with pytest.raises(ModelProviderError, match='answered HTTP 500'):
        await _turn(False, 'openai-chat:gpt-4o-mini', 'agent-retries', agent=agent)
    assert len(fake.requests) == 2


@pytest.mark.parametrize('how', ['create_simple_chat_agent', 'Agent(defer_model_check=True)'])
async def test_an_agents_own_model_string_gets_the_bounds(
    demo_data: None, served: tuple[FakeOpenAI, Faulty], how: str
) -> None:
    # create_simple_chat_agent('openai-chat:...') let pydantic-ai build the model at once, a `Model` the runtime
    # leaves alone: no timeout, and the SDK's two silent retries behind the ledger's one row.
    fake, script = served
    script.fault = Reply(status=429, error='Rate limit reached for requests', headers={'retry-after': '1'})
    name = 'openai-chat:gpt-4o-mini'
    agent: Agent[SessionDependencies, str] = (
        create_simple_chat_agent(name)
        if how == 'create_simple_chat_agent'
        else Agent(name, deps_type=SessionDependencies, defer_model_check=True)
    )
    with pytest.raises(ModelProviderError, match='answered HTTP 429'):
        await simple_chat('Who is in Seattle?', session_id=f'own-{len(how)}', account='acme-health', agent=agent)
    assert len(fake.requests) == 1
    assert agent.model == name  # kept as a name, which each turn builds with the bounds


def test_a_model_string_the_agent_factory_cannot_build_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="model 'nonsense:x' cannot be used"):
        create_simple_chat_agent('nonsense:x')


def test_a_model_string_gets_the_bounds_and_a_model_object_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-test')
    built = resolve_model('openai-chat:gpt-4o-mini', timeout_s=7.5, max_retries=0)
    assert built.settings == {'timeout': 7.5, 'max_retries': 0}
    assert resolve_model('openai-chat:gpt-4o-mini').settings is None  # no bounds asked: the client's own defaults
    mine = FunctionModel(lambda messages, info: None)  # type: ignore[arg-type,return-value]
    assert resolve_model(mine, timeout_s=7.5, max_retries=0) is mine and mine.settings is None
    assert resolve_model('demo', timeout_s=7.5, max_retries=0).settings is None  # the demo planner has no provider


class _NoTimeout(FunctionModel):
    unsupported_settings: ClassVar[frozenset[Any]] = frozenset({'timeout'})


def test_a_bound_the_model_ignores_is_not_set_and_its_own_settings_win() -> None:
    # pydantic-ai warns on every request that sets a guarantee the model ignores (Bedrock's `timeout`).
    ignores = _NoTimeout(lambda messages, info: None, settings={'max_retries': 3})  # type: ignore[arg-type,return-value]
    bounded: Model = with_provider_bounds(ignores, timeout_s=5, max_retries=0)
    expected: ModelSettings = {'max_retries': 3}
    assert bounded.settings == expected


def test_an_sdk_refusing_its_environment_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # OPENAI_API_KEY set but empty: openai's client raised OpenAIError("Missing credentials ...") as the model was
    # built, which no error class knew (the CLI's "internal error", exit 70).
    monkeypatch.setenv('OPENAI_API_KEY', '')
    refused = r"model 'openai-chat:gpt-4o' cannot be used: OpenAIError: Missing credentials"
    with pytest.raises(ConfigError, match=refused):
        resolve_model('openai-chat:gpt-4o')


@pytest.mark.parametrize('name', ['openai:', 'openai-chat: ', 'anthropic:'])
def test_a_provider_without_a_model_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # `--model openai:` built a model named '' and sent the provider a request for it.
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-test')
    with pytest.raises(ConfigError, match=r"names the provider '[a-z-]+' but no model: give provider:model"):
        resolve_model(name)


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_an_api_key_http_cannot_send_is_a_configuration_error(
    demo_data: None, monkeypatch: pytest.MonkeyPatch, served: tuple[FakeOpenAI, Faulty], streamed: bool
) -> None:
    # An undecodable byte in OPENAI_API_KEY (a lone surrogate): httpx's UnicodeEncodeError as the request's headers
    # were built was an internal error. Nothing is sent.
    fake, _ = served
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-\udcff')
    with pytest.raises(ConfigError, match=r'a header value \(the API key from the environment\?\) holds a character'):
        await _turn(streamed, 'openai-chat:gpt-4o-mini', f'bad-key-{streamed}')
    assert fake.requests == []


def test_a_missing_api_key_is_named_without_pydantic_ais_advice_for_its_test_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pydantic-ai's message went on "To try Pydantic AI without an API key, use the built-in test model:
    # `Agent('test')`": `agentrt chat --model test` then failed with exit 9; the keyless model here is 'demo'.
    monkeypatch.delenv('OPENAI_API_KEY', raising=False)
    with pytest.raises(ConfigError) as refused:
        resolve_model('openai:gpt-4o')
    message = str(refused.value)
    assert message.startswith("model 'openai:gpt-4o' cannot be used: Set the `OPENAI_API_KEY` environment variable")
    assert message.endswith("to use the OpenAI provider (or use the offline model 'demo')")
    assert "Agent('test')" not in message and 'test model' not in message


def test_a_model_name_without_its_provider_says_a_model_string_is_provider_model() -> None:
    with pytest.raises(ConfigError) as refused:
        resolve_model('gpt-4o')
    assert str(refused.value) == (
        "model 'gpt-4o' cannot be used: Unknown model: gpt-4o; a model string is provider:model, such as "
        'openai-chat:gpt-4o-mini'
    )
