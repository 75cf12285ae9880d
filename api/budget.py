"""`GET /api/v1/budget`: the caller's account budget, and what its current period has spent, holds and has left."""

from __future__ import annotations

from fastapi import APIRouter

from agentrt.api.auth import ReadCaller
from agentrt.api.schemas import ERROR_RESPONSES, BudgetOut
from agentrt.db.session import get_read_only_session
from agentrt.services.budgets import account_budget_status

router = APIRouter(prefix='/api/v1', tags=['budget'], responses=ERROR_RESPONSES)


@router.get('/budget', summary="The account's budget and its current period")
async def budget(caller: ReadCaller) -> BudgetOut:
    """The limit, the current period, what it spent, what requests in flight hold, and what is left
    (`limited: false` when the account has no budget). Set with `agentrt budget set`."""
    async with get_read_only_session(account=caller.account_id) as session:
        status = await account_budget_status(session=session, account=caller.account_id)
    return BudgetOut.of(status)
