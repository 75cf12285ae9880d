"""`GET /api/v1/budget` for the caller's account, and a turn the budget refuses: 429 with the budget's figures."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import httpx2
import pytest
from openai import AsyncOpenAI
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from agentrt.api.app import create_app
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.budgets import Period, budget_statuses, pricer_for, set_budget
from agentrt.services.ledger import get_request_tracker
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, auth, chat_body, of_type, serve, sse_events, stream_chat
from tests.factories import ledger_record, ledger_rows, scalar, write_ledger_row
from tests.fake_openai import FakeOpenAI, Reply
from tests.services.budgets.helpers import period_row
from tests.services.budgets.priced_model import LongAnswerModel, PricedModel


async def _budget(account: str, limit: str) -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await set_budget(session=session, account=account, limit_usd=Decimal(limit), period=Period('day'))


async def _spent(account_id: int) -> Decimal:
    """What the account's budget says it spent this period."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        (status,) = await budget_statuses(session=session, account_id=account_id)
    return status.spent_usd


def _client(model: PricedModel) -> httpx2.AsyncClient:
    transport = httpx2.ASGITransport(app=create_app(manage_runtime=False, model=model), raise_app_exceptions=False)
    return httpx2.AsyncClient(transport=transport, base_url='http://test', timeout=30)


async def test_the_budget_of_the_callers_account(keys: Keys) -> None:
    async with _client(PricedModel()) as client:
        none = await client.get('/api/v1/budget', headers=auth(keys.acme))
        assert none.status_code == 200 and none.json() == {
            'limited': False,
            **dict.fromkeys(('limit_usd', 'period', 'period_start', 'period_end', 'spent_usd')),
            **dict.fromkeys(('reserved_usd', 'remaining_usd', 'holds', 'refused_requests')),
        }
        await _budget('acme-health', '5')
        turn = await client.post('/api/v1/conversations/b1/turns', json={'message': 'hi'}, headers=auth(keys.acme))
        assert turn.status_code == 200, turn.text
        await get_request_tracker().flush()
        body = (await client.get('/api/v1/budget', headers=auth(keys.acme))).json()
        assert body['limited'] is True and body['limit_usd'] == '5' and body['period'] == 'day'
        assert Decimal(body['spent_usd']) > 0 and body['reserved_usd'] == '0' and body['holds'] == 0
        assert Decimal(body['remaining_usd']) == 5 - Decimal(body['spent_usd'])
        other = (await client.get('/api/v1/budget', headers=auth(keys.green))).json()
        assert other['limited'] is False, "another account's budget is its own"
        assert (await client.get('/api/v1/budget', headers=auth(keys.acme_chat_only))).status_code == 403
        assert (await client.get('/api/v1/budget')).status_code == 401


async def test_a_turn_the_budget_refuses_answers_429_and_saves_nothing(keys: Keys) -> None:
    await _budget('acme-health', '0')
    model = PricedModel()
    async with _client(model) as client:
        refused = await client.post('/api/v1/conversations/b2/turns', json={'message': 'hi'}, headers=auth(keys.acme))
        assert refused.status_code == 429
        body = refused.json()
        assert body['type'] == 'budget_exceeded' and body['reason'] == 'limit' and body['limit_usd'] == '0'
        assert body['detail'].startswith("the budget of account 'acme-health' does not cover")
        assert Decimal(body['needed_usd']) > 0 and body['period_end'] and body['error_id'].startswith('err_')
        # One spelling of a time in the API: the refusal's period end was `...+00:00`, the budget's `...Z` (QA).
        budget = (await client.get('/api/v1/budget', headers=auth(keys.acme))).json()
        assert body['period_end'] == budget['period_end'] and body['period_end'].endswith('Z'), body
        # Streamed, the refusal comes after the response started: it is the stream's error event.
        streamed = await client.post('/api/v1/chat', json=chat_body('b3', 'hi'), headers=auth(keys.acme))
        assert streamed.status_code == 200
        (error,) = of_type(sse_events(streamed.text), 'error')
        assert error['errorText'].startswith("the budget of account 'acme-health' does not cover")
        conversations = await client.get('/api/v1/conversations', headers=auth(keys.acme))
        assert conversations.json()['items'] == [], 'nothing saved'
        await get_request_tracker().flush()
        await get_supervisor().join()
        audit = (await client.get('/api/v1/llm-audit/interactions', headers=auth(keys.acme))).json()
        assert [(item['status'], item['total_cost']) for item in audit['items']] == [('refused', '0')] * 2
    assert model.arrived == 0, 'nothing reached the model'
    assert len(await ledger_rows(status='refused')) == 2


