"""Tenant isolation in PostgreSQL itself: forced row-level security on every account table, least-privilege roles.

Queries here leave out the account filter on purpose: what they see is what a forgotten filter would leak.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai import Agent, FunctionToolset, ModelResponse, RunContext, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker

from agentrt.db.driver import DriverStatement, driver_transaction
from agentrt.db.engine import build_engine, get_engine
from agentrt.db.errors import ConfigError, MigrationError
from agentrt.db.migrate import MIGRATIONS_DIR, current_revision, head_revision, upgrade
from agentrt.db.models import Account, AgentInstance
from agentrt.db.roles import ADMIN_ROLE, APP_ROLE, FUNCTION_ROLES, JOBS_ROLE, LEDGER_ROLE
from agentrt.db.session import (
    Unscoped,
    enter_account,
    get_db_session,
    get_read_only_session,
    scoped_setup,
    translated_error,
)
from agentrt.db.settings import Settings
from agentrt.db.transaction_setup import SETUP_KEY, RetryingSession, SetupSession
from agentrt.services import directory_service as directory
from agentrt.services.demo_data import MEDICAL_ACCOUNT, PRODUCE_ACCOUNT
from agentrt.services.ledger import LLMRequestTracker
from agentrt.services.tenancy import lookup_tenant, lookup_tenant_on
from agentrt.tools.dependencies import SessionDependencies
from tests.factories import chat_deps, fast_config, ledger_record

pytestmark = pytest.mark.usefixtures('demo_data')

# Every table with an account column, and its rows per account: what a query without a filter shows.
_ACCOUNT_TABLES = """
SELECT c.relname FROM pg_class AS c JOIN pg_attribute AS a ON a.attrelid = c.oid
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
  AND a.attname = 'account_id' AND NOT a.attisdropped ORDER BY 1
