"""`services.directory_service`: filters, ranking, counts, caps, tenant scoping and hostile input."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, text

from agentrt.db.models import Account, DirectoryEntry
from agentrt.db.session import Unscoped, get_db_session, get_read_only_session
from agentrt.services.demo_data import MEDICAL_ACCOUNT, MEDICAL_SCHEMA, PRODUCE_ACCOUNT, PRODUCE_SCHEMA
from agentrt.services.directory_service import (
    MAX_RESULTS,
    SCHEMAS,
    DirectoryError,
    InvalidFilterValueError,
    InvalidQueryError,
    UnknownFilterError,
    UnknownSchemaError,
    get_directory_entry,
    list_schemas,
    search_directory,
)

pytestmark = pytest.mark.usefixtures('demo_data')

INJECTION = "x'); DROP TABLE accounts; --"


async def account_id(slug: str) -> int:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(select(Account.id).where(Account.slug == slug))).scalar_one()


async def count_sql(sql: str, **params: object) -> int:
    """An independent count, written by hand rather than through the service's query builder."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(text(sql), params)).scalar_one()


async def search(account: int, **kwargs):
    kwargs.setdefault('query', None)
    async with get_read_only_session(account=Unscoped.ADMIN) as session:
        return await search_directory(account, session=session, **kwargs)


async def test_list_schemas_per_account() -> None:
    async with get_read_only_session(account=Unscoped.ADMIN) as session:
        assert await list_schemas(await account_id(MEDICAL_ACCOUNT), session=session) == [MEDICAL_SCHEMA]
        assert await list_schemas(await account_id(PRODUCE_ACCOUNT), session=session) == [PRODUCE_SCHEMA]
        assert await list_schemas(999_999, session=session) == []


async def test_cardiologists_in_seattle_who_accept_medicare() -> None:
    acme = await account_id(MEDICAL_ACCOUNT)
    result = await search(
        acme,
        schema_name=MEDICAL_SCHEMA,
        filters={'specialty': 'cardiology', 'city': 'SEATTLE', 'insurance': 'Medicare'},
        limit=MAX_RESULTS,
    )
    expected = await count_sql(
        """SELECT count(*) FROM directory_entries
           WHERE account_id = :a AND schema_name = :s AND category = 'Cardiology' AND city = 'Seattle'
             AND EXISTS (SELECT 1 FROM jsonb_array_elements_text(attributes -> 'insurance') plan
                         WHERE plan = 'Medicare')""",
        a=acme,
        s=MEDICAL_SCHEMA,
    )
    assert expected > 0
    assert result.total_matches == expected
    assert len(result.results) == min(expected, MAX_RESULTS)
    for hit in result.results:
        assert (hit.category, hit.city) == ('Cardiology', 'Seattle')
        assert 'Medicare' in hit.attributes['insurance']
        assert hit.rank is None
    ratings = [hit.attributes['rating'] for hit in result.results]
    assert ratings == sorted(ratings, reverse=True)


async def test_full_text_query_ranks_and_agrees_with_filters() -> None:
    acme = await account_id(MEDICAL_ACCOUNT)
    by_text = await search(acme, query='Cardiology Seattle Medicare', schema_name=MEDICAL_SCHEMA, limit=25)
    by_filters = await search(
        acme,
        schema_name=MEDICAL_SCHEMA,
        filters={'specialty': 'Cardiology', 'city': 'Seattle', 'insurance': 'Medicare'},
    )
    assert by_text.total_matches == by_filters.total_matches > 0
    ranks = [hit.rank for hit in by_text.results]
    assert all(rank is not None and rank > 0 for rank in ranks)
    assert ranks == sorted(ranks, reverse=True)
    assert {hit.category for hit in by_text.results} == {'Cardiology'}


async def test_query_with_filters_and_web_search_syntax() -> None:
    acme = await account_id(MEDICAL_ACCOUNT)
    result = await search(acme, query='Spanish -Medicaid', schema_name=MEDICAL_SCHEMA, filters={'city': 'Denver'})
    assert result.total_matches > 0
    for hit in result.results:
        assert hit.city == 'Denver'
        assert 'Spanish' in hit.attributes['languages']
        assert 'Medicaid' not in hit.attributes['insurance']


