"""A turn's usage (`ChatResult.usage`: the CLI's summary line, the HTTP turn's figures) as its ledger rows record it."""

from __future__ import annotations

import uuid
import warnings
from typing import Any

import pytest
from openai import AsyncOpenAI
from pydantic_ai.usage import UsageLimits

from agentrt.agents.chat_turn import ChatResult
from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
from agentrt.db.engine import current_settings
from agentrt.db.errors import TurnLimitExceededError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.conversations import list_conversations
from agentrt.services.ledger import get_request_tracker
from tests.agents.conftest import account_id, loopback_model
from tests.factories import ledger_rows
from tests.fake_openai import FakeOpenAI, Reply

pytestmark = pytest.mark.usefixtures('allow_loopback_model_requests')  # only ever to the loopback server


async def _turn(message: str, streamed: bool, **turn: Any) -> ChatResult:
    """One turn, on the plain or the streamed path; its result."""
    if not streamed:
        return await simple_chat(message, **turn)
    async with simple_chat_stream(message, **turn) as stream:
        async for _ in stream:
            pass
    assert stream.result is not None
    return stream.result


ODD_USAGE = {
    'gateway-cost-1e15': {'logfire_ai_gateway': {'cost': '1e15'}},
    'fractional-count': {'prompt_tokens': 10.5},
    'null-counts': {'prompt_tokens': None, 'completion_tokens': None, 'total_tokens': None},
    # Counts no request has tripped the turn's token limit: every turn ended over it, nothing saved (QA).
    'counts-past-a-trillion': {'prompt_tokens': 2**70, 'total_tokens': 2**70 + 20},
}


@pytest.mark.parametrize('odd', list(ODD_USAGE))
@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_response_the_ledger_records_unmeasured_is_unmeasured_in_the_turns_usage(
    demo_data: None, clients: list[AsyncOpenAI], streamed: bool, odd: str
) -> None:
    # The summary said "cost $1000000000000000.000000" and the HTTP turn "cost": "1000000000000000", or 15.5 tokens,
    # where the ledger row was unmeasured (QA).
    session_id = f'odd-usage-{odd}-{streamed}'
    turn: dict[str, Any] = {'session_id': session_id, 'account': 'acme-health'}
    with FakeOpenAI(lambda body: Reply(text='fine', usage_fields=ODD_USAGE[odd])).running() as fake:
        turn['model'] = loopback_model('chat', fake, clients)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # pydantic-ai's UsageExtractionFailedWarning
            try:
                result = await _turn('hi', streamed, **turn)
            except Exception:  # the SDK's check of a plain answer refuses some bodies outright
                assert not streamed
                return
    await get_request_tracker().flush()
    [row] = await ledger_rows(chat_session_id=session_id)
    assert (row['usage_reported'], row['total_cost']) == (False, None)
    assert result.output == 'fine'
    for usage in (result.usage, result.conversation_usage):  # the conversation's lifetime usage kept them (QA)
        assert usage.unmeasured_requests == 1 and usage.requests == 1
        assert (usage.input_tokens, usage.output_tokens, usage.cost) == (0, 0, None)
    # The listing (HTTP, web UI) said 0 unmeasured: a measured zero (QA).
    async with get_db_session(account=Unscoped.ADMIN) as session:
        listed = await list_conversations(session=session, account_id=await account_id('acme-health'), limit=200)
    [mine] = [item for item in listed if item.conversation_id == session_id]
    assert (mine.requests, mine.unmeasured_requests, mine.input_tokens) == (1, 1, 0)


