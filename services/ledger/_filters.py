"""`LedgerFilters`: which model requests a listing or a cost report covers, as SQL on the ledger or the daily rollup."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Literal

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.errors import AgentRuntimeError
from agentrt.db.models.ledger import LLMRequestRow
from agentrt.db.models.tenancy import Account
from agentrt.db.models.usage_rollups import UsageDailyRollup
from agentrt.services.pg_text import storable_text

CostSource = Literal['ledger', 'rollup']
"""`ledger`: scan `llm_requests`; `rollup`: read `usage_daily_rollups` (per UTC day, no success or session)."""


_READ_THE_LEDGER = 'read the ledger (source=ledger, or --source ledger)'
"""What a refusal tells the caller to do instead (`agentrt costs` does it by itself)."""


class RollupCannotAnswer(AgentRuntimeError):
    """The filters need the ledger itself: success, chat session, model, or a time that is not a UTC midnight."""


@dataclass(frozen=True)
class LedgerFilters:
    """Which ledger rows to include. Every field is optional; all given ones must match."""

    success: bool | None = None
    account: str | int | None = None
    """An account id, or an account slug."""
    agent: str | None = None
    """An agent instance slug, or an agent name."""
    model: str | None = None
    """The requested model name, or the one the provider reported (a ledger filter: the rollup has requested names)."""
    chat_session_id: str | None = None
    since: datetime | None = None
    """Requests started at or after this time."""
    until: datetime | None = None
    """Requests started before this time."""

    def __post_init__(self) -> None:
        # Text is matched as the ledger stores it (`storable_row`): NUL and lone surrogates as U+FFFD. So a filter
        # finds the rows of the same value (an agent named with a NUL), and one the driver cannot send (a lone
        # surrogate from an undecodable argument) is no driver error.
        for name in ('account', 'agent', 'model', 'chat_session_id'):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, storable_text(value))

    async def resolved(self, session: AsyncSession) -> LedgerFilters:
        """These filters with an account slug replaced by its account's id, read once from `accounts`.

        Rows are matched by `account_id`, which the ledger indexes with `started_at`; its `account_slug` has no
        index, so a slug read the table (0.8 s to list a small account's old rows at a million rows, 0.13 ms by id).
        A slug no account has (a deleted account's: its rows keep the slug) stays a match on the rows' slug.
        """
        if not isinstance(self.account, str):
            return self
        found = (await session.execute(select(Account.id).where(Account.slug == self.account))).scalar_one_or_none()
        return self if found is None else dataclasses.replace(self, account=found)

    def conditions(self, source: CostSource = 'ledger') -> list[ColumnElement[bool]]:
        """The filters as SQL conditions (values bound as parameters) on the ledger or on the daily rollup.

        Raises:
            RollupCannotAnswer: `source` is `'rollup'` and a filter needs the ledger (success, chat session, model,
                or a time that is not a UTC day boundary).
        """
        return self._ledger_conditions() if source == 'ledger' else self._rollup_conditions()

    def _ledger_conditions(self) -> list[ColumnElement[bool]]:
        row = LLMRequestRow
        conditions = self._tenant_conditions(row)
        if self.success is not None:
            conditions.insert(0, row.success.is_(self.success))
        if self.model is not None:
            conditions.append(or_(row.model == self.model, row.response_model == self.model))
        if self.chat_session_id is not None:
            conditions.append(row.chat_session_id == self.chat_session_id)
        if self.since is not None:
            conditions.append(row.started_at >= self.since)
        if self.until is not None:
            conditions.append(row.started_at < self.until)
        return conditions

    def _rollup_conditions(self) -> list[ColumnElement[bool]]:
        if self.success is not None or self.chat_session_id is not None:
            raise RollupCannotAnswer(f'the usage rollup has no success or chat-session breakdown; {_READ_THE_LEDGER}')
        if self.model is not None:
            # The rollup keeps requested names only: a name a provider reported (as `audit show` shows it) answered
            # nothing, a silent $0, or part of the ledger's total where other requests asked for it by name (QA).
            raise RollupCannotAnswer(
                f'the usage rollup keeps requested model names, not those providers reported; {_READ_THE_LEDGER}'
            )
        rollup = UsageDailyRollup
        conditions = self._tenant_conditions(rollup)
        if self.since is not None:
            conditions.append(rollup.day >= _utc_day(self.since, 'since'))
        if self.until is not None:
            conditions.append(rollup.day < _utc_day(self.until, 'until'))
        return conditions

    def _tenant_conditions(self, table: type[LLMRequestRow] | type[UsageDailyRollup]) -> list[ColumnElement[bool]]:
        """Account and agent: both tables carry the same id and label columns.

        The agent's name is part of the rollup's key (migration 0021), so a name picks the rollup's buckets of just
        that agent's requests, as it picks the ledger's rows: with it a label, agents sharing an instance (or without
        one) were one bucket under the greatest name, which answered for all of them (QA).
        """
        conditions: list[ColumnElement[bool]] = []
        if isinstance(self.account, int):
            conditions.append(table.account_id == self.account)
        elif self.account is not None:  # unindexed: `resolved()` first makes a live account's slug its id
            conditions.append(table.account_slug == self.account)
        if self.agent is not None:
            conditions.append(or_(table.agent_instance_slug == self.agent, table.agent_name == self.agent))
        return conditions


def _utc_day(moment: datetime, what: str) -> date:
    utc = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    if utc.time() != time.min:
        raise RollupCannotAnswer(
            f'{what} {moment.isoformat()} is not a UTC day boundary; the rollup is per day: {_READ_THE_LEDGER}'
        )
    return utc.date()
