"""Tenants and ledger rows for the rollup and cost tests, written directly (no tracker) with chosen times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from agentrt.db.models import Account, AgentInstance
from agentrt.db.session import Unscoped, get_db_session
from tests.factories import ledger_record, write_ledger_row


async def tenants(n_accounts: int = 3) -> list[tuple[int, int]]:
    """(account id, agent instance id) pairs: two agents per account."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        pairs = []
        for a in range(n_accounts):
            account = Account(slug=f'acct-{a}', name=f'Account {a}')
            session.add(account)
            await session.flush()
            for g in range(2):
                agent = AgentInstance(account_id=account.id, slug=f'agent-{g}', agent_type='simple_chat')
                session.add(agent)
                await session.flush()
                pairs.append((account.id, agent.id))
        return pairs


async def ledger_row(
    account_id: int | None,
    agent_instance_id: int | None,
    *,
    model: str = 'gpt-4o-mini',
    started_at: datetime | None = None,
    recorded_at: datetime | None = None,
    tokens: tuple[int, int] = (100, 20),
    cost: Decimal | None = Decimal('0.000123'),
    success: bool = True,
    run_id: str | None = None,
    response_model: str | None = None,
    agent_name: str | None = 'simple_chat',
) -> None:
    """Write one ledger row in its own session, as the ledger tracker does (recorded when it started by default)."""
    started = started_at or datetime.now(UTC)
    input_tokens, output_tokens = tokens
    record = ledger_record(
        success=success,
        started_at=started,
        cost=cost,
        run_id=run_id,
        account_id=account_id,
        account_slug=None if account_id is None else f'account-{account_id}',
        agent_instance_id=agent_instance_id,
        agent_instance_slug=None if agent_instance_id is None else f'agent-{agent_instance_id}',
        agent_name=agent_name,
        model=model,
        response_model=response_model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=input_tokens // 10,
        reasoning_tokens=output_tokens // 4,
        total_tokens=input_tokens + output_tokens,
        input_cost=None if cost is None else cost / 2,
        output_cost=None if cost is None else cost / 2,
        finished_at=started + timedelta(milliseconds=12),
    )
    await write_ledger_row(record, recorded_at=recorded_at)
