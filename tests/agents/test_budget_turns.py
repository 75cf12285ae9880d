"""Budgets through chat turns: 50 turns racing against a budget that fits N of them, plain and streamed.

Each admitted request spends all it may (its input's byte bound, its capped `max_tokens`), so only the reservation
keeps the account within its limit. The model holds every admitted request until all 50 turns are either admitted
or refused, so the test sees what they hold at once: exactly N, and no room left for one more.
"""

from __future__ import annotations

import asyncio
import warnings
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydantic_ai import FunctionToolset
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models import ModelRequestParameters, override_allow_model_requests
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import RequestUsage
from sqlalchemy import text

from agentrt.agents.errors import BudgetExceededError
from agentrt.agents.simple_chat import ChatResult, simple_chat, simple_chat_stream
from agentrt.db.engine import current_settings
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.budgets import Period, budget_statuses, pricer_for, set_budget, sweep_reservations
from agentrt.services.ledger import LedgerFilters, get_request_tracker, summarise_costs, utc_now
from agentrt.tools.dependencies import SessionDependencies
from tests.agents.conftest import account_id
from tests.factories import ledger_rows, scalar, slow_commit_reply
from tests.fake_openai import FakeOpenAI, Reply
from tests.services.budgets.priced_model import LongAnswerModel, PricedModel

TURNS = 50
ADMITTED = 7


async def _turn(message: str, session_id: str, streamed: bool, model: PricedModel, account: str) -> ChatResult:
    if not streamed:
        return await simple_chat(message, session_id=session_id, account=account, model=model)
    async with simple_chat_stream(message, session_id=session_id, account=account, model=model) as stream:
        async for _ in stream:
            pass
    assert stream.result is not None
    return stream.result


async def _set(account: str, limit: Decimal | str) -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await set_budget(session=session, account=account, limit_usd=Decimal(limit), period=Period('month'))


async def _status(account: str) -> tuple[Decimal, Decimal, int]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        (status,) = await budget_statuses(session=session, account_id=await account_id(account))
    return status.spent_usd, status.reserved_usd, status.holds


async def _drain() -> None:
    await get_request_tracker().flush()
    await get_supervisor().join()