async def test_tiny_amounts_are_plain_decimal_strings_never_exponents(keys: Keys) -> None:
    # pydantic writes `str()` of a decimal: `1E-9` for a limit under a millionth, `1.5E-7` for a cost.
    await _budget('acme-health', '0.000000001')
    async with _client(PricedModel()) as client:
        budget = (await client.get('/api/v1/budget', headers=auth(keys.acme))).json()
        assert (budget['limit_usd'], budget['remaining_usd']) == ('0.000000001', '0.000000001'), budget
        acme = await account_id('acme-health')
        await write_ledger_row(ledger_record(cost='0.00000015', account_id=acme, account_slug='acme-health'))
        refused = await client.post('/api/v1/conversations/b4/turns', json={'message': 'hi'}, headers=auth(keys.acme))
        assert refused.status_code == 429 and refused.json()['limit_usd'] == '0.000000001', refused.text
        audit = (await client.get('/api/v1/llm-audit/interactions', headers=auth(keys.acme))).json()
        costs = (await client.get('/api/v1/costs?source=ledger', headers=auth(keys.acme))).json()
        await get_request_tracker().flush()
    assert '0.00000015' in [item['total_cost'] for item in audit['items']], audit
    assert [item['total_cost'] for item in costs['items']] == ['0.00000015'], costs
    for body in (budget, refused.json(), audit, costs):
        assert 'E-' not in json.dumps(body), body


async def _hold_of_a_turn(client: httpx2.AsyncClient, key: str, model: PricedModel) -> Decimal:
    """What one JSON turn of `hi` holds (the same for every such turn: same prompt, same size class)."""
    gate = asyncio.Event()
    model.gate = gate
    turn = asyncio.create_task(
        client.post('/api/v1/conversations/probe/turns', json={'message': 'hi'}, headers=auth(key))
    )
    while model.arrived == 0:  # noqa: ASYNC110 - the model counts arrivals
        await asyncio.sleep(0.005)
    held = await scalar('SELECT amount_usd FROM budget_reservations')
    gate.set()
    assert (await turn).status_code == 200
    await get_request_tracker().flush()
    return held


@pytest.mark.parametrize('route', ['json', 'streamed'])
async def test_racing_turns_of_one_account_are_admitted_as_far_as_its_limit_and_refused_429(
    keys: Keys, route: str
) -> None:
    # A hostile tenant fires 30 turns at once at a budget that fits two: two reach the model, the rest are refused
    # before anything is sent (429 budget_exceeded, or the stream's error event), billed nothing.
    turns, fits = 30, 2
    model = PricedModel()
    acme = await account_id('acme-health')
    await _budget('acme-health', '1000')
    async with _client(model) as client:
        hold = await _hold_of_a_turn(client, keys.acme, model)
        spent_before = Decimal((await client.get('/api/v1/budget', headers=auth(keys.acme))).json()['spent_usd'])
        limit = spent_before + hold * fits + hold / 1000
        await _budget('acme-health', str(limit))
        gate = asyncio.Event()
        model.gate, model.arrived = gate, 0

        def send(i: int) -> Any:
            if route == 'json':
                return client.post(
                    f'/api/v1/conversations/race-{i}/turns', json={'message': 'hi'}, headers=auth(keys.acme)
                )
            return client.post('/api/v1/chat', json=chat_body(f'race-{i}', 'hi'), headers=auth(keys.acme))

        sent = [asyncio.create_task(send(i)) for i in range(turns)]
        try:
            while model.arrived + sum(t.done() for t in sent) < turns:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            window = await period_row(acme)
            assert window is not None and model.arrived == fits
            assert window['spent_usd'] + window['reserved_usd'] <= limit
        finally:
            gate.set()
            answers = await asyncio.gather(*sent)
        await get_request_tracker().flush()
        await get_supervisor().join()
        budget = (await client.get('/api/v1/budget', headers=auth(keys.acme))).json()
    if route == 'json':
        codes = sorted(answer.status_code for answer in answers)
        assert codes == [200] * fits + [429] * (turns - fits), codes
        assert all(a.json()['type'] == 'budget_exceeded' for a in answers if a.status_code == 429)
    else:
        errors = [of_type(sse_events(answer.text), 'error') for answer in answers]
        assert sum(1 for e in errors if not e) == fits
        assert all('does not cover' in e[0]['errorText'] for e in errors if e)
    rows = [row for row in await ledger_rows(account_slug='acme-health') if row['chat_session_id'].startswith('race-')]
    assert sorted(row['status'] for row in rows) == ['complete'] * fits + ['refused'] * (turns - fits)
    assert all(row['total_cost'] == 0 for row in rows if row['status'] == 'refused')
    spent = Decimal(budget['spent_usd'])
    assert spent == spent_before + sum(row['total_cost'] for row in rows if row['status'] == 'complete')
    assert spent <= limit and budget['reserved_usd'] == '0' and budget['holds'] == 0
    assert budget['refused_requests'] == turns - fits