"""


async def _accounts() -> tuple[int, int]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        ids = dict((await session.execute(select(Account.slug, Account.id))).all())
    return ids[MEDICAL_ACCOUNT], ids[PRODUCE_ACCOUNT]


async def _account_tables() -> list[str]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return list((await session.execute(text(_ACCOUNT_TABLES))).scalars())


async def _seed_both(medical: int, produce: int) -> None:
    """Conversations and ledger rows (with contents) for both demo accounts, beside their directories."""
    spool_dir = Path(tempfile.mkdtemp(prefix='agentrt-rls-'))
    tracker = LLMRequestTracker(fast_config(spool_dir))
    try:
        for account in (medical, produce):
            await tracker.track_request(
                ledger_record(account_id=account, raw_contents=[('prompt', f'secret of {account}'.encode())])
            )
        await tracker.flush()
    finally:
        await tracker.aclose()
        shutil.rmtree(spool_dir, ignore_errors=True)  # nothing was spooled: the database took every row
    async with get_db_session(account=Unscoped.ADMIN) as session:
        for account in (medical, produce):
            await session.execute(
                text(
                    'INSERT INTO conversations (account_id, conversation_id, revision, record) '
                    "VALUES (:a, :c, 'r1', '{}')"
                ),
                {'a': account, 'c': f'conversation-{account}'},
            )


async def test_every_account_table_has_forced_row_level_security_and_a_tenant_policy() -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        tables = list((await session.execute(text(_ACCOUNT_TABLES))).scalars())
        rows = (
            await session.execute(
                text("""
                SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,
                       EXISTS (SELECT 1 FROM pg_policy AS p
                               WHERE p.polrelid = c.oid
                                 AND p.polroles @> ARRAY[(SELECT oid FROM pg_roles WHERE rolname = :app)]
                                 AND pg_get_expr(p.polqual, p.polrelid) LIKE '%app.account_id%'
                                 AND pg_get_expr(p.polwithcheck, p.polrelid) LIKE '%app.account_id%') AS tenant_policy
                FROM pg_class AS c WHERE c.relname = ANY(:tables)
                  AND c.relnamespace = current_schema()::regnamespace
                """),
                {'tables': tables, 'app': APP_ROLE},
            )
        ).all()
    assert len(tables) >= 12, tables  # the catalog found them (agent_instances ... budget_settlements)
    unprotected = [row for row in rows if not (row.relrowsecurity and row.relforcerowsecurity and row.tenant_policy)]
    assert unprotected == []


async def test_a_query_without_account_filter_in_a_tool_session_sees_only_the_tenants_rows() -> None:
    medical, produce = await _accounts()
    await _seed_both(medical, produce)
    seen: dict[str, list[int]] = {}
    for table in await _account_tables():
        async with get_read_only_session(account=medical) as session:  # what a tool opens
            seen[table] = list((await session.execute(text(f'SELECT DISTINCT account_id FROM {table}'))).scalars())
    assert all(accounts in ([], [medical]) for accounts in seen.values()), seen
    # The rows are there: the operator sees both accounts where both have rows.
    async with get_db_session(account=Unscoped.ADMIN) as session:
        for table in ('directory_entries', 'agent_instances', 'conversations', 'llm_requests'):
            both = set((await session.execute(text(f'SELECT DISTINCT account_id FROM {table}'))).scalars())
            assert both == {medical, produce}, table
            assert seen[table] == [medical], table
    async with get_read_only_session(account=medical) as session:
        bodies = list((await session.execute(text('SELECT body FROM llm_request_contents'))).scalars())
        accounts = list((await session.execute(text('SELECT id FROM accounts'))).scalars())
    assert bodies == [f'secret of {medical}'] and accounts == [medical]


async def test_without_a_tenant_the_request_role_sees_no_row() -> None:
    medical, produce = await _accounts()
    await _seed_both(medical, produce)
    for table in [*await _account_tables(), 'accounts', 'llm_request_contents']:
        async with get_read_only_session(account=Unscoped.NO_TENANT) as session:
            assert (await session.execute(text(f'SELECT count(*) FROM {table}'))).scalar_one() == 0, table


async def test_a_tool_that_forgets_the_filter_returns_only_its_tenants_rows() -> None:
    """A deliberately unscoped tool, run by an agent with the medical account's deps."""
    medical, produce = await _accounts()
    leaky: FunctionToolset[SessionDependencies] = FunctionToolset()

    @leaky.tool
    async def count_by_account(ctx: RunContext[SessionDependencies]) -> dict[str, int]:
        async with get_read_only_session(account=ctx.deps.account_id) as session:
            rows = await session.execute(text('SELECT account_id, count(*) FROM directory_entries GROUP BY 1'))
            return {str(account): count for account, count in rows}

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        returns = [p for m in messages for p in getattr(m, 'parts', []) if isinstance(p, ToolReturnPart)]
        if returns:
            return ModelResponse(parts=[TextPart(str(returns[0].content))])
        return ModelResponse(parts=[ToolCallPart('count_by_account', {})])

    agent = Agent(FunctionModel(model), deps_type=SessionDependencies, toolsets=[leaky])
    result = await agent.run('count', deps=chat_deps(account_id=medical))
    assert str(medical) in result.output and str(produce) not in result.output


async def test_a_service_query_with_another_accounts_filter_finds_nothing() -> None:
    """Even a wrong filter (another account's id) leaks nothing through the tenant's session."""
    medical, produce = await _accounts()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        produce_entry = (
            await session.execute(
                text('SELECT id FROM directory_entries WHERE account_id = :a LIMIT 1'), {'a': produce}
            )
        ).scalar_one()
    async with get_read_only_session(account=produce) as session:
        assert await directory.get_directory_entry(produce, produce_entry, session=session) is not None
    async with get_read_only_session(account=medical) as session:
        assert await directory.get_directory_entry(produce, produce_entry, session=session) is None


