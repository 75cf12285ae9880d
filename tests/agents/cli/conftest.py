"""Fixtures of the CLI tests: three model requests in the ledger, for the audit, costs and replay commands; accounts
whose slugs are all digits, one of them another account's id (or a deleted account's)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from agentrt.agents.cli.support import console
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import LedgerRecord, LLMRequestTracker, new_request_id
from tests.agents.conftest import account_id
from tests.factories import fast_config, ledger_record

STARTED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def cli_record(account: str, model: str, cost: str | None, *, success: bool = True, minute: int = 0) -> LedgerRecord:
    return ledger_record(
        # Ids a millisecond apart per minute: made in one millisecond, three ids shared their first 16 hex digits (what
        # `audit list` shows, `audit show` takes) one run in ~2,000, and the short-id test failed (QA).
        id=uuid.UUID(int=new_request_id().int + (minute << 80)),
        success=success,
        started_at=STARTED + timedelta(minutes=minute),
        cost=cost,
        model=model,
        latency_ms=250.0,
        account_slug=account,
        agent_instance_slug='helper',
        input_tokens=1200,
        output_tokens=80,
        total_tokens=1280,
        error_type=None if success else 'ModelHTTPError',
        error_message=None if success else 'status_code: 503, body: overloaded',
        raw_contents=[('prompt', '{"messages": ["hello there"]}'), ('response', '{"parts": ["general kenobi"]}')],
    )


@pytest.fixture
async def seeded(tmp_path: Path) -> list[LedgerRecord]:
    records = [
        cli_record('acme', 'gpt-4o-mini', '0.000250', minute=0),
        cli_record('acme', 'gpt-4o', '0.004000', success=False, minute=1),
        cli_record('globex', 'gpt-4o-mini', '0.000750', minute=2),
    ]
    tracker = LLMRequestTracker(fast_config(tmp_path))
    for record in records:
        await tracker.track_request(record)
    await tracker.flush()
    return records


@pytest.fixture(autouse=True)
def _wide_console() -> Iterator[None]:
    """Tables rendered straight to the console are as wide as the CLI runner's."""
    width = console.width
    console.width = 240
    yield
    console.width = width


@dataclass(frozen=True)
class DigitAccounts:
    """The demo accounts and two whose slugs are all digits: `clash`'s slug is green-grocer's id, `007`'s no id."""

    acme: int
    green: int
    clash: int
    """Its slug is `str(green)`."""
    zeros: int
    """Its slug is `007`; no account has the id 7."""

    @property
    def clash_slug(self) -> str:
        return str(self.green)


@pytest.fixture
async def digit_accounts(demo_data: None, tracker: LLMRequestTracker) -> DigitAccounts:
    """`DigitAccounts`, each with a model request a day old (a prompt and a response stored) in the ledger."""
    acme, green = await account_id('acme-health'), await account_id('green-grocer')
    # Ids far past the sequence's, so none is 7 and none is taken by a later insert.
    accounts = DigitAccounts(acme=acme, green=green, clash=900_001, zeros=900_007)
    assert 7 not in (acme, green) and str(acme) != str(green)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(
            text('INSERT INTO accounts (id, slug, name) VALUES (:clash, :slug, :name), (:zeros, :zeros_slug, :name)'),
            {
                'clash': accounts.clash,
                'slug': accounts.clash_slug,
                'zeros': accounts.zeros,
                'zeros_slug': '007',
                'name': 'Digits',
            },
        )
    day_ago = datetime.now(UTC) - timedelta(days=1)
    owners = (
        (acme, 'acme-health'),
        (green, 'green-grocer'),
        (accounts.clash, accounts.clash_slug),
        (accounts.zeros, '007'),
    )
    for number, slug in owners:
        await tracker.track_request(
            ledger_record(started_at=day_ago, cost='0.001', account_id=number, account_slug=slug)
        )
    await tracker.flush()
    return accounts


@dataclass(frozen=True)
class DeletedIdSlug:
    """A deleted account whose model requests stay in the ledger, and a live account whose slug is its id."""

    deleted: int
    live: int

    @property
    def live_slug(self) -> str:
        return str(self.deleted)


@pytest.fixture
async def deleted_id_slug(digit_accounts: DigitAccounts, tracker: LLMRequestTracker) -> DeletedIdSlug:
    """`DeletedIdSlug` beside `digit_accounts`, each with a model request a day old (its contents stored)."""
    accounts = DeletedIdSlug(deleted=900_300, live=900_019)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(
            text("INSERT INTO accounts (id, slug, name) VALUES (:deleted, 'tmpdel', 'Gone'), (:live, :slug, 'Live')"),
            {'deleted': accounts.deleted, 'live': accounts.live, 'slug': accounts.live_slug},
        )
    day_ago = datetime.now(UTC) - timedelta(days=1)
    for number, slug in ((accounts.deleted, 'tmpdel'), (accounts.live, accounts.live_slug)):
        await tracker.track_request(
            ledger_record(started_at=day_ago, cost='0.001', account_id=number, account_slug=slug)
        )
    await tracker.flush()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(text('DELETE FROM accounts WHERE id = :deleted'), {'deleted': accounts.deleted})
    return accounts
