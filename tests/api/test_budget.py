"""`GET /api/v1/budget` for the caller's account, and a turn the budget refuses: 429 with the budget's figures."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx2

from agentrt.api.app import create_app
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.budgets import Period, set_budget
from agentrt.services.ledger import get_request_tracker
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, auth, chat_body, of_type, sse_events
from tests.factories import ledger_record, ledger_rows, write_ledger_row
from tests.services.budgets.priced_model import PricedModel


async def _budget(account: str, limit: str) -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await set_budget(session=session, account=account, limit_usd=Decimal(limit), period=Period('day'))


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