async def _hold_of_one_turn(streamed: bool, account: str) -> Decimal:
    """What one turn holds (the same for every turn below: same prompt, same size class)."""
    gate = asyncio.Event()
    model = PricedModel(gate=gate)
    turn = asyncio.create_task(_turn('How many cardiologists?', 'probe', streamed, model, account))
    while model.arrived == 0:  # noqa: ASYNC110 - the model counts arrivals; polling it is the simplest wait
        await asyncio.sleep(0.005)
    held = await scalar('SELECT amount_usd FROM budget_reservations')
    gate.set()
    await turn
    await _drain()
    return held


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_fifty_racing_turns_admit_exactly_those_the_budget_fits(demo_data: None, streamed: bool) -> None:
    account = 'acme-health'
    await _set(account, '1000')
    hold = await _hold_of_one_turn(streamed, account)
    spent_before, _, _ = await _status(account)
    # Room for 7 whole holds and a sliver: less than any request's input alone (1,024 framing tokens cost more), so an
    # 8th turn cannot be admitted even with fewer output tokens.
    limit = spent_before + hold * ADMITTED + hold / 1000
    await _set(account, limit)

    gate = asyncio.Event()
    model = PricedModel(gate=gate)
    turns = [
        asyncio.create_task(_turn('How many cardiologists?', f'race-{i:02d}', streamed, model, account))
        for i in range(TURNS)
    ]
    try:
        # Every turn is either held at the model (admitted) or done (refused).
        while model.arrived + sum(t.done() for t in turns) < TURNS:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        spent, reserved, holds = await _status(account)
        assert model.arrived == holds == ADMITTED
        assert reserved == hold * ADMITTED and spent == spent_before
        assert limit - spent - reserved < hold, 'no room for one more'
    finally:
        gate.set()
        outcomes = await asyncio.gather(*turns, return_exceptions=True)
    await _drain()

    admitted = [o for o in outcomes if isinstance(o, ChatResult)]
    refused = [o for o in outcomes if isinstance(o, BudgetExceededError)]
    assert len(admitted) == ADMITTED and len(refused) == TURNS - ADMITTED, outcomes
    assert 'was not sent' in str(refused[0]) and refused[0].reason == 'limit'
    spent, reserved, holds = await _status(account)
    assert spent <= limit and reserved == 0 and holds == 0
    assert await scalar('SELECT count(*) FROM budget_reservations') == 0
    rows = [row for row in await ledger_rows(account_slug=account) if row['chat_session_id'].startswith('race-')]
    complete = [row for row in rows if row['status'] == 'complete']
    refused_rows = [row for row in rows if row['status'] == 'refused']
    assert len(complete) == ADMITTED and len(refused_rows) == TURNS - ADMITTED
    assert all(row['total_cost'] == 0 and row['input_tokens'] == 0 for row in refused_rows), 'a refusal bills 0'
    assert all(row['error_type'] == 'BudgetExceededError' for row in refused_rows)
    assert spent == spent_before + sum(row['total_cost'] for row in complete), 'spent is the sum of ledger costs'
    assert all(0 < row['total_cost'] <= hold for row in complete), 'no request cost more than it held'
    assert set(model.max_tokens_seen) == {16_384}, 'each request was capped to what it held'
    async with get_db_session(account=Unscoped.ADMIN) as session:
        (summary,) = await summarise_costs(
            session=session, by='account', filters=LedgerFilters(account=account, chat_session_id=None)
        )
    assert summary.requests == ADMITTED + 1, 'refusals are in the audit, not in the costs (+1: the probe turn)'


class _HoldSpy(PricedModel):
    """A `PricedModel` that notes, as each request arrives, the input share its budget hold was made of."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply, output_tokens=50)
        self.held_input_usd: list[Decimal] = []

    async def _arrive(self, messages: Any, settings: Any, parameters: Any) -> Any:
        self.held_input_usd.append(await scalar('SELECT input_usd FROM budget_reservations'))
        return await super()._arrive(messages, settings, parameters)


async def test_a_long_conversation_holds_what_its_requests_send_not_its_whole_history(
    demo_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once a conversation's history outgrows the context budget, each request sends only what fits (older turns
    # folded): the hold was of the whole history loaded (up to three times the budget), about twice what was sent
    # here, so near its limit a long conversation was refused a request it could afford.
    monkeypatch.setattr(current_settings(), 'context_max_tokens', 3_000)
    monkeypatch.setattr(current_settings(), 'message_max_chars', 2_000)
    await _set('acme-health', '100')
    answer = 'Cardiologists in Seattle who accept Medicare, with their addresses and hours. ' * 30
    for turn in range(8):
        model = _HoldSpy(answer)
        await simple_chat(
            f'Question {turn}: and in Boston?', session_id='long-held', account='acme-health', model=model
        )
    await _drain()
    sent = (await ledger_rows(account_slug='acme-health', chat_session_id='long-held'))[-1]
    (held,) = model.held_input_usd
    sent_usd = pricer_for(model).cost(sent['input_tokens'], 0, sent['started_at'])  # type: ignore[union-attr]
    assert sent['input_tokens'] > 3_000, 'the request is past the budget (instructions and tools on top)'
    assert held <= sent_usd * Decimal('1.2'), f'held {held} for an input that cost {sent_usd}'


async def test_a_turn_cancelled_as_its_hold_commits_gives_the_hold_back(
    demo_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A turn cancelled (a client gone, a timeout) while the reply to its hold's COMMIT was in flight: pydantic-ai runs
    # the request's hooks in an anyio cancel scope, which cancels again at every await, so the hold was left to its
    # TTL (15 minutes in a live process), shown as held by a request in flight that nobody sent.
    await _set('acme-health', '100')
    model = PricedModel()
    with slow_commit_reply(monkeypatch, skip=1) as committed:  # the turn's start commits first, then its hold
        turn = asyncio.create_task(_turn('How many cardiologists?', 'cancelled-hold', False, model, 'acme-health'))
        await committed.wait()
        turn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await turn
    await _drain()
    assert model.arrived == 0, 'nothing was sent'
    assert await scalar('SELECT count(*) FROM budget_reservations') == 0
    _, reserved, holds = await _status('acme-health')
    assert reserved == 0 and holds == 0


async def _held_turns(count: int, model: PricedModel, prefix: str) -> list[asyncio.Task[ChatResult]]:
    """`count` turns of acme-health started and held at the model (admitted, their holds taken)."""
    turns = [
        asyncio.create_task(_turn('How many cardiologists?', f'{prefix}-{i}', False, model, 'acme-health'))
        for i in range(count)
    ]
    while model.arrived < count:  # noqa: ASYNC110 - the model counts arrivals
        await asyncio.sleep(0.005)
    return turns


async def _ledger_spent(prefix: str) -> Decimal:
    """What acme-health's ledger rows of conversations named `prefix...` cost."""
    rows = await ledger_rows(account_slug='acme-health')
    return sum((row['total_cost'] for row in rows if (row['chat_session_id'] or '').startswith(prefix)), Decimal(0))


