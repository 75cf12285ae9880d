"""Usage limits apply to one turn: a conversation outlives them, a turn that reaches one stops with the documented
error, sends nothing past a request or tool-call limit, and saves nothing; undocumented pydantic-ai errors are
mapped."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from pydantic_ai import ModelResponse, ToolCallPart
from pydantic_ai.exceptions import UnexpectedModelBehavior, UsageLimitExceeded, UsageLimitUnavailableWarning
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models import override_allow_model_requests
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.usage import RunUsage, UsageLimits

from agentrt.agents.errors import ModelBehaviorError, TurnLimitExceededError
from agentrt.agents.run_errors import documented_error
from agentrt.agents.simple_chat import ChatResult, simple_chat, simple_chat_stream
from agentrt.agents.turn_limits import TurnUsageLimits, turn_usage_limits
from agentrt.db.engine import current_settings
from agentrt.db.settings import Settings
from agentrt.services.conversations import ConcurrentTurnError, PostgresConversationStore
from agentrt.services.ledger import get_request_tracker
from tests.agents.conftest import account_id
from tests.factories import ledger_rows, scalar
from tests.fake_openai import FakeOpenAI, Reply

QUESTION = 'Find me cardiologists in Seattle who accept Medicare'  # the demo plays 3 requests, 7 tool calls


async def _turn(message: str, session_id: str, streamed: bool, **kwargs: object) -> ChatResult:
    if not streamed:
        return await simple_chat(message, session_id=session_id, account='acme-health', **kwargs)  # type: ignore[arg-type]
    async with simple_chat_stream(message, session_id=session_id, account='acme-health', **kwargs) as stream:  # type: ignore[arg-type]
        async for _ in stream:
            pass
    assert stream.result is not None
    return stream.result


def test_defaults_and_settings() -> None:
    limits = turn_usage_limits(Settings(_env_file=None))
    assert (limits.request_limit, limits.tool_calls_limit, limits.total_tokens_limit) == (20, 60, 400_000)
    mine = turn_usage_limits(Settings(_env_file=None, turn_request_limit=3, turn_tool_calls_limit=0))
    assert mine.request_limit == 3 and mine.tool_calls_limit == 0


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_limits_count_one_turn_and_the_conversation_keeps_its_lifetime_usage(
    demo_data: None, monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    # Exactly one turn's worth: with pydantic-ai's conversation-wide counting the second turn would be refused.
    monkeypatch.setattr(current_settings(), 'turn_request_limit', 3)
    monkeypatch.setattr(current_settings(), 'turn_tool_calls_limit', 7)
    for turn in range(1, 5):
        result = await _turn(QUESTION, 'lifetime', streamed)
        assert result.usage.requests == 3 and result.usage.tool_calls == 7
        assert result.conversation_usage.requests == 3 * turn
        assert result.conversation_usage.tool_calls == 7 * turn
    stored = await PostgresConversationStore(await account_id('acme-health')).load('lifetime')
    assert stored is not None and stored.usage.requests == 12 and stored.usage.tool_calls == 28
    assert stored.usage.input_tokens == result.conversation_usage.input_tokens > result.usage.input_tokens


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
@pytest.mark.parametrize(
    ('setting', 'value', 'sent', 'names'),
    [
        ('turn_request_limit', 2, 2, 'AGENTRT_TURN_REQUEST_LIMIT'),  # the third request is never sent
        ('turn_tool_calls_limit', 3, 1, 'AGENTRT_TURN_TOOL_CALLS_LIMIT'),  # four searches asked: none runs
        ('turn_total_tokens_limit', 60, 1, 'AGENTRT_TURN_TOTAL_TOKENS_LIMIT'),  # counted on the first response
    ],
)
async def test_a_turn_over_a_limit_stops_sends_nothing_more_and_saves_nothing(
    demo_data: None, monkeypatch: pytest.MonkeyPatch, streamed: bool, setting: str, value: int, sent: int, names: str
) -> None:
    monkeypatch.setattr(current_settings(), setting, value)
    with pytest.raises(TurnLimitExceededError, match=names) as info:
        await _turn(QUESTION, 'limited', streamed)
    assert 'not saved' in str(info.value)
    # pydantic-ai's advice to the developer ("Consider raising the limit, or see the docs ...") is no user's (QA).
    assert 'Consider' not in str(info.value) and 'https://' not in str(info.value), str(info.value)
    assert isinstance(info.value.__cause__, UsageLimitExceeded)
    await get_request_tracker().flush()
    rows = await ledger_rows(chat_session_id='limited')
    assert len(rows) == sent, 'the ledger has every request that was sent, and only those'
    # Each was answered whole before the limit stopped the turn: complete, streamed or not. The token limit is checked
    # as each response ends, not on each streamed chunk (`TurnUsageLimits`): a streamed answer crossing it is received
    # whole, recorded complete with its tokens, and the turn stops there, as a plain one does.
    assert [(row['status'], row['error_type']) for row in rows] == [('complete', None)] * sent
    if setting == 'turn_total_tokens_limit':
        assert rows[0]['usage_reported'] and rows[0]['total_tokens'] > value, 'the answer received is billed'


def test_a_turns_token_limit_is_checked_per_response_not_per_streamed_event() -> None:
    # Checked on every streamed event, from a snapshot of the answer so far, the limit made a stream's cost grow with
    # the square of its length for a model whose profile restores special tokens (QA: 35 s for an 81 KB answer).
    limits = turn_usage_limits(current_settings())
    assert isinstance(limits, TurnUsageLimits) and not limits.has_token_limits()  # no per-event check
    limits.check_tokens(RunUsage(input_tokens=100, output_tokens=100))
    with pytest.raises(UsageLimitExceeded, match='total_tokens_limit of 400000'):
        limits.check_tokens(RunUsage(input_tokens=400_000, output_tokens=1))
    with pytest.warns(UsageLimitUnavailableWarning):  # pydantic-ai's warning for a response without usage stays
        limits.check_tokens(RunUsage(requests=1, unmeasured_requests=1))


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_provider_answer_that_crosses_the_token_limit_is_recorded_complete_on_both_paths(
    demo_data: None, monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    # A real provider's stream ends with its finish reason and usage: the limit, checked on that last chunk, stopped
    # the stream before it ended, and the request was filed as cancelled (CancelledError), though answered whole.
    monkeypatch.setattr(current_settings(), 'turn_total_tokens_limit', 50)
    reply = Reply(text='an answer in a few pieces', chunks=3, prompt_tokens=60, completion_tokens=9)
    with override_allow_model_requests(True), FakeOpenAI(lambda _: reply).running() as fake:
        provider = OpenAIProvider(base_url=fake.base_url, api_key='sk-test-loopback-only-0000')
        model = OpenAIChatModel('gpt-4o-mini', provider=provider)
        with pytest.raises(TurnLimitExceededError, match='AGENTRT_TURN_TOTAL_TOKENS_LIMIT'):
            await _turn('hello', 'provider-limit', streamed, model=model)
    await get_request_tracker().flush()
    [row] = await ledger_rows(chat_session_id='provider-limit')
    assert (row['status'], row['error_type'], row['finish_reason']) == ('complete', None, 'stop')
    assert (row['input_tokens'], row['output_tokens'], row['streamed']) == (60, 9, streamed)
    assert await scalar('SELECT count(*) FROM conversation_entries') == 0, 'nothing saved'
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0, 'the conversation was released'


def _always_bad_args(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[ToolCallPart('get_directory_entry', {'entry_id': -1})])


async def _always_bad_args_stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[DeltaToolCalls]:
    yield {0: DeltaToolCall('get_directory_entry', '{"entry_id": -1}')}


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_model_that_never_gets_a_tool_right_is_a_model_behavior_error(demo_data: None, streamed: bool) -> None:
    model = FunctionModel(_always_bad_args, stream_function=_always_bad_args_stream)
    with pytest.raises(ModelBehaviorError, match='did not produce a usable answer') as info:
        await _turn('entry -1 please', 'retries', streamed, model=model)
    assert isinstance(info.value.__cause__, UnexpectedModelBehavior)
    # pydantic-ai's advice to the developer ("Consider raising the retry limit, or see the docs ...") is not the
    # user's to follow; that nothing was saved is (QA).
    message = str(info.value)
    assert message.endswith('exceeded max retries count of 1; the turn was not saved'), message
    assert 'Consider' not in message and 'https://' not in message, message
    await get_request_tracker().flush()
    assert len(await ledger_rows(chat_session_id='retries')) >= 2, 'the retries were sent and billed'
    assert await scalar('SELECT count(*) FROM conversations') == 0


def test_documented_error_maps_only_what_it_documents() -> None:
    limit = documented_error(UsageLimitExceeded('The next request would exceed the request_limit of 20'))
    assert isinstance(limit, TurnLimitExceededError) and 'AGENTRT_TURN_REQUEST_LIMIT' in str(limit)
    behavior = documented_error(UnexpectedModelBehavior('Exceeded maximum retries', body='{"x": 1}'))
    assert isinstance(behavior, ModelBehaviorError) and json.loads(behavior.body or '') == {'x': 1}
    assert documented_error(ConcurrentTurnError('c')) is None, 'already documented: passes through'
    assert documented_error(ValueError('a bug')) is None
    custom = documented_error(UsageLimitExceeded('Exceeded the input_tokens_limit of 5 (input_tokens=9)'))
    assert isinstance(custom, TurnLimitExceededError) and 'AGENTRT_' not in str(custom)


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_explicit_usage_limits_replace_the_settings_for_one_turn(demo_data: None, streamed: bool) -> None:
    # The error names the caller's own limits: it named AGENTRT_TURN_REQUEST_LIMIT, a setting nobody had set.
    with pytest.raises(TurnLimitExceededError, match=r'\(the usage_limits given to this turn\)') as info:
        await _turn(QUESTION, 'own', streamed, usage_limits=UsageLimits(request_limit=1))
    assert 'AGENTRT_' not in str(info.value)
    assert (await simple_chat(QUESTION, session_id='own', account='acme-health')).usage.requests == 3