async def test_stop_word_query_lists_everything() -> None:
    acme = await account_id(MEDICAL_ACCOUNT)
    everything = await search(acme, schema_name=MEDICAL_SCHEMA)
    assert (await search(acme, query='the', schema_name=MEDICAL_SCHEMA)).total_matches == everything.total_matches
    assert (await search(acme, query='   ', schema_name=MEDICAL_SCHEMA)).total_matches == everything.total_matches


async def test_result_cap_and_total() -> None:
    acme = await account_id(MEDICAL_ACCOUNT)
    total = await count_sql('SELECT count(*) FROM directory_entries WHERE account_id = :a', a=acme)
    result = await search(acme, schema_name=MEDICAL_SCHEMA, limit=10_000)
    assert (result.total_matches, len(result.results)) == (total, MAX_RESULTS)
    assert len((await search(acme, schema_name=MEDICAL_SCHEMA, limit=3)).results) == 3
    assert len((await search(acme, schema_name=MEDICAL_SCHEMA, limit=0)).results) == 1


async def test_flag_and_list_filters() -> None:
    acme = await account_id(MEDICAL_ACCOUNT)
    accepting = await search(
        acme, schema_name=MEDICAL_SCHEMA, filters={'accepting_new_patients': 'yes', 'language': 'Mandarin'}
    )
    not_accepting = await search(
        acme, schema_name=MEDICAL_SCHEMA, filters={'accepting_new_patients': False, 'language': 'Mandarin'}
    )
    mandarin = await count_sql(
        "SELECT count(*) FROM directory_entries WHERE account_id = :a AND attributes -> 'languages' ? 'Mandarin'",
        a=acme,
    )
    assert accepting.total_matches + not_accepting.total_matches == mandarin
    assert all(hit.attributes['accepting_new_patients'] for hit in accepting.results)
    assert not any(hit.attributes['accepting_new_patients'] for hit in not_accepting.results)
    with pytest.raises(InvalidFilterValueError, match='true or false'):
        await search(acme, schema_name=MEDICAL_SCHEMA, filters={'accepting_new_patients': 'maybe'})
    for name in ('city', 'insurance'):  # compared as the text 'True': zero matches, no error (QA)
        with pytest.raises(InvalidFilterValueError, match=f"filter '{name}' takes a text value .*, not true"):
            await search(acme, schema_name=MEDICAL_SCHEMA, filters={name: True})


async def test_produce_filters() -> None:
    grocer = await account_id(PRODUCE_ACCOUNT)
    result = await search(
        grocer,
        schema_name=PRODUCE_SCHEMA,
        filters={'category': 'berries', 'certification': 'USDA Organic', 'delivery_day': 'Mon'},
    )
    assert result.total_matches > 0
    for hit in result.results:
        assert hit.category == 'Berries'
        assert 'USDA Organic' in hit.attributes['certifications']
        assert 'Mon' in hit.attributes['delivery_days']
        assert set(hit.attributes) == {'certifications', 'delivery_days', 'min_order_usd', 'rating'}


async def test_searches_never_cross_accounts() -> None:
    acme = await account_id(MEDICAL_ACCOUNT)
    # Both directories have suppliers/providers in Seattle; each account sees only its own.
    seattle = await search(acme, schema_name=MEDICAL_SCHEMA, filters={'city': 'Seattle'}, limit=25)
    owners = await count_sql(
        'SELECT count(DISTINCT account_id) FROM directory_entries WHERE id = ANY(:ids)',
        ids=[hit.id for hit in seattle.results],
    )
    assert owners == 1
    assert seattle.total_matches == await count_sql(
        "SELECT count(*) FROM directory_entries WHERE account_id = :a AND city = 'Seattle'", a=acme
    )
    with pytest.raises(UnknownSchemaError) as caught:
        await search(acme, schema_name=PRODUCE_SCHEMA, query='Farms')
    assert caught.value.valid == [MEDICAL_SCHEMA]
    assert PRODUCE_SCHEMA not in caught.value.valid


