"""The ledger capability holds the budget before each model request: `max_tokens` capped to the hold, refusals
recorded and raised before anything is sent, unpriced models counted or refused, holds of skipped requests released.
"""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from typing import Any

import pytest
from pydantic_ai import Agent, ModelResponse, TextPart
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.exceptions import ModelHTTPError, SkipModelRequest
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models import ModelRequestContext, ModelRequestParameters
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import RequestUsage
from sqlalchemy import text

from agentrt.db.errors import BudgetExceededError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.budgets import BudgetConfig, account_budget_status
from agentrt.services.ledger import LLMRequestTracker, ledger_capability
from tests.factories import chat_deps, fast_config, ledger_rows
from tests.services.budgets.helpers import give_budget, period_row, reservations
from tests.services.budgets.priced_model import PricedModel

ON = BudgetConfig()


def _agent(model: Any, tmp_path: Any, budget: BudgetConfig = ON, **options: Any) -> Agent[Any, str]:
    tracker = LLMRequestTracker(fast_config(tmp_path))
    return Agent(model, capabilities=[ledger_capability(tracker, budget=budget), *options.pop('extra', [])], **options)


async def _spent(account_id: int) -> tuple[Decimal, Decimal, int]:
    row = await period_row(account_id)
    assert row is not None
    return row['spent_usd'], row['reserved_usd'], row['spent_tokens']


async def test_without_a_budget_nothing_is_held_and_max_tokens_is_left_alone(
    two_accounts: tuple[int, int], tmp_path: Any
) -> None:
    model = PricedModel()
    result = await _agent(model, tmp_path).run('hi', deps=chat_deps('s', two_accounts[0]))
    assert result.output == 'ok' and model.max_tokens_seen == [None]
    assert await period_row(two_accounts[0]) is None


async def test_a_request_near_the_limit_gets_fewer_output_tokens_and_costs_no_more_than_its_hold(
    two_accounts: tuple[int, int], tmp_path: Any
) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '0.004')  # gpt-4o-mini: $0.6 per million output tokens, so well under 16,384 of them
    model = PricedModel()
    agent = _agent(model, tmp_path)
    await agent.run('hi', deps=chat_deps('s', alpha), model_settings={'max_tokens': 1000})
    assert model.max_tokens_seen == [1000], 'what the settings ask when it fits'
    await agent.run('hi', deps=chat_deps('s', alpha))
    capped = model.max_tokens_seen[-1]
    assert capped is not None and 256 <= capped < 16_384
    after, reserved, _ = await _spent(alpha)
    assert reserved == 0 and after <= Decimal('0.004'), 'it wrote all it was allowed, within the limit'
    with pytest.raises(BudgetExceededError) as refused:
        await agent.run('hi', deps=chat_deps('s', alpha))
    assert refused.value.reason == 'limit' and refused.value.limit_usd == Decimal('0.004')
    assert refused.value.needed_usd is not None and refused.value.spent_usd == after
    assert 'acct-' in str(refused.value) and 'it was not sent' in str(refused.value)
    assert len(model.max_tokens_seen) == 2, 'the refused request never reached the model'
    rows = await ledger_rows(status='refused')
    assert len(rows) == 1 and rows[0]['total_cost'] == 0 and rows[0]['error_type'] == 'BudgetExceededError'
    assert rows[0]['account_id'] == alpha and 'not sent' in rows[0]['error_message']


async def test_accounts_have_budgets_of_their_own(two_accounts: tuple[int, int], tmp_path: Any) -> None:
    alpha, beta = two_accounts
    await give_budget('alpha', '0')
    agent = _agent(PricedModel(), tmp_path)
    with pytest.raises(BudgetExceededError):
        await agent.run('hi', deps=chat_deps('s', alpha))
    assert (await agent.run('hi', deps=chat_deps('t', beta))).output == 'ok', 'beta has no budget'
    await give_budget('beta', '1')
    assert (await agent.run('hi', deps=chat_deps('t', beta))).output == 'ok'
    assert (await _spent(alpha))[0] == 0 and (await _spent(beta))[0] > 0


def _unpriced(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[TextPart('free')], usage=RequestUsage(input_tokens=40, output_tokens=2))


async def test_an_unpriced_model_is_refused_or_counted_as_configured(
    two_accounts: tuple[int, int], tmp_path: Any
) -> None:
    alpha, beta = two_accounts
    model = FunctionModel(_unpriced, model_name='my-local-llama')
    await give_budget('alpha', '5')
    with pytest.raises(BudgetExceededError) as refused:
        await _agent(model, tmp_path).run('hi', deps=chat_deps('s', alpha))
    assert refused.value.reason == 'unpriced' and 'AGENTRT_BUDGET_UNPRICED=count' in str(refused.value)
    assert (await _agent(model, tmp_path).run('hi', deps=chat_deps('s', beta))).output == 'free', 'no budget'
    counted = BudgetConfig(unpriced='count')
    await _agent(PricedModel(output_tokens=1), tmp_path).run('hi', deps=chat_deps('s', alpha))  # opens the window
    spent_before, _, tokens_before = await _spent(alpha)
    await _agent(model, tmp_path, counted).run('hi', deps=chat_deps('s', alpha))
    spent, reserved, tokens = await _spent(alpha)
    assert spent == spent_before and reserved == 0 and tokens == tokens_before + 42, 'tokens counted, 0 USD'


