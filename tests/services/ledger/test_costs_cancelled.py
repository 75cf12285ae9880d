"""Cancelled requests in the costs: counted apart from failed ones, the same in the ledger and the rollup.

The rows are written by real runs through the ledger capability (success, provider error, a plain request whose
task was cancelled, a stream the caller stopped, a request the budget refused), so each has the status the
capability gives it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCalls, FunctionModel
from pydantic_ai.usage import RequestUsage

from agentrt.db.errors import BudgetExceededError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.budgets import BudgetConfig
from agentrt.services.ledger import (
    LLMRequestTracker,
    recompute_usage_rollups,
    roll_up_pending,
    summarise_costs,
)
from agentrt.services.ledger import ledger_capability as ledger
from tests.factories import chat_deps, fast_config, ledger_rows
from tests.services.budgets.helpers import give_budget
from tests.services.ledger.usage_oracle import GROUPINGS, ledger_totals, rollup_totals

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def _answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[TextPart('done')], usage=RequestUsage(input_tokens=50, output_tokens=5))


def _overloaded(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    raise ModelHTTPError(status_code=503, model_name='gpt-4o-mini', body={'error': 'overloaded'})


async def _words(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
    for word in ('one ', 'two ', 'three ', 'four '):
        yield word


async def _every_outcome(alpha: int, tmp_path: Path) -> None:
    """One request of each outcome for account `alpha`: complete, error, cancelled (plain, streamed), refused."""
    tracker = LLMRequestTracker(fast_config(tmp_path))

    def agent(function: Any, **streaming: Any) -> Agent[Any, str]:
        model = FunctionModel(function, model_name='gpt-4o-mini', **streaming)
        return Agent(model, capabilities=[ledger(tracker, budget=BudgetConfig())])

    deps = chat_deps('s', alpha)
    assert (await agent(_answer).run('hi', deps=deps)).output == 'done'
    with pytest.raises(ModelHTTPError):
        await agent(_overloaded).run('hi', deps=deps)

    started = asyncio.Event()

    async def hang(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError('never answered')

    turn = asyncio.create_task(agent(hang).run('hi', deps=deps))
    await started.wait()
    turn.cancel()  # a cancelled turn: the request in flight is cancelled with it
    with pytest.raises(asyncio.CancelledError):
        await turn

    async with agent(_answer, stream_function=_words).run_stream('hi', deps=deps) as stream:
        async for delta in stream.stream_text(delta=True, debounce_by=None):
            if delta.startswith('two'):
                break  # the caller stops reading: the stream is cut

    await give_budget(alpha, '0')
    with pytest.raises(BudgetExceededError):
        await agent(_answer).run('hi', deps=deps)
    await tracker.flush()


async def test_cancelled_requests_are_counted_apart_from_failed_ones_in_both_sources(
    two_accounts: tuple[int, int], tmp_path: Path
) -> None:
    alpha, _ = two_accounts
    await _every_outcome(alpha, tmp_path)
    statuses = sorted((row['status'], row['streamed']) for row in await ledger_rows(account_id=alpha))
    assert statuses == [
        ('cancelled', False),
        ('cancelled', True),
        ('complete', False),
        ('error', False),
        ('refused', False),
    ]
    await roll_up_pending(LONG_AGO)

    async with get_db_session(account=Unscoped.ADMIN) as session:
        [account] = await summarise_costs(session=session, by='account')
        assert (account.key, account.requests, account.failed, account.cancelled) == (f'acct-{alpha}', 4, 1, 2)
        for by in GROUPINGS:
            from_ledger = await summarise_costs(session=session, by=by)
            assert await summarise_costs(session=session, by=by, source='rollup') == from_ledger, by
            # The independent oracle: the rollup's counters equal the ledger's, cancelled and failed included.
            assert await rollup_totals(by, session=session) == await ledger_totals(by, session=session), by
        [oracle] = await rollup_totals('account', session=session)
        assert (oracle.failed_requests, oracle.cancelled_requests) == (1, 2)

    today = datetime.now(UTC).date()
    assert await recompute_usage_rollups(today, today) == 1  # the recompute path counts them the same way
    async with get_db_session(account=Unscoped.ADMIN) as session:
        [rolled] = await summarise_costs(session=session, by='account', source='rollup')
    assert rolled == account