async def test_a_limit_lowered_under_turns_in_flight_refuses_the_next_and_settles_those_once(demo_data: None) -> None:
    await _set('acme-health', '1000')
    hold = await _hold_of_one_turn(False, 'acme-health')
    spent_before, _, _ = await _status('acme-health')
    gate = asyncio.Event()
    model = PricedModel(gate=gate)
    await _set('acme-health', spent_before + hold * 5)
    flying = await _held_turns(3, model, 'lowered')
    # The operator lowers the limit below what the three hold: they go on (README: a change applies to the next
    # request), the next request is refused, and once they end each is charged once and its hold given back.
    await _set('acme-health', spent_before + hold)
    with pytest.raises(BudgetExceededError):
        await simple_chat('and one more', session_id='lowered-refused', account='acme-health', model=PricedModel())
    gate.set()
    await asyncio.gather(*flying)
    await _drain()
    spent, reserved, holds = await _status('acme-health')
    assert reserved == 0 and holds == 0
    assert spent == spent_before + await _ledger_spent('lowered-'), 'each row charged once'
    with pytest.raises(BudgetExceededError):
        await simple_chat('and again', session_id='lowered-after', account='acme-health', model=PricedModel())


async def test_a_period_changed_under_turns_in_flight_counts_their_rows_once_in_the_new_period(
    demo_data: None,
) -> None:
    # Changing the period drops the holds of requests in flight (README); their rows, arriving later, count in the
    # new period once: not twice (summed when the period's row is created and settled again), not zero times.
    await _set('acme-health', '1000')
    gate = asyncio.Event()
    model = PricedModel(gate=gate)
    flying = await _held_turns(2, model, 'moved')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await set_budget(session=session, account='acme-health', limit_usd=Decimal(1000), period=Period('day'))
    assert await scalar('SELECT count(*) FROM budget_reservations') == 0, 'dropped with the old period'
    await simple_chat('meanwhile', session_id='moved-meanwhile', account='acme-health', model=PricedModel())
    gate.set()
    await asyncio.gather(*flying)
    await _drain()
    spent, reserved, holds = await _status('acme-health')
    today = utc_now().replace(hour=0, minute=0, second=0, microsecond=0)
    rows = await ledger_rows(account_slug='acme-health')
    assert reserved == 0 and holds == 0 and sum(row['status'] == 'complete' for row in rows) == 3
    assert spent == sum(row['total_cost'] for row in rows if row['started_at'] >= today), 'each row counted once'