async def test_the_request_role_cannot_write_another_accounts_rows() -> None:
    medical, produce = await _accounts()
    await _seed_both(medical, produce)
    with pytest.raises(DBAPIError, match='row-level security'):
        async with get_db_session(account=medical) as session:
            await session.execute(
                text(
                    'INSERT INTO conversations (account_id, conversation_id, revision, record) '
                    "VALUES (:a, 'x', 'r1', '{}')"
                ),
                {'a': produce},
            )
    async with get_db_session(account=medical) as session:  # an update of another account's rows touches none
        result = await session.execute(
            text("UPDATE conversations SET title = 'stolen' WHERE account_id = :a"), {'a': produce}
        )
    assert result.rowcount == 0  # type: ignore[attr-defined]


async def test_the_request_role_owns_nothing_bypasses_nothing_and_cannot_write_the_ledger() -> None:
    medical, _ = await _accounts()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        owners = set(
            (
                await session.execute(
                    text('SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = current_schema()')
                )
            ).scalars()
        )
        attributes = (
            await session.execute(
                text('SELECT rolname, rolsuper, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = ANY(:r)'),
                {'r': list(FUNCTION_ROLES)},
            )
        ).all()
    assert not owners & set(FUNCTION_ROLES)
    assert sorted(row.rolname for row in attributes) == sorted(FUNCTION_ROLES)
    assert not any(row.rolsuper or row.rolbypassrls or row.rolcanlogin for row in attributes)
    async with get_db_session(account=medical) as session:
        assert (await session.execute(text('SELECT current_user'))).scalar_one() == APP_ROLE
    record = ledger_record(account_id=medical).to_row()
    for sql in (
        'INSERT INTO llm_requests (id, model, streamed, status, success, started_at) '
        "VALUES (gen_random_uuid(), 'm', false, 'complete', true, now())",
        "UPDATE llm_requests SET model = 'x'",
        'DELETE FROM llm_requests',
        "INSERT INTO llm_request_contents (request_id, kind, body) VALUES (gen_random_uuid(), 'prompt', 'x')",
    ):
        with pytest.raises(DBAPIError, match='permission denied'):
            async with get_db_session(account=medical) as session:
                await session.execute(text(sql))
    assert record  # the row the ledger writer would write: only its role may


@pytest.mark.parametrize('table', ['llm_request_contents', 'conversation_entries', 'directory_entries'])
async def test_the_ledger_writer_reads_no_content(table: str) -> None:
    medical, produce = await _accounts()
    await _seed_both(medical, produce)
    column = 'body' if table == 'llm_request_contents' else '*'
    with pytest.raises(DBAPIError, match='permission denied'):
        async with get_db_session(account=Unscoped.LEDGER) as session:
            assert (await session.execute(text('SELECT current_user'))).scalar_one() == LEDGER_ROLE
            await session.execute(text(f'SELECT {column} FROM {table}'))


@pytest.mark.parametrize('table', ['llm_request_contents', 'conversation_entries', 'api_keys'])
async def test_background_jobs_read_no_content_or_keys(table: str) -> None:
    with pytest.raises(DBAPIError, match='permission denied'):
        async with get_db_session(account=Unscoped.JOBS) as session:
            assert (await session.execute(text('SELECT current_user'))).scalar_one() == JOBS_ROLE
            await session.execute(text(f'SELECT * FROM {table}'))


async def test_role_and_tenant_end_with_the_transaction() -> None:
    """Transaction-local: the pooled connection (or a pooler's server connection) keeps neither."""
    medical, _ = await _accounts()
    probe = text("SELECT current_user, coalesce(current_setting('app.account_id', true), '')")
    async with get_engine().connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        driver.agentrt_prelude = scoped_setup(medical).begin_sql()  # type: ignore[union-attr]
        async with connection.begin():
            assert tuple((await connection.execute(probe)).one()) == (APP_ROLE, str(medical))
        after = tuple((await connection.execute(probe)).one())
        await connection.rollback()
    assert after[0] not in FUNCTION_ROLES and after[1] == ''


