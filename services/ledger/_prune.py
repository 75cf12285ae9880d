"""Removing stored prompts and responses (`llm_request_contents`) while keeping the billing rows (`llm_requests`).

The bodies are most of a database's disk (a long conversation's prompt resends its whole history), and nothing else
ever removes them: deleting a conversation keeps its audit. `prune_contents` deletes them in batches, one
transaction each, so it never holds many locks for long and can run beside a serving process.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import String, cast, delete, distinct, exists, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.errors import InvalidInputError
from agentrt.db.models.ledger import LLMRequestContentRow, LLMRequestRow
from agentrt.db.models.tenancy import Account
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger._filters import LedgerFilters

PRUNE_BATCH_REQUESTS = 3_000
"""Requests whose bodies one transaction deletes: at most three bodies each (prompt, response, error), so under
10,000 rows, a few seconds of work at most, well inside the default `DB_STATEMENT_TIMEOUT_MS`."""


@dataclass(frozen=True)
class PruneReport:
    """What `prune_contents` removed."""

    bodies: int
    """Stored bodies (`llm_request_contents` rows) deleted."""
    bytes: int
    """Their size as PostgreSQL stored them (compressed), the table space they held."""
    requests: int
    """Model requests whose bodies were deleted; their billing rows are kept."""


async def prune_contents(
    *,
    before: datetime | None = None,
    account: str | int | None = None,
    conversation: str | None = None,
    batch_requests: int = PRUNE_BATCH_REQUESTS,
) -> PruneReport:
    """Delete the stored prompts, responses and errors of the model requests selected, keeping their ledger rows.

    Runs as the operator (`Unscoped.ADMIN`) in transactions of its own, one per batch of `batch_requests` requests,
    each under the configured `statement_timeout` and `lock_timeout`: a batch failing leaves the ones before it
    done, and running it again goes on where it stopped. Requests are walked by id from the oldest one still holding
    a body, so a scheduled run does not walk the history pruned before.

    Args:
        before: only requests started before this moment.
        account: only requests of this account (an id, or the slug its ledger rows carry).
        conversation: only requests of this conversation (the ledger's `chat_session_id`).
        batch_requests: requests per transaction.

    Returns:
        How many bodies (and bytes) were removed, of how many requests.

    Raises:
        InvalidInputError: neither `before` nor `conversation` is given (that would remove every body), or `before`
            is in the future.
    """
    if before is None and conversation is None:
        raise InvalidInputError('give a time to prune before, a conversation, or both', field='before')
    if before is not None and before > datetime.now(UTC):
        raise InvalidInputError(f'{before.isoformat()} is in the future', field='before')
    request, content = LLMRequestRow, LLMRequestContentRow
    filters = LedgerFilters(account=account, chat_session_id=conversation, until=before)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        conditions = (await filters.resolved(session)).conditions()
    # `min()` has no uuid version before PostgreSQL 17: the primary key's first entry instead.
    oldest = select(content.request_id).order_by(content.request_id).limit(1).scalar_subquery()
    after: uuid.UUID | None = None
    bodies = size = requests = 0
    while True:
        walked = [request.id >= oldest, exists().where(content.request_id == request.id)]
        if after is not None:
            walked.append(request.id > after)
        batch = select(request.id).where(*conditions, *walked).order_by(request.id).limit(batch_requests).cte('batch')
        gone = (
            delete(content)
            .where(content.request_id.in_(select(batch.c.id)))
            .returning(content.request_id, func.pg_column_size(content.body).label('size'))
            .cte('gone')
        )
        statement = select(
            select(batch.c.id).order_by(batch.c.id.desc()).limit(1).scalar_subquery(),
            func.count(),
            func.count(distinct(gone.c.request_id)),
            func.coalesce(func.sum(gone.c.size), 0),
        ).select_from(gone)
        async with get_db_session(account=Unscoped.ADMIN) as session:
            last, deleted, of_requests, deleted_bytes = (await session.execute(statement)).one()
        if last is None:
            return PruneReport(bodies=bodies, bytes=size, requests=requests)
        after = last
        bodies, size, requests = bodies + deleted, size + int(deleted_bytes), requests + of_requests


async def conversation_accounts(
    *, session: AsyncSession, conversation: str, account: str | int | None = None
) -> list[str]:
    """The accounts (their slugs, or ids where a row has no slug) whose model requests carry `conversation` as their
    chat session, of `account` only when it is given, sorted: empty for a conversation the ledger does not know.

    A conversation id is unique within its account only: what `agentrt audit prune --conversation` checks before it
    deletes anything.
    """
    row = LLMRequestRow
    label = func.coalesce(row.account_slug, cast(row.account_id, String), '-')
    filters = await LedgerFilters(account=account, chat_session_id=conversation).resolved(session)
    query = select(label).where(*filters.conditions()).distinct().order_by(label)
    return list((await session.execute(query)).scalars())


async def ledger_knows_account(*, session: AsyncSession, account: str | int) -> bool:
    """Whether a ledger row carries `account` (an id, or a slug): a deleted account's rows are kept and named so."""
    filters = await LedgerFilters(account=account).resolved(session)
    rows = select(LLMRequestRow.id).where(*filters.conditions())
    return bool((await session.execute(select(exists(rows)))).scalar_one())


async def account_count(*, session: AsyncSession) -> int:
    """How many accounts exist."""
    return int((await session.execute(select(func.count()).select_from(Account))).scalar_one())
