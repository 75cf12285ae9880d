"""Demo data: deterministic, idempotent, and rich enough to answer the README's question."""

from __future__ import annotations

from sqlalchemy import func, select

from agentrt.db.models import Account, AgentInstance, DirectoryEntry
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.demo_data import MEDICAL_COUNT, PRODUCE_COUNT, medical_entries, seed_demo_data


async def test_seed_is_idempotent() -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        first = await seed_demo_data(session=session)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        second = await seed_demo_data(session=session)
    assert first.inserted_entries == MEDICAL_COUNT + PRODUCE_COUNT
    assert second.inserted_entries == 0
    assert (second.accounts, second.agent_instances, second.directory_entries) == (2, 2, MEDICAL_COUNT + PRODUCE_COUNT)


def test_generation_is_deterministic() -> None:
    assert medical_entries(50) == medical_entries(50)


async def test_each_account_has_its_own_domain(demo_data: None) -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = (
            await session.execute(
                select(Account.slug, DirectoryEntry.schema_name, func.count())
                .join(DirectoryEntry, DirectoryEntry.account_id == Account.id)
                .group_by(Account.slug, DirectoryEntry.schema_name)
                .order_by(Account.slug)
            )
        ).all()
        agents = (await session.execute(select(AgentInstance.slug).order_by(AgentInstance.slug))).scalars().all()
    assert rows == [
        ('acme-health', 'medical_providers', MEDICAL_COUNT),
        ('green-grocer', 'produce_suppliers', PRODUCE_COUNT),
    ]
    assert agents == ['provider-finder', 'supplier-finder']


async def test_readme_question_has_real_answers(demo_data: None) -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        count = (
            await session.execute(
                select(func.count())
                .select_from(DirectoryEntry)
                .where(
                    DirectoryEntry.category == 'Cardiology',
                    DirectoryEntry.city == 'Seattle',
                    DirectoryEntry.attributes.contains({'insurance': ['Medicare']}),
                )
            )
        ).scalar_one()
    assert count >= 5
