"""Helpers shared by the ledger tests: a fast-retrying tracker configuration and row readers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import text

from agentrt.db.session import get_db_session
from agentrt.services.ledger._config import LedgerConfig
from agentrt.services.ledger._retry import RetryPolicy
from agentrt.tools.dependencies import SessionDependencies


def fast_config(tmp_path: Path, **overrides: Any) -> LedgerConfig:
    """A configuration with a private spool file and retries measured in milliseconds."""
    options: dict[str, Any] = {
        'spool_path': tmp_path / 'spool' / 'llm-ledger.jsonl',
        'retry': RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, attempt_timeout=10),
    }
    options.update(overrides)
    return LedgerConfig(**options)


def chat_deps(session_id: str = 'chat-1', account_id: int = 7, agent_instance_id: int = 70) -> SessionDependencies:
    """Identity for a run (the accounts need not exist: the ledger has no foreign key to them)."""
    return SessionDependencies(
        session_id=session_id,
        account_id=account_id,
        account_slug=f'acct-{account_id}',
        agent_instance_id=agent_instance_id,
        agent_instance_slug=f'agent-{agent_instance_id}',
        agent_type='simple_chat',
    )


async def ledger_rows(**where: Any) -> list[dict[str, Any]]:
    """Ledger rows, oldest first, optionally filtered by equality on columns."""
    clause = ' AND '.join(f'{name} = :{name}' for name in where) or 'TRUE'
    async with get_db_session() as session:
        result = await session.execute(
            text(f'SELECT * FROM llm_requests WHERE {clause} ORDER BY started_at, id'),
            where,
        )
        return [dict(row) for row in result.mappings()]


async def content_rows(request_id: Any = None) -> list[dict[str, Any]]:
    """Content rows, for one request or all."""
    async with get_db_session() as session:
        if request_id is None:
            result = await session.execute(text('SELECT * FROM llm_request_contents ORDER BY request_id, kind'))
        else:
            result = await session.execute(
                text('SELECT * FROM llm_request_contents WHERE request_id = :id ORDER BY kind'), {'id': request_id}
            )
        return [dict(row) for row in result.mappings()]


async def scalar(sql: str, **params: Any) -> Any:
    """One value from a query."""
    async with get_db_session() as session:
        return (await session.execute(text(sql), params)).scalar()