async def test_a_counted_unpriced_request_gives_its_window_the_row_budget_reads_use(
    two_accounts: tuple[int, int], tmp_path: Any
) -> None:
    # Counted, an unpriced request never reserved, so its window never got a row: every budget read summed the
    # window's ledger rows (1.25 s for a 365-day window of a million rows) until a priced request came.
    alpha, _ = two_accounts
    model = FunctionModel(_unpriced, model_name='my-local-llama')
    counted = BudgetConfig(unpriced='count')
    await _agent(model, tmp_path, counted).run('hi', deps=chat_deps('s', alpha))  # before the budget: 42 tokens
    await give_budget('alpha', '5', '365d')
    assert await period_row(alpha) is None
    await _agent(model, tmp_path, counted).run('hi', deps=chat_deps('s', alpha))
    assert await _spent(alpha) == (0, 0, 84), 'built from the ledger, then the request settled into it'
    # Reads use the row: with the ledger rows gone, they still show what the window holds.
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text('DELETE FROM llm_requests WHERE account_id = :a'), {'a': alpha})
    async with get_db_session(account=Unscoped.ADMIN) as session:
        status = await account_budget_status(session=session, account=alpha)
    assert status is not None and status.spent_tokens == 84 and status.spent_usd == 0


async def test_with_budgets_off_requests_are_not_held_but_their_cost_still_counts(
    two_accounts: tuple[int, int], tmp_path: Any
) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    await _agent(PricedModel(output_tokens=10), tmp_path).run('hi', deps=chat_deps('s', alpha))
    spent_before, _, _ = await _spent(alpha)
    model = PricedModel(output_tokens=10)
    await _agent(model, tmp_path, BudgetConfig(enabled=False)).run('hi', deps=chat_deps('s', alpha))
    assert model.max_tokens_seen == [None]
    spent, reserved, _ = await _spent(alpha)
    assert spent > spent_before and reserved == 0


class _SkipFromCache(AbstractCapability[Any]):
    async def before_model_request(self, ctx: Any, request_context: ModelRequestContext) -> ModelRequestContext:
        raise SkipModelRequest(ModelResponse(parts=[TextPart('cached')]))


async def test_a_request_a_hook_skips_gives_its_hold_back(two_accounts: tuple[int, int], tmp_path: Any) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    model = PricedModel()
    result = await _agent(model, tmp_path, extra=[_SkipFromCache()]).run('hi', deps=chat_deps('s', alpha))
    assert result.output == 'cached' and model.arrived == 0
    spent, reserved, _ = await _spent(alpha)
    assert spent == 0 and reserved == 0 and await reservations() == []


def _fails(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    raise ModelHTTPError(503, 'gpt-4o-mini', {'error': 'overloaded'})


async def test_a_request_the_provider_refuses_settles_at_zero(two_accounts: tuple[int, int], tmp_path: Any) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    with pytest.raises(ModelHTTPError):
        await _agent(FunctionModel(_fails, model_name='gpt-4o-mini'), tmp_path).run('hi', deps=chat_deps('s', alpha))
    spent, reserved, _ = await _spent(alpha)
    assert spent == 0 and reserved == 0
    (row,) = await ledger_rows(account_id=alpha)
    assert row['status'] == 'error' and row['error_status_code'] == 503


class _CountingModel(PricedModel):
    """A model whose provider counts tokens ahead of the request (as Anthropic's and Google's can)."""

    counted = 0

    async def count_tokens(
        self, messages: list[ModelMessage], model_settings: ModelSettings | None, parameters: ModelRequestParameters
    ) -> RequestUsage:
        type(self).counted += 1
        return RequestUsage(input_tokens=10)


async def test_the_input_is_counted_by_the_provider_where_the_model_can(
    two_accounts: tuple[int, int], tmp_path: Any
) -> None:
    alpha, _ = two_accounts
    await give_budget('alpha', '1')
    holds = []
    for budget in (ON, BudgetConfig(count_tokens=False)):
        model = _CountingModel(gate=asyncio.Event())
        run = asyncio.create_task(
            _agent(model, tmp_path, budget).run('hi', deps=chat_deps('s', alpha), model_settings={'max_tokens': 100})
        )
        while model.arrived == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        (held,) = await reservations(alpha)
        holds.append(held['amount_usd'])
        assert model.gate is not None
        model.gate.set()
        await run
    assert _CountingModel.counted == 1
    assert holds[0] < holds[1], 'ten counted tokens hold less than the byte bound of the request'
    await _agent(_CountingModel(), tmp_path).run('hi', deps=chat_deps('t', two_accounts[1]))
    assert _CountingModel.counted == 1, 'the provider is not asked to count for an account without a budget'


@pytest.mark.parametrize(('limit', 'shown'), [('0.000000000001', '$0.000000000001'), ('0.0000015', '$0.0000015')])
async def test_a_refusal_says_the_limit_as_set(
    two_accounts: tuple[int, int], tmp_path: Any, limit: str, shown: str
) -> None:
    # Amounts were rounded up to six decimals: a $0.000000000001 limit was said to be $0.000001, a million times it,
    # in the CLI's error line and the HTTP 429's detail (QA).
    alpha, _ = two_accounts
    await give_budget('alpha', limit)
    with pytest.raises(BudgetExceededError) as refused:
        await _agent(PricedModel(), tmp_path).run('hi', deps=chat_deps('s', alpha))
    said = str(refused.value)
    assert f': $0.00 spent of its {shown} limit for the period ' in said, said
    needed = re.search(r'needs at least \$(0\.\d+) ', said)
    assert needed is not None and Decimal(needed.group(1)) >= refused.value.needed_usd, said  # rounded up, if at all
