"""Deterministic, idempotent demo data: two accounts, an agent each, and a directory per account."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.models import Account, AgentInstance, DirectoryEntry

MEDICAL_ACCOUNT = 'acme-health'
PRODUCE_ACCOUNT = 'green-grocer'
MEDICAL_SCHEMA = 'medical_providers'
PRODUCE_SCHEMA = 'produce_suppliers'
MEDICAL_COUNT = 3000
PRODUCE_COUNT = 1500

SPECIALTIES = [
    'Cardiology',
    'Dermatology',
    'Family Medicine',
    'Pediatrics',
    'Orthopedics',
    'Neurology',
    'Oncology',
    'Psychiatry',
    'Obstetrics and Gynecology',
    'Ophthalmology',
    'Endocrinology',
    'Gastroenterology',
]
MEDICAL_CITIES = ['Seattle', 'Portland', 'San Francisco', 'Los Angeles', 'Denver', 'Chicago', 'Boston', 'Austin']
INSURANCE_PLANS = ['Medicare', 'Medicaid', 'Aetna', 'Blue Cross', 'Cigna', 'UnitedHealthcare', 'Kaiser']
LANGUAGES = ['English', 'Spanish', 'Mandarin', 'Vietnamese', 'Russian', 'Tagalog']
FIRST_NAMES = [
    'Ava',
    'Ben',
    'Chloe',
    'Daniel',
    'Elena',
    'Farid',
    'Grace',
    'Hiro',
    'Isabel',
    'Jamal',
    'Keiko',
    'Liam',
    'Maya',
    'Noah',
    'Olivia',
    'Priya',
    'Quinn',
    'Rosa',
    'Samuel',
    'Tara',
    'Uma',
    'Victor',
    'Wen',
    'Yusuf',
]
LAST_NAMES = [
    'Anders',
    'Bishop',
    'Chen',
    'Diaz',
    'Evans',
    'Fischer',
    'Garcia',
    'Hughes',
    'Ito',
    'Jensen',
    'Khan',
    'Lopez',
    'Morgan',
    'Nguyen',
    'Okafor',
    'Patel',
    'Reyes',
    'Schmidt',
    'Tanaka',
    'Usman',
    'Vargas',
    'Walsh',
    'Young',
]
PRODUCE_CATEGORIES = [
    'Fruit',
    'Vegetables',
    'Herbs',
    'Mushrooms',
    'Berries',
    'Citrus',
    'Leafy Greens',
    'Root Vegetables',
]
PRODUCE_CITIES = ['Fresno', 'Salinas', 'Yakima', 'Boise', 'Sacramento', 'Tucson', 'Seattle', 'Spokane']
CERTIFICATIONS = ['USDA Organic', 'GlobalG.A.P.', 'Fair Trade', 'Non-GMO', 'Rainforest Alliance']
FARM_WORDS = ['Valley', 'Ridge', 'Sunny', 'Green', 'Cedar', 'River', 'Golden', 'Harvest', 'Meadow', 'Orchard']
FARM_KINDS = ['Farms', 'Growers', 'Produce Co.', 'Orchards', 'Gardens', 'Ranch']
DELIVERY_DAYS = ['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat']


@dataclass(frozen=True)
class SeedReport:
    """What a seeding run left in the database."""

    accounts: int
    agent_instances: int
    directory_entries: int
    inserted_entries: int


def medical_entries(count: int = MEDICAL_COUNT, seed: int = 42) -> list[dict[str, Any]]:
    """Generate the medical provider directory; the same arguments always give the same rows."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        specialty, city = (
            SPECIALTIES[i % len(SPECIALTIES)],
            MEDICAL_CITIES[(i // len(SPECIALTIES)) % len(MEDICAL_CITIES)],
        )
        name = f'Dr. {rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}'
        insurance = sorted(rng.sample(INSURANCE_PLANS, rng.randint(2, 5)))
        languages = ['English', *sorted(rng.sample(LANGUAGES[1:], rng.randint(0, 2)))]
        attributes = {
            'insurance': insurance,
            'languages': languages,
            'accepting_new_patients': rng.random() < 0.7,
            'rating': round(rng.uniform(3.0, 5.0), 1),
            'phone': f'555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}',
        }
        text = ' '.join([name, specialty, city, *insurance, *languages])
        rows.append(_row(f'prov-{i:05d}', MEDICAL_SCHEMA, name, specialty, city, attributes, text))
    return rows


def produce_entries(count: int = PRODUCE_COUNT, seed: int = 7) -> list[dict[str, Any]]:
    """Generate the produce supplier directory; the same arguments always give the same rows."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        category, city = PRODUCE_CATEGORIES[i % len(PRODUCE_CATEGORIES)], rng.choice(PRODUCE_CITIES)
        name = f'{rng.choice(FARM_WORDS)} {rng.choice(FARM_WORDS)} {rng.choice(FARM_KINDS)} #{i}'
        certifications = sorted(rng.sample(CERTIFICATIONS, rng.randint(0, 3)))
        attributes = {
            'certifications': certifications,
            'delivery_days': sorted(rng.sample(DELIVERY_DAYS, rng.randint(1, 4)), key=DELIVERY_DAYS.index),
            'min_order_usd': rng.choice([100, 250, 500, 1000]),
            'rating': round(rng.uniform(3.0, 5.0), 1),
        }
        text = ' '.join([name, category, city, *certifications])
        rows.append(_row(f'sup-{i:05d}', PRODUCE_SCHEMA, name, category, city, attributes, text))
    return rows


def _row(
    external_id: str, schema: str, name: str, category: str, city: str, attributes: dict[str, Any], text: str
) -> dict[str, Any]:
    return {
        'external_id': external_id,
        'schema_name': schema,
        'name': name,
        'category': category,
        'city': city,
        'attributes': attributes,
        'search_text': text,
    }


DEMO_ACCOUNTS: list[dict[str, Any]] = [
    {
        'slug': MEDICAL_ACCOUNT,
        'name': 'Acme Health Network',
        'agent': {
            'slug': 'provider-finder',
            'agent_type': 'directory_assistant',
            'config': {'schemas': [MEDICAL_SCHEMA], 'persona': 'helps patients find in-network providers'},
        },
        'entries': medical_entries,
    },
    {
        'slug': PRODUCE_ACCOUNT,
        'name': 'Green Grocer Cooperative',
        'agent': {
            'slug': 'supplier-finder',
            'agent_type': 'directory_assistant',
            'config': {'schemas': [PRODUCE_SCHEMA], 'persona': 'helps buyers find produce suppliers'},
        },
        'entries': produce_entries,
    },
]


async def seed_demo_data(*, session: AsyncSession) -> SeedReport:
    """Insert the demo accounts, agents and directories; existing rows are left as they are.

    Args:
        session: an open session; the caller's block commits.
    """
    inserted = 0
    for spec in DEMO_ACCOUNTS:
        await session.execute(
            insert(Account).values(slug=spec['slug'], name=spec['name']).on_conflict_do_nothing(index_elements=['slug'])
        )
        account_id = (await session.execute(select(Account.id).where(Account.slug == spec['slug']))).scalar_one()
        agent = spec['agent']
        await session.execute(
            insert(AgentInstance)
            .values(account_id=account_id, **agent)
            .on_conflict_do_nothing(index_elements=['account_id', 'slug'])
        )
        rows = [{**row, 'account_id': account_id} for row in spec['entries']()]
        # executemany with RETURNING: SQLAlchemy batches it into few round trips ("insertmanyvalues").
        result = await session.execute(
            insert(DirectoryEntry)
            .on_conflict_do_nothing(index_elements=['account_id', 'external_id'])
            .returning(DirectoryEntry.id),
            rows,
        )
        inserted += len(result.all())
    counts = [
        (await session.execute(select(func.count()).select_from(model))).scalar_one()
        for model in (Account, AgentInstance, DirectoryEntry)
    ]
    accounts, agent_instances, directory_entries = counts
    return SeedReport(accounts, agent_instances, directory_entries, inserted_entries=inserted)