async def test_a_stream_whose_client_hangs_up_mid_answer_is_charged_once_for_what_it_streamed(keys: Keys) -> None:
    # The client reads the answer's first words and hangs up: the turn is cancelled, its hold given back, and it is
    # charged once, for its input and the output the provider had streamed (the provider bills it), not its input
    # alone (the answer was free against the budget before: usage comes at a stream's end).
    await _budget('acme-health', '100')
    acme = await account_id('acme-health')
    model = LongAnswerModel()
    spent_before = await _spent(acme)
    async for url in serve(create_app(manage_runtime=False, model=model)):
        async with httpx2.AsyncClient(base_url=url, timeout=30) as client:
            status, events = await stream_chat(
                client,
                keys.acme,
                chat_body('hung-up', 'Write an essay'),
                stop=lambda e: isinstance(e, dict) and e.get('type') == 'text-delta',
            )
        assert status == 200 and of_type(events, 'text-delta')
        for _ in range(500):  # the server notices the hang-up and cancels the turn
            await get_request_tracker().flush()
            if await ledger_rows(chat_session_id='hung-up'):
                break
            await asyncio.sleep(0.02)
        model.resume.set()
    await get_supervisor().join()
    (row,) = await ledger_rows(chat_session_id='hung-up')
    assert row['status'] == 'cancelled' and not row['usage_reported']
    window = await period_row(acme)
    assert (
        window is not None
        and window['reserved_usd'] == 0
        and await scalar('SELECT count(*) FROM budget_reservations') == 0
    )
    (held,) = model.held
    pricer = pricer_for(model)
    assert pricer is not None
    assert row['output_bound_usd'] >= pricer.cost(0, model.produced_tokens, row['started_at']), 'what it streamed'
    assert window['spent_usd'] - spent_before == min(held.amount_usd, held.input_usd + row['output_bound_usd']), (
        'charged once'
    )


@pytest.mark.usefixtures('allow_loopback_model_requests')  # only ever to the loopback server
async def test_a_stream_the_provider_drops_mid_answer_is_charged_for_what_it_streamed(keys: Keys) -> None:
    # The provider's connection drops after the whole text and before its usage: charged for that text too, beside the
    # input's share that a drop before any text is charged.
    words = 400
    replies = iter(
        [
            Reply(text='word ' * words, chunks=10, fault='drop', fault_after=1),  # only the role chunk
            Reply(text='word ' * words, chunks=10, fault='drop', fault_after=11),  # every piece of the text
        ]
    )
    await _budget('acme-health', '100')
    acme = await account_id('acme-health')
    spent = []
    with FakeOpenAI(lambda body: next(replies)).running() as fake:  # type: ignore[arg-type]
        openai_client = AsyncOpenAI(base_url=fake.base_url, api_key='sk-test', max_retries=0)
        model = OpenAIChatModel('gpt-4o-mini', provider=OpenAIProvider(openai_client=openai_client))
        transport = httpx2.ASGITransport(app=create_app(manage_runtime=False, model=model), raise_app_exceptions=False)
        async with httpx2.AsyncClient(transport=transport, base_url='http://test', timeout=30) as client:
            for conversation in ('dropped-1', 'dropped-2'):
                answer = await client.post('/api/v1/chat', json=chat_body(conversation, 'hi'), headers=auth(keys.acme))
                assert of_type(sse_events(answer.text), 'error'), answer.text
                await get_request_tracker().flush()
                window = await period_row(acme)
                assert window is not None and window['reserved_usd'] == 0
                spent.append(window['spent_usd'])
        await openai_client.close()
    rows = await ledger_rows(account_slug='acme-health')
    assert [(row['status'], row['usage_reported']) for row in rows] == [('error', False)] * 2
    pricer = pricer_for(model)
    assert pricer is not None
    quiet, loud = spent[0], spent[1] - spent[0]
    assert rows[0]['output_bound_usd'] is None and rows[1]['output_bound_usd'] >= pricer.cost(
        0, words, rows[1]['started_at']
    )
    assert quiet > 0 and loud == quiet + rows[1]['output_bound_usd'], 'the same input, and its text once'