async def test_a_request_held_before_its_period_rolled_over_is_charged_to_the_period_it_started_in(
    demo_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A turn admitted at 23:59:59 of the last day of a period ends in the next one: its cost is the old period's, and
    # the new period (created by a request meanwhile) does not count it as well.
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await set_budget(session=session, account='acme-health', limit_usd=Decimal(1000), period=Period('day'))
    now = utc_now()
    yesterday = now - timedelta(days=1)
    gate = asyncio.Event()
    model = PricedModel(gate=gate)
    with monkeypatch.context() as patched:
        patched.setattr('agentrt.services.ledger._capability.utc_now', lambda: yesterday)
        (late,) = await _held_turns(1, model, 'rolled-late')
    await simple_chat('today', session_id='rolled-today', account='acme-health', model=PricedModel())
    gate.set()
    await late
    await _drain()
    await sweep_reservations()  # folds the settlements into both windows
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = (
            await session.execute(
                text('SELECT period_start, spent_usd, reserved_usd FROM budget_periods ORDER BY period_start')
            )
        ).all()
    assert [(start.date(), reserved) for start, _, reserved in rows] == [(yesterday.date(), 0), (now.date(), 0)]
    assert rows[0].spent_usd == await _ledger_spent('rolled-late') > 0
    assert rows[1].spent_usd == await _ledger_spent('rolled-today') > 0
    spent, _, _ = await _status('acme-health')
    assert spent == rows[1].spent_usd


async def test_a_stream_cut_after_its_answer_began_is_charged_the_output_it_received(demo_data: None) -> None:
    # A hostile tenant reads a long streamed answer and hangs up before its end, where the provider reports usage:
    # the provider bills all the output it produced, but the hold was settled at its input's share alone, so the
    # answer was free against the budget, turn after turn.
    await _set('acme-health', '100')
    spent_before, _, _ = await _status('acme-health')
    model = LongAnswerModel()

    async def read() -> None:
        async with simple_chat_stream('Write an essay', session_id='cut', account='acme-health', model=model) as stream:
            async for _ in stream:
                pass

    reader = asyncio.create_task(read())
    async with asyncio.timeout(30):
        await model.paused.wait()
    reader.cancel()  # the caller is gone
    with pytest.raises(asyncio.CancelledError):
        await reader
    await _drain()
    assert model.produced_tokens == model.pause_after * model.CHUNK_TOKENS
    (row,) = await ledger_rows(account_slug='acme-health', chat_session_id='cut')
    assert row['status'] == 'cancelled' and not row['usage_reported']
    spent, reserved, holds = await _status('acme-health')
    assert reserved == 0 and holds == 0
    (held,) = model.held
    pricer = pricer_for(model)
    assert pricer is not None
    assert row['output_bound_usd'] >= pricer.cost(0, model.produced_tokens, row['started_at']), 'what it produced'
    assert spent - spent_before == min(held.amount_usd, held.input_usd + row['output_bound_usd']), (
        'charged once, within its hold'
    )


async def test_a_request_in_flight_longer_than_the_hold_ttl_keeps_its_hold(
    demo_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A caller decides how long a streamed request runs (a client that reads slowly or not at all holds it open): the
    # sweeper released its hold once the TTL passed, so the account was admitted past its limit while it still ran.
    ttl = 0.6
    await _set('acme-health', '1000')
    hold = await _hold_of_one_turn(False, 'acme-health')
    spent_before, _, _ = await _status('acme-health')
    await _set('acme-health', spent_before + hold + hold / 1000)  # room for one, and not for a second's input
    monkeypatch.setattr(current_settings(), 'budget_reservation_ttl_seconds', ttl)
    gate = asyncio.Event()
    (slow,) = await _held_turns(1, PricedModel(gate=gate), 'slow')
    past = f"SELECT now() > created_at + interval '{3 * ttl} seconds' FROM budget_reservations"
    while not await scalar(past):  # three TTLs pass, sweeps running meanwhile
        await sweep_reservations()
        assert await scalar('SELECT count(*) FROM budget_reservations') == 1, 'the hold of a request in flight'
        await asyncio.sleep(ttl / 6)
    with pytest.raises(BudgetExceededError):
        await simple_chat('and one more', session_id='slow-refused', account='acme-health', model=PricedModel())
    gate.set()
    await slow
    await _drain()
    spent, reserved, holds = await _status('acme-health')
    assert reserved == 0 and holds == 0 and spent == spent_before + await _ledger_spent('slow-')


_lookup = FunctionToolset[SessionDependencies]()


@_lookup.tool_plain
def count_cardiologists() -> int:
    """How many cardiologists there are."""
    return 12


def _tool_then_answer(body: dict[str, Any]) -> Reply:
    if not any(message['role'] == 'tool' for message in body['messages']):
        return Reply(tool_calls=[('count_cardiologists', {})], prompt_tokens=300, completion_tokens=10)
    return Reply(text='There are 12.', prompt_tokens=320, completion_tokens=5)


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_turns_next_request_is_admitted_against_what_the_last_one_cost_not_what_it_held(
    demo_data: None, streamed: bool
) -> None:
    # The first request's hold (its most: 16,384 output tokens) counted until the ledger writer's commit delay ended;
    # the turn's second request, admitted meanwhile, was capped to what was left of the limit, or refused with the
    # first already billed, and a retry billed it again (QA). Here the budget has room for one and a half holds.
    account = 'acme-health'
    await _set(account, '1000')
    with override_allow_model_requests(True), FakeOpenAI(_tool_then_answer).running() as fake:
        model = OpenAIChatModel('gpt-4o-mini', provider=OpenAIProvider(base_url=fake.base_url, api_key='sk-x'))
        turn: dict[str, Any] = {'account': account, 'model': model, 'toolsets': [_lookup]}
        await simple_chat('How many cardiologists?', session_id=f'probe-{streamed}', **turn)
        await _drain()
        hold = await scalar('SELECT last_reserved_usd FROM budget_periods')  # the probe's second request's
        spent_before, _, _ = await _status(account)
        await _set(account, spent_before + hold * Decimal('1.5'))
        fake.requests.clear()
        session_id = f'tight-{streamed}'
        if streamed:
            async with simple_chat_stream('How many cardiologists?', session_id=session_id, **turn) as stream:
                output = ''.join([delta async for delta in stream])
        else:
            output = (await simple_chat('How many cardiologists?', session_id=session_id, **turn)).output
    assert output == 'There are 12.'
    assert [request['max_completion_tokens'] for request in fake.requests] == [16_384, 16_384], 'neither was capped'
    await _drain()
    rows = await ledger_rows(chat_session_id=session_id)
    assert [row['status'] for row in rows] == ['complete', 'complete']
    spent, reserved, holds = await _status(account)
    assert (reserved, holds) == (0, 0) and spent == spent_before + sum(row['total_cost'] for row in rows)


class _ClaimingModel(PricedModel):
    """gpt-4o-mini reporting `usage` for every answer, whatever it was sent; `held` is what each request held."""

    def __init__(self, usage: RequestUsage) -> None:
        super().__init__('Twelve.')
        self.usage = usage
        self.held: list[Decimal] = []

    async def _arrive(
        self, messages: list[ModelMessage], settings: ModelSettings | None, parameters: ModelRequestParameters
    ) -> RequestUsage:
        await super()._arrive(messages, settings, parameters)
        self.held.append(await scalar('SELECT amount_usd FROM budget_reservations'))
        return self.usage


async def _charged_for_a_claim(usage: RequestUsage, streamed: bool, session_id: str) -> tuple[dict[str, Any], Decimal]:
    """One turn of `acme-health` (a $100 budget) whose answer claims `usage`: its ledger row, after checking that the
    budget was charged the request's whole hold, as for an answer whose usage was never reported."""
    await _set('acme-health', '100')
    spent_before, _, _ = await _status('acme-health')
    model = _ClaimingModel(usage)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # pydantic-ai's UsageLimitUnavailableWarning: a response was unmeasured
        result = await _turn('How many cardiologists?', session_id, streamed, model, 'acme-health')
    assert result.output == 'Twelve.'
    assert (result.usage.unmeasured_requests, result.usage.input_tokens, result.usage.cost) == (1, 0, None)
    await _drain()
    (row,) = await ledger_rows(account_slug='acme-health', chat_session_id=session_id)
    spent, reserved, holds = await _status('acme-health')
    (held,) = model.held
    assert (reserved, holds) == (0, 0)
    assert held > 0 and spent - spent_before == held, 'charged its whole hold'
    return row, held


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_an_answer_claiming_more_cached_tokens_than_input_is_unmeasured_and_charged_its_hold(
    demo_data: None, streamed: bool
) -> None:
    # A proxy reporting 100,000 cached tokens of a 100-token prompt: genai-prices cannot price that, the row was filed
    # `unpriced` for gpt-4o-mini (which has a price) and charged $0, so every request went through any budget free (QA).
    usage = RequestUsage(input_tokens=100, output_tokens=20, cache_read_tokens=100_000)
    row, _ = await _charged_for_a_claim(usage, streamed, f'cached-{streamed}')
    assert row['status'] == 'complete'
    assert (row['usage_reported'], row['price_source'], row['total_cost']) == (False, 'unmeasured', None)
    assert (row['input_tokens'], row['cache_read_tokens']) == (0, 0)


CLAIMS_PAST_THE_REQUEST = {
    # A proxy's 10^11 in and out, for a request sent with max_tokens 16,384 that held about $0.01: a $75,000 row, the
    # account's budget spent for its period, and the turn failed as over its token limit, "ask for less" (QA).
    'both-1e11': RequestUsage(input_tokens=10**11, output_tokens=10**11),
    'output-past-max-tokens': RequestUsage(input_tokens=300, output_tokens=10**9),
    'input-past-what-was-sent': RequestUsage(input_tokens=10**10, output_tokens=20),
}


@pytest.mark.parametrize('claim', list(CLAIMS_PAST_THE_REQUEST))
@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_an_answer_claiming_more_tokens_than_its_request_can_have_is_unmeasured_and_charged_its_hold(
    demo_data: None, streamed: bool, claim: str
) -> None:
    row, held = await _charged_for_a_claim(CLAIMS_PAST_THE_REQUEST[claim], streamed, f'{claim}-{streamed}')
    assert row['status'] == 'complete' and row['error_type'] is None
    assert (row['usage_reported'], row['price_source'], row['total_cost']) == (False, 'unmeasured', None)
    assert (row['input_tokens'], row['output_tokens']) == (0, 0)
    assert held < 1


async def test_an_answer_a_little_past_its_max_tokens_is_measured_and_priced(demo_data: None) -> None:
    # Providers overshoot max_tokens a little, or bill thinking beside it: that is still a measurement.
    await _set('acme-health', '100')
    model = _ClaimingModel(RequestUsage(input_tokens=300, output_tokens=3 * 16_384))
    result = await _turn('How many cardiologists?', 'overshoot', False, model, 'acme-health')
    assert model.max_tokens_seen == [16_384]
    assert (result.usage.unmeasured_requests, result.usage.output_tokens) == (0, 3 * 16_384)
    await _drain()
    (row,) = await ledger_rows(account_slug='acme-health', chat_session_id='overshoot')
    assert row['usage_reported'] and row['total_cost'] > 0 and row['output_tokens'] == 3 * 16_384