async def test_same_schema_in_two_accounts_stays_separate() -> None:
    acme, grocer = await account_id(MEDICAL_ACCOUNT), await account_id(PRODUCE_ACCOUNT)
    # Another tenant with the same directory type and a row that matches every criterion below.
    async with get_db_session(account=Unscoped.ADMIN) as session:
        session.add(
            DirectoryEntry(
                account_id=grocer,
                external_id='intruder',
                schema_name=MEDICAL_SCHEMA,
                name='Dr. Intruder',
                category='Cardiology',
                city='Seattle',
                attributes={'insurance': ['Medicare'], 'rating': 5.0},
                search_text='Dr. Intruder Cardiology Seattle Medicare',
            )
        )
    criteria = {'specialty': 'Cardiology', 'city': 'Seattle', 'insurance': 'Medicare'}
    for query in (None, 'Intruder', 'Cardiology Seattle Medicare'):
        result = await search(acme, query=query, schema_name=MEDICAL_SCHEMA, filters=criteria, limit=25)
        assert 'Dr. Intruder' not in {hit.name for hit in result.results}
    assert (await search(grocer, query='Intruder', schema_name=MEDICAL_SCHEMA, filters=criteria)).total_matches == 1
    assert (await search(acme, query='Intruder', schema_name=MEDICAL_SCHEMA)).total_matches == 0


async def test_entry_of_another_account_is_not_found() -> None:
    acme, grocer = await account_id(MEDICAL_ACCOUNT), await account_id(PRODUCE_ACCOUNT)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        supplier_id = (
            await session.execute(select(func.min(DirectoryEntry.id)).where(DirectoryEntry.account_id == grocer))
        ).scalar_one()
    async with get_read_only_session(account=Unscoped.ADMIN) as session:
        own = await get_directory_entry(grocer, supplier_id, session=session)
        assert own is not None and own.schema_name == PRODUCE_SCHEMA and 'min_order_usd' in own.attributes
        assert await get_directory_entry(acme, supplier_id, session=session) is None
        assert await get_directory_entry(acme, 10**12, session=session) is None
        assert await get_directory_entry(grocer, supplier_id, schema_names=[MEDICAL_SCHEMA], session=session) is None


async def test_unknown_schema_and_filter_errors_list_what_is_valid() -> None:
    acme = await account_id(MEDICAL_ACCOUNT)
    with pytest.raises(UnknownSchemaError, match="unknown directory 'doctors'; valid directories: medical_providers"):
        await search(acme, schema_name='doctors')
    with pytest.raises(UnknownFilterError) as caught:
        await search(acme, schema_name=MEDICAL_SCHEMA, filters={'city': 'Seattle', 'zip': '98101'})
    assert caught.value.unknown == ['zip']
    assert caught.value.valid == sorted(SCHEMAS[MEDICAL_SCHEMA].filters)
    assert 'accepting_new_patients' in str(caught.value) and 'insurance' in str(caught.value)
    assert issubclass(UnknownSchemaError, DirectoryError) and issubclass(UnknownFilterError, DirectoryError)


async def test_sql_injection_looking_values_are_just_values() -> None:
    acme = await account_id(MEDICAL_ACCOUNT)
    for filters in ({'city': INJECTION}, {'insurance': INJECTION}, {'specialty': "' OR 1=1 --"}):
        result = await search(acme, query=INJECTION, schema_name=MEDICAL_SCHEMA, filters=filters)
        assert result.total_matches == 0
    assert (await search(acme, query="Medicare' OR '1'='1", schema_name=MEDICAL_SCHEMA)).total_matches >= 0
    with pytest.raises(UnknownSchemaError):
        await search(acme, schema_name=INJECTION)
    with pytest.raises(UnknownFilterError):
        await search(acme, schema_name=MEDICAL_SCHEMA, filters={INJECTION: 'x'})
    assert await count_sql('SELECT count(*) FROM accounts') == 2


async def test_nul_characters_are_refused_before_postgresql_sees_them() -> None:
    acme = await account_id(MEDICAL_ACCOUNT)
    with pytest.raises(InvalidQueryError, match='NUL'):
        await search(acme, query='a\x00b', schema_name=MEDICAL_SCHEMA)
    with pytest.raises(InvalidFilterValueError, match='NUL'):
        await search(acme, schema_name=MEDICAL_SCHEMA, filters={'city': 'a\x00b'})
    with pytest.raises(UnknownSchemaError, match='valid directories: medical_providers'):
        await search(acme, schema_name='medical\x00providers')