@pytest.mark.parametrize(
    'limits',
    [
        None,
        UsageLimits(total_tokens_limit=1000, cost_limit=1),
        UsageLimits(input_tokens_limit=400),
        UsageLimits(per_request_input_tokens_limit=400),  # checked on each streamed chunk too (QA)
    ],
    ids=['the-turns-own', 'the-callers-tokens-and-cost', 'the-callers-input', 'the-callers-per-request-input'],
)
@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_counts_no_request_has_do_not_end_the_turn_at_its_next_request(
    demo_data: None, clients: list[AsyncOpenAI], streamed: bool, limits: UsageLimits | None
) -> None:
    # A tool call claiming 2^70 tokens, then the answer: pydantic-ai checks the turn's token limit before the next
    # request on the run's usage, which kept the 2^70: the turn ended over its limit, nothing saved (QA).
    def script(body: dict[str, Any]) -> Reply:
        if not any(message['role'] == 'tool' for message in body['messages']):
            # and a gateway's cost no request has: a caller's cost limit read it (QA)
            huge = {'prompt_tokens': 2**70, 'total_tokens': 2**70 + 20, 'logfire_ai_gateway': {'cost': '1e15'}}
            return Reply(tool_calls=[('search_directory', {'query': 'cardiology'})], usage_fields=huge)
        return Reply(text='Found one.', prompt_tokens=300, completion_tokens=5)

    session_id = f'huge-then-fine-{streamed}-{uuid.uuid4().hex[:8]}'
    turn: dict[str, Any] = {'session_id': session_id, 'account': 'acme-health', 'usage_limits': limits}
    with FakeOpenAI(script).running() as fake, warnings.catch_warnings():
        warnings.simplefilter('ignore')  # pydantic-ai's UsageLimitUnavailableWarning: a response was unmeasured
        turn['model'] = loopback_model('chat', fake, clients)
        result = await _turn('cardiologists?', streamed, **turn)
    assert result.output == 'Found one.'
    assert (result.usage.requests, result.usage.unmeasured_requests) == (2, 1)
    assert (result.usage.input_tokens, result.usage.output_tokens) == (300, 5)  # the measured answer's alone
    assert result.conversation_usage.input_tokens == 300
    await get_request_tracker().flush()
    rows = await ledger_rows(chat_session_id=session_id)
    assert sorted(row['usage_reported'] for row in rows) == [False, True]


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_callers_limit_still_stops_a_turn_that_measurably_crosses_it(
    demo_data: None, clients: list[AsyncOpenAI], streamed: bool
) -> None:
    session_id = f'over-the-callers-limit-{streamed}'
    turn: dict[str, Any] = {'session_id': session_id, 'account': 'acme-health'}
    turn['usage_limits'] = UsageLimits(total_tokens_limit=100)
    with FakeOpenAI(lambda body: Reply(text='fine', prompt_tokens=300)).running() as fake:
        turn['model'] = loopback_model('chat', fake, clients)
        with pytest.raises(TurnLimitExceededError, match='total_tokens_limit of 100'):
            await _turn('hi', streamed, **turn)


@pytest.mark.parametrize('free_first', [True, False], ids=['free-first', 'nonsense-first'])
async def test_a_measured_zero_cost_beside_an_unmeasured_one_is_kept_whatever_their_order(
    demo_data: None, clients: list[AsyncOpenAI], free_first: bool
) -> None:
    # A gateway's $0 and a gateway's 10^15 USD: "cost unknown" in one order, "at least $0" in the other (QA).
    costs = ['0', '1e15'] if free_first else ['1e15', '0']

    def script(body: dict[str, Any]) -> Reply:
        answered = any(message['role'] == 'tool' for message in body['messages'])
        cost = {'logfire_ai_gateway': {'cost': costs[1 if answered else 0]}}
        if not answered:
            return Reply(tool_calls=[('search_directory', {'query': 'cardiology'})], usage_fields=cost)
        return Reply(text='Found one.', usage_fields=cost)

    with FakeOpenAI(script).running() as fake, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        result = await simple_chat(
            'cardiologists?',
            session_id=f'free-and-nonsense-{free_first}',
            account='acme-health',
            model=loopback_model('chat', fake, clients),
        )
    assert (result.usage.requests, result.usage.unmeasured_requests) == (2, 1)
    assert result.usage.cost == 0 and result.usage.cost is not None


# An answer whose counts look like a request's but which the ledger records unmeasured for another of its amounts.
UNMEASURED_LAST = {
    'gateway-cost-1e15': {'logfire_ai_gateway': {'cost': '1e15'}},
    'cached-2-70': {'prompt_tokens_details': {'cached_tokens': 2**70}},
    'reasoning-2-70': {'completion_tokens_details': {'reasoning_tokens': 2**70}},
    'cost-of-45-decimals': {'logfire_ai_gateway': {'cost': '1e-45'}},
}