async def test_a_tenant_lookup_session_enters_the_account_it_found() -> None:
    medical, produce = await _accounts()
    async with get_db_session(account=Unscoped.TENANT_LOOKUP) as session:
        agents = set((await session.execute(select(AgentInstance.account_id))).scalars())
        assert agents == {medical, produce}  # finding a tenant needs every account's agents
        await enter_account(session, produce)
        assert set((await session.execute(select(AgentInstance.account_id))).scalars()) == {produce}
        assert (await session.execute(text('SELECT current_user'))).scalar_one() == APP_ROLE


async def test_the_turns_tenant_lookup_enters_the_account_in_its_own_statement() -> None:
    _, produce = await _accounts()
    async with get_db_session(account=Unscoped.TENANT_LOOKUP) as session:
        tenant = await lookup_tenant(PRODUCE_ACCOUNT, None, session=session, enter=True)
        assert tenant.account_id == produce
        assert set((await session.execute(select(AgentInstance.account_id))).scalars()) == {produce}
        await session.commit()  # a later transaction of the session begins as the tenant too
        assert set((await session.execute(select(AgentInstance.account_id))).scalars()) == {produce}


async def test_a_chat_turns_start_on_the_driver_connection_enters_the_account_it_found() -> None:
    """The turn start's transaction (`driver_transaction`) begins as the tenant lookup role; the lookup's own statement
    makes the rest of it the found account's: its claim and tail load see that account's rows only."""
    medical, produce = await _accounts()
    agents = DriverStatement.of(select(AgentInstance.account_id))
    who = DriverStatement.of(text("SELECT current_user, current_setting('app.account_id', true)"))
    async with driver_transaction(account=Unscoped.TENANT_LOOKUP) as transaction:
        assert {row[0] for row in await transaction.fetch(agents, {})} == {medical, produce}
        tenant = await lookup_tenant_on(transaction, PRODUCE_ACCOUNT, None, enter=True)
        assert tenant is not None and tenant.account_id == produce
        assert {row[0] for row in await transaction.fetch(agents, {})} == {produce}
        assert tuple((await transaction.fetch(who, {}))[0]) == (APP_ROLE, str(produce))
    assert await lookup_tenant_on_new_transaction('no-such-account') is None


async def lookup_tenant_on_new_transaction(account: str) -> Any:
    async with driver_transaction(account=Unscoped.TENANT_LOOKUP) as transaction:
        return await lookup_tenant_on(transaction, account, None, enter=True)


def test_a_session_needs_an_explicit_account() -> None:
    with pytest.raises(TypeError, match='Unscoped'):
        scoped_setup(None)  # type: ignore[arg-type]
    assert scoped_setup(Unscoped.ADMIN).role == ADMIN_ROLE


async def test_an_account_id_out_of_the_bigint_range_is_refused_before_the_database(database: Settings) -> None:
    """Once PostgreSQL's own "out of range for type bigint" (a raw driver error) from the transaction's BEGIN."""
    for account in (2**63, -(2**63) - 1, 10**30):
        with pytest.raises(ValueError, match='is not an account id: ids are 64-bit integers'):
            async with get_db_session(account=account):
                pass
        with pytest.raises(ValueError, match='is not an account id'):
            async with driver_transaction(account=account):
                pass
    async with get_db_session(account=2**63 - 1) as session:  # the largest id: a tenant with no rows
        assert (await session.execute(text('SELECT count(*) FROM directory_entries'))).scalar_one() == 0


