"""The database work of one chat turn, counted from SQLAlchemy's events, so it cannot silently grow (issue 20).

Not timed: sessions (pool checkouts) and statements (`before_cursor_execute`) of the fourth demo turn of a conversation
(3 model requests, 7 tool calls), with its ledger rows written and its post-turn work done. Each session is named by
its first statement.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text

from agentrt.agents.simple_chat import simple_chat
from agentrt.db.engine import current_settings
from agentrt.db.errors import BudgetExceededError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.ledger import get_request_tracker
from tests.factories import listening
from tests.services.budgets.helpers import give_budget

QUESTION = 'Find me cardiologists in Seattle who accept Medicare'
STATEMENTS_BUDGET = 20
# One session per tool call (7: a session per operation), one for the turn's ledger rows (the writer holds a ready row
# for up to its commit delay, and the run's end commits what it holds: at demo speed the three rows, in one statement),
# and the turn's own two: the start (tenant, claim, tail load) and the save (which releases the claim and stores a
# title and summary that are due).
SESSIONS_BUDGET = {'tool call': 7, 'ledger': 1, 'turn start': 1, 'turn save': 1}
SUMMARISED = text(
    'SELECT summary_head_id = head_id AND title IS NOT NULL AND summary IS NOT NULL FROM conversations '
    'WHERE conversation_id = :c'
)
KINDS = (
    ('SELECT accounts.id', 'turn start'),
    ('WITH swapped AS', 'turn save'),
    ('INSERT INTO llm_requests', 'ledger'),
    ('directory_entries', 'tool call'),
    ('UPDATE conversations SET title', 'summary'),
    ('usage_rolled_up_requests', 'usage rollup'),
    ('pg_advisory_xact_lock_shared($1, $2)', 'usage rollup'),
    ('UPDATE conversation_turns', 'turn check'),
)


@dataclass
class Meter:
    """Sessions by the kind of their first statement, and every statement."""

    sessions: Counter[str] = field(default_factory=Counter)
    statements: list[str] = field(default_factory=list)
    _unnamed: set[int] = field(default_factory=set)

    def checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        self._unnamed.add(id(dbapi_connection))

    def statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(' '.join(statement.split()))
        dbapi_connection = id(conn.connection.dbapi_connection)
        if dbapi_connection in self._unnamed:
            self._unnamed.discard(dbapi_connection)
            self.sessions[next((kind for text, kind in KINDS if text in statement), statement[:60])] += 1


@contextmanager
def metered() -> Iterator[Meter]:
    meter = Meter()
    with listening(('checkout', meter.checkout), ('before_cursor_execute', meter.statement)):
        yield meter


async def _turn(session_id: str) -> None:
    await simple_chat(QUESTION, session_id=session_id, account='acme-health')
    await get_request_tracker().flush()
    await get_supervisor().join()


async def test_a_demo_turn_stays_within_its_database_budget(
    demo_data: None, long_commit_delay: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = current_settings()
    # What the turn does at demo speed: no usage roll-up landing in the window (one per interval, whichever turn it
    # lands in), and no check of the claim (one statement per request once a second has passed, on slow models) on
    # a machine slow enough to take a second.
    monkeypatch.setattr(settings, 'usage_rollup_seconds', 600.0)
    monkeypatch.setattr(settings, 'turn_check_seconds', settings.turn_lease_seconds)
    # Every turn is due its title and summary: the measured turn is the one with the most to do.
    monkeypatch.setattr(settings, 'summary_every_turns', 1)
    for _ in range(3):
        await _turn('budget')
    with metered() as meter:
        await _turn('budget')

    assert len(meter.statements) <= STATEMENTS_BUDGET, meter.statements
    # The turn start: the tenant, then the claim and the tail load in one statement.
    claims = [s for s in meter.statements if 'INSERT INTO conversation_turns' in s]
    assert len(claims) == 1 and 'WITH RECURSIVE claimed AS' in claims[0] and 'walk' in claims[0], claims
    assert not meter.statements or all('SET TRANSACTION' not in s for s in meter.statements), 'read-only rides on BEGIN'
    schema_checks = [s for s in meter.statements if 'EXISTS' in s and 'directory_entries' in s]
    assert not schema_checks, 'no schema check before a search that found rows'
    assert meter.sessions['tool call'] == SESSIONS_BUDGET['tool call'], meter.sessions
    assert meter.sessions['ledger'] == SESSIONS_BUDGET['ledger'], meter.sessions
    assert meter.sessions['turn start'] == 1 and meter.sessions['turn save'] == 1, meter.sessions
    # The title and summary rode on the save, and nothing else opened a session.
    assert set(meter.sessions) <= set(SESSIONS_BUDGET), meter.sessions
    async with get_db_session(account=Unscoped.ADMIN) as session:
        summarised = (await session.execute(SUMMARISED, {'c': 'budget'})).scalar_one()
    assert summarised, 'the save stored the title and summary of the head it wrote'
    assert meter.sessions.total() <= sum(SESSIONS_BUDGET.values())


async def test_a_first_turn_adds_only_the_accounts_first_usage_rollup(
    demo_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = current_settings()
    monkeypatch.setattr(settings, 'usage_rollup_seconds', 600.0)
    monkeypatch.setattr(settings, 'turn_check_seconds', settings.turn_lease_seconds)
    with metered() as meter:
        await _turn('first')
    # The first turn's title and summary are stored by its save: no session of their own.
    assert meter.sessions['usage rollup'] == 1, meter.sessions  # the account's first roll-up runs at once
    assert set(meter.sessions) <= {*SESSIONS_BUDGET, 'usage rollup'}, meter.sessions
    assert len(meter.statements) <= STATEMENTS_BUDGET + 2, meter.statements


async def test_a_budget_set_before_a_turn_holds_its_requests(demo_data: None) -> None:
    # The turn's start reads whether the account has a budget with the tenant (no statement of its own), and a turn
    # that found none checks nothing per request; a budget set before the turn applies to it: the demo model has no
    # price, and AGENTRT_BUDGET_UNPRICED=refuse (the default) refuses its first request.
    await simple_chat(QUESTION, session_id='before-budget', account='acme-health')
    await give_budget('acme-health', '5')
    with pytest.raises(BudgetExceededError, match='has no price'):
        await simple_chat(QUESTION, session_id='after-budget', account='acme-health')