@pytest.mark.parametrize('odd', list(UNMEASURED_LAST))
@pytest.mark.parametrize('limit', ['the-turns-own', 'the-callers'])
@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_an_answer_recorded_unmeasured_for_any_amount_does_not_stop_the_turn_on_a_limit(
    demo_data: None, clients: list[AsyncOpenAI], monkeypatch: pytest.MonkeyPatch, streamed: bool, limit: str, odd: str
) -> None:
    # 90 measured tokens, then an answer of 15 tokens the ledger records unmeasured (its cost or its cache or reasoning
    # count no request has): a stream checked the limit of 100 on 105 before the ledger took the answer out, and the
    # turn stopped, not saved, where the plain path completed (QA).
    def script(body: dict[str, Any]) -> Reply:
        if not any(message['role'] == 'tool' for message in body['messages']):
            return Reply(
                tool_calls=[('search_directory', {'query': 'cardiology'})], prompt_tokens=80, completion_tokens=10
            )
        return Reply(text='Found one.', prompt_tokens=10, completion_tokens=5, usage_fields=UNMEASURED_LAST[odd])

    session_id = f'unmeasured-last-{odd}-{limit}-{streamed}'
    turn: dict[str, Any] = {'session_id': session_id, 'account': 'acme-health'}
    if limit == 'the-callers':
        turn['usage_limits'] = UsageLimits(total_tokens_limit=100, input_tokens_limit=85, cost_limit=1)
    else:
        monkeypatch.setattr(current_settings(), 'turn_total_tokens_limit', 100)
    with FakeOpenAI(script).running() as fake, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        turn['model'] = loopback_model('chat', fake, clients)
        result = await _turn('cardiologists?', streamed, **turn)
    assert result.output == 'Found one.'
    assert (result.usage.requests, result.usage.unmeasured_requests, result.usage.total_tokens) == (2, 1, 90)
    await get_request_tracker().flush()
    rows = await ledger_rows(chat_session_id=session_id)
    assert sorted(row['usage_reported'] for row in rows) == [False, True]


@pytest.mark.parametrize('claimed', ['1e30', '1e-45'])
@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_the_turns_cost_is_the_measured_cost_beside_an_unmeasured_claim(
    demo_data: None, clients: list[AsyncOpenAI], streamed: bool, claimed: str
) -> None:
    # $0.0000045 measured, then a gateway's $1e30: pydantic-ai's sum of 28 digits lost the measured part, so taking
    # the claim back out left $0 (the CLI's "at least $0.000000", the HTTP turn's "0"); a 1e-45 claim left 0.0000045
    # with 26 trailing zeros (QA).
    def script(body: dict[str, Any]) -> Reply:
        if not any(message['role'] == 'tool' for message in body['messages']):
            cost = {'logfire_ai_gateway': {'cost': '0.0000045'}}
            return Reply(tool_calls=[('search_directory', {'query': 'cardiology'})], usage_fields=cost)
        return Reply(text='Found one.', usage_fields={'logfire_ai_gateway': {'cost': claimed}})

    session_id = f'measured-beside-{claimed}-{streamed}'
    with FakeOpenAI(script).running() as fake, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = loopback_model('chat', fake, clients)
        result = await _turn('cardiologists?', streamed, session_id=session_id, account='acme-health', model=model)
    assert result.usage.unmeasured_requests == 1
    assert str(result.usage.cost) == '0.0000045' and str(result.conversation_usage.cost) == '0.0000045'


@pytest.mark.parametrize('odd', list(UNMEASURED_LAST))
@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_callers_per_request_input_limit_is_not_read_on_an_answer_recorded_unmeasured(
    demo_data: None, clients: list[AsyncOpenAI], streamed: bool, odd: str
) -> None:
    # 10 input tokens beside a gateway's 10^15 USD (or 2^70 cached tokens): pydantic-ai checks this limit on every
    # streamed chunk, and the stream stopped where the plain turn completed (QA).
    reply = Reply(text='fine', prompt_tokens=10, completion_tokens=5, usage_fields=UNMEASURED_LAST[odd])
    session_id = f'per-request-unmeasured-{odd}-{streamed}'
    turn: dict[str, Any] = {'session_id': session_id, 'account': 'acme-health'}
    turn['usage_limits'] = UsageLimits(per_request_input_tokens_limit=8)
    with FakeOpenAI(lambda body: reply).running() as fake, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        turn['model'] = loopback_model('chat', fake, clients)
        result = await _turn('hi', streamed, **turn)
    assert result.output == 'fine' and result.usage.unmeasured_requests == 1