async def test_a_login_role_that_owns_the_tables_and_is_no_superuser(database: Settings) -> None:
    """`DATABASE_URL` as an operator sets it up (README "Tenant isolation"): the login role is granted the roles,
    migrates and owns the tables; its sessions see what their role may."""
    suffix = uuid.uuid4().hex[:8]
    owner, dbname = f'agentrt_test_owner_{suffix}', f'agentrt_test_owner_{suffix}'
    admin_url = get_engine().url
    async with get_db_session(account=Unscoped.OWNER) as session:  # the test server's superuser
        await session.execute(text(f'CREATE ROLE {owner} LOGIN NOSUPERUSER'))
        await session.execute(text(f'GRANT {", ".join(FUNCTION_ROLES)} TO {owner}'))
    async with get_engine().connect() as connection:
        autocommit = await connection.execution_options(isolation_level='AUTOCOMMIT')
        await autocommit.execute(text(f'CREATE DATABASE {dbname} OWNER {owner}'))
    engine = build_engine(admin_url.set(username=owner, database=dbname), database)
    try:
        await upgrade(engine)
        sessions = async_sessionmaker(engine, class_=RetryingSession, sync_session_class=SetupSession)

        async def as_(account: Any, sql: str) -> Any:
            async with sessions() as session, session.begin():
                session.info[SETUP_KEY] = scoped_setup(account)
                result = await session.execute(text(sql))
                return result.scalar() if result.returns_rows else None

        await as_(Unscoped.ADMIN, "INSERT INTO accounts (slug, name) VALUES ('a', 'A'), ('b', 'B')")
        # Forced: the owner gets what the policies give it, here through its membership of the operator's role.
        assert await as_(Unscoped.OWNER, 'SELECT count(*) FROM accounts') == 2
        assert await as_(Unscoped.ADMIN, 'SELECT count(*) FROM accounts') == 2
        assert await as_(Unscoped.NO_TENANT, 'SELECT count(*) FROM accounts') == 0
        assert await as_(1, 'SELECT count(*) FROM accounts') == 1
        assert await as_(1, 'SELECT current_user') == APP_ROLE
        assert await as_(Unscoped.OWNER, 'SELECT current_user') == owner
    finally:
        await engine.dispose()
        async with get_engine().connect() as connection:
            autocommit = await connection.execution_options(isolation_level='AUTOCOMMIT')
            await autocommit.execute(text(f'DROP DATABASE {dbname}'))
            await autocommit.execute(text(f'DROP ROLE {owner}'))


async def test_a_login_role_without_the_roles_or_the_tables_is_told_what_to_grant(database: Settings) -> None:
    """A `DATABASE_URL` whose user neither owns the tables nor is a member of the runtime's roles: PostgreSQL's
    "permission denied" (42501) is a ConfigError saying what to grant, not an internal error. Once it is a member, a
    runtime role refused a table is left as it is: the migrations grant those roles what their code needs, so that
    is a bug in the runtime (here: the ledger's role reading conversations), not the set-up."""
    login = f'agentrt_test_login_{uuid.uuid4().hex[:8]}'
    async with get_db_session(account=Unscoped.OWNER) as session:
        await session.execute(text(f"CREATE ROLE {login} LOGIN NOSUPERUSER PASSWORD 'pw'"))
    engine = build_engine(get_engine().url.set(username=login, password='pw'), database)
    sessions = async_sessionmaker(engine, class_=RetryingSession, sync_session_class=SetupSession)

    async def refusal(account: Any, sql: str) -> tuple[DBAPIError, Exception | None]:
        setup = scoped_setup(account)
        with pytest.raises(DBAPIError) as raised:
            async with sessions() as session, session.begin():
                session.info[SETUP_KEY] = setup
                await session.execute(text(sql))
        assert getattr(raised.value.orig, 'sqlstate', None) == '42501'
        return raised.value, translated_error(raised.value, setup, login=login)

    try:
        _, as_itself = await refusal(Unscoped.OWNER, 'SELECT count(*) FROM accounts')  # `agentrt db status`
        assert isinstance(as_itself, ConfigError)
        assert 'permission denied for table accounts' in str(as_itself) and 'must own the tables' in str(as_itself)
        _, as_a_role = await refusal(Unscoped.ADMIN, 'SELECT count(*) FROM accounts')  # every other transaction
        assert isinstance(as_a_role, ConfigError)
        assert 'permission denied to set role "agentrt_admin"' in str(as_a_role)
        # The revision, which every command and server start reads first as the login role: an internal error
        # quoting `SELECT alembic_version.version_num ...` (exit 70) before.
        with pytest.raises(ConfigError, match='permission denied for table alembic_version') as revision_refused:
            await current_revision(engine)
        for message in (str(as_itself), str(as_a_role), str(revision_refused.value)):
            assert f'GRANT {", ".join(FUNCTION_ROLES)} TO {login}' in message and 'Tenant isolation' in message
            assert '\n' not in message and 'SELECT' not in message
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'GRANT {", ".join(FUNCTION_ROLES)} TO {login}'))
        assert await current_revision(engine) == head_revision()
        raw, bug = await refusal(Unscoped.LEDGER, 'SELECT count(*) FROM conversations')
        assert bug is None and 'permission denied for table conversations' in str(raw)
        # With the roles, the runtime's transactions work, on the pooled connections that were refused before too
        # (each refused prelude's BEGIN rolled back, not left open in the pool).
        for _ in range(3):
            async with sessions() as session, session.begin():
                session.info[SETUP_KEY] = scoped_setup(Unscoped.ADMIN)
                assert (await session.execute(text('SELECT count(*) FROM accounts'))).scalar_one() == 2
    finally:
        await engine.dispose()
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'REVOKE {", ".join(FUNCTION_ROLES)} FROM {login}'))
            await session.execute(text(f'DROP ROLE {login}'))


async def test_migrating_without_the_roles_says_what_to_grant(database: Settings) -> None:
    suffix = uuid.uuid4().hex[:8]
    owner, dbname = f'agentrt_test_owner_{suffix}', f'agentrt_test_owner_{suffix}'
    async with get_engine().connect() as connection:
        autocommit = await connection.execution_options(isolation_level='AUTOCOMMIT')
        await autocommit.execute(text(f'CREATE ROLE {owner} LOGIN NOSUPERUSER'))
        await autocommit.execute(text(f'CREATE DATABASE {dbname} OWNER {owner}'))
    engine = build_engine(get_engine().url.set(username=owner, database=dbname), database)
    try:
        with pytest.raises(MigrationError, match='Tenant isolation') as raised:
            await upgrade(engine)
        assert 'agentrt_app' in str(raised.value)
    finally:
        await engine.dispose()
        async with get_engine().connect() as connection:
            autocommit = await connection.execution_options(isolation_level='AUTOCOMMIT')
            await autocommit.execute(text(f'DROP DATABASE {dbname}'))
            await autocommit.execute(text(f'DROP ROLE {owner}'))


async def test_creating_the_roles_from_several_connections_at_once_succeeds_everywhere() -> None:
    """The migration's role creation, racing itself in four transactions (as databases of one server migrating at
    once): each ends with the role there and itself a member, none fails."""
    spec = importlib.util.spec_from_file_location(
        'rls_migration', MIGRATIONS_DIR / 'versions' / '0012_row_level_security.py'
    )
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    role = f'agentrt_test_race_{uuid.uuid4().hex[:8]}'
    create = text(migration._CREATE_ROLES.format(roles=f"'{role}'"))
    gate = asyncio.Event()

    async def racer() -> None:
        async with get_engine().connect() as connection, connection.begin():
            await gate.wait()
            await connection.execute(create)
            await asyncio.sleep(0.05)  # hold the transaction: the others wait on its row, then find it there

    tasks = [asyncio.create_task(racer()) for _ in range(4)]
    await asyncio.sleep(0.05)
    gate.set()
    try:
        await asyncio.gather(*tasks)
        async with get_db_session(account=Unscoped.OWNER) as session:
            found = await session.execute(text('SELECT count(*) FROM pg_roles WHERE rolname = :r'), {'r': role})
            assert found.scalar_one() == 1
    finally:
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'DROP ROLE IF EXISTS {role}'))
