"""`directory_toolset` through a real `Agent`: parallel calls on separate sessions, cancellation, scoping, bad input."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic_ai import Agent, FunctionToolset, ModelResponse, RunContext, TextPart, ToolCallPart
from pydantic_ai.capabilities import Hooks
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.tools import ToolDefinition
from pydantic_ai.usage import RunUsage
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from agentrt.db.engine import pool_status
from agentrt.db.errors import ConfigError
from agentrt.db.models import Account, AgentInstance, DirectoryEntry
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.demo_data import MEDICAL_ACCOUNT, MEDICAL_SCHEMA, PRODUCE_ACCOUNT, PRODUCE_SCHEMA
from agentrt.tools.dependencies import SessionDependencies
from agentrt.tools.directory_tools import directory_toolset
from tests.factories import listening

pytestmark = pytest.mark.usefixtures('demo_data')

INJECTION = "x'); DROP TABLE accounts; --"


# --- helpers -------------------------------------------------------------------------------------------------------


async def deps_for(slug: str, **overrides: Any) -> SessionDependencies:
    """Deps as the runtime builds them: identity from the seeded account and its first agent instance."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        account = (await session.execute(select(Account).where(Account.slug == slug))).scalar_one()
        agent = (
            await session.execute(select(AgentInstance).where(AgentInstance.account_id == account.id))
        ).scalar_one()
    values: dict[str, Any] = {
        'session_id': f'test-{slug}',
        'account_id': account.id,
        'account_slug': account.slug,
        'agent_instance_id': agent.id,
        'agent_instance_slug': agent.slug,
        'agent_type': agent.agent_type,
        'config': agent.config,
    }
    return SessionDependencies(**{**values, **overrides})


async def entry_ids(slug: str) -> list[int]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        query = select(DirectoryEntry.id).join(Account).where(Account.slug == slug).order_by(DirectoryEntry.id)
        return list((await session.execute(query.limit(5))).scalars())


def call(tool: str, call_id: str, **args: Any) -> ToolCallPart:
    return ToolCallPart(tool, args, tool_call_id=call_id)


@dataclass
class ScriptedModel:
    """A `FunctionModel` function: sends `steps[i]` as the i-th response, then text; records what came back."""

    steps: list[list[ToolCallPart]]
    seen: list[list[Any]] = field(default_factory=list)
    tools: list[ToolDefinition] = field(default_factory=list)

    def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        step = sum(isinstance(m, ModelResponse) for m in messages)
        self.tools = list(info.function_tools)
        if step and isinstance(messages[-1], ModelRequest):
            self.seen.append(list(messages[-1].parts))
        if step < len(self.steps):
            return ModelResponse(parts=list(self.steps[step]))
        return ModelResponse(parts=[TextPart('done')])

    def returns(self, step: int = 0) -> dict[str, ToolReturnPart]:
        """The tool returns (successes and retries) the model saw after response `step`, by call id."""
        return {p.tool_call_id: p for p in self.seen[step] if isinstance(p, ToolReturnPart)}


probe_toolset = FunctionToolset[SessionDependencies]()


@probe_toolset.tool_plain
async def hold_connection(seconds: float) -> int:
    """Test-only: hold a session of its own in the database for `seconds`, returning its backend pid."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        pid = (await session.execute(text('SELECT pg_backend_pid()'))).scalar_one()
        await session.execute(text('SELECT pg_sleep(:s)'), {'s': seconds})
        return pid


def make_agent(model: ScriptedModel) -> Agent[SessionDependencies, str]:
    return Agent(FunctionModel(model), deps_type=SessionDependencies, toolsets=[directory_toolset, probe_toolset])


@asynccontextmanager
async def directory_gate() -> AsyncIterator[None]:
    """Lock `directory_entries` until the block exits, so directory queries queue up, all at once.

    A directory query takes a millisecond; without the gate, two of them could run one after the other
    on the same pooled connection and prove nothing about concurrency. Waiting on the lock, each one
    is known to be in flight on a connection of its own.
    """
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(text('LOCK TABLE directory_entries IN ACCESS EXCLUSIVE MODE'))
        yield


async def wait_for_backends(*, lock_waiters: int, sleepers: int) -> None:
    """Poll `pg_stat_activity` until that many backends wait on a lock and that many are in `pg_sleep`."""
    query = text(
        """SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'), count(*) FILTER (WHERE wait_event = 'PgSleep')
           FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"""
    )
    async with asyncio.timeout(10):
        while True:
            async with get_db_session(account=Unscoped.OWNER) as session:  # sees every role's backends
                if tuple((await session.execute(query)).one()) == (lock_waiters, sleepers):
                    return
            await asyncio.sleep(0.01)


@dataclass
class CallRecord:
    name: str
    start: float
    end: float = float('inf')
    pids: set[int] = field(default_factory=set)
    sessions: set[int] = field(default_factory=set)


@dataclass
class Recorder:
    """Per tool call: when it ran, which backends its statements used and which sessions it began."""

    calls: dict[str, CallRecord] = field(default_factory=dict)
    by_task: dict[asyncio.Task[Any], CallRecord] = field(default_factory=dict)
    hooks: Hooks = field(default_factory=Hooks)

    def __post_init__(self) -> None:
        @self.hooks.on.tool_execute
        async def _timed(ctx: RunContext[Any], *, call: ToolCallPart, tool_def: Any, args: Any, handler: Any) -> Any:
            # The hook runs inside the tool call's own task, so the task identifies the call below.
            record = self.calls[call.tool_call_id] = CallRecord(call.tool_name, time.perf_counter())
            self.by_task[asyncio.current_task()] = record  # type: ignore[index]
            try:
                return await handler(args)
            finally:
                record.end = time.perf_counter()

    def _current(self) -> CallRecord | None:
        task = asyncio.current_task()
        return self.by_task.get(task) if task is not None else None

    def on_statement(self, conn: Any, *_: Any) -> None:
        if (record := self._current()) is not None:
            record.pids.add(conn.connection.driver_connection.get_server_pid())

    def on_begin(self, session: Session, *_: Any) -> None:
        if (record := self._current()) is not None:
            record.sessions.add(id(session))


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    with (
        listening(('before_cursor_execute', rec.on_statement)),
        listening(('after_begin', rec.on_begin), target=Session),
    ):
        yield rec


# --- parallel calls, cancellation ----------------------------------------------------------------------------------


async def test_parallel_calls_in_one_response_each_use_their_own_session(recorder: Recorder) -> None:
    acme = await deps_for(MEDICAL_ACCOUNT)
    first_id = (await entry_ids(MEDICAL_ACCOUNT))[0]
    model = ScriptedModel(
        [
            [
                *(call('hold_connection', f'hold-{i}', seconds=0.5) for i in range(3)),
                call(
                    'search_directory',
                    'cardio',
                    query=None,
                    schema_name=MEDICAL_SCHEMA,
                    filters={'specialty': 'Cardiology', 'city': 'Seattle', 'insurance': 'Medicare'},
                ),
                call('search_directory', 'spanish', query='Spanish', schema_name=MEDICAL_SCHEMA, limit=3),
                call('get_directory_entry', 'entry', entry_id=first_id),
            ]
        ]
    )
    async with directory_gate():
        run = asyncio.create_task(make_agent(model).run('find', deps=acme, capabilities=[recorder.hooks]))
        await wait_for_backends(lock_waiters=3, sleepers=3)
    result = await run

    assert result.output == 'done'
    returns = model.returns()
    assert {p.outcome for p in returns.values()} == {'success'} and len(returns) == 6
    cardio = returns['cardio'].content
    assert cardio.total_matches > 0
    assert all(hit.category == 'Cardiology' and hit.city == 'Seattle' for hit in cardio.results)
    assert len(returns['spanish'].content.results) == 3
    assert returns['entry'].content.id == first_id

    records = recorder.calls
    assert len(records) == 6
    assert all(len(r.pids) == 1 and len(r.sessions) == 1 for r in records.values()), records
    assert len(set().union(*(r.pids for r in records.values()))) == 6  # six backends, one per call
    assert len(set().union(*(r.sessions for r in records.values()))) == 6
    for i in range(3):
        assert records[f'hold-{i}'].pids == {returns[f'hold-{i}'].content}
    assert max(r.start for r in records.values()) < min(r.end for r in records.values())  # all overlapped
    assert pool_status().checked_out == 0


async def test_cancelling_a_run_mid_query_returns_every_connection() -> None:
    acme = await deps_for(MEDICAL_ACCOUNT)
    model = ScriptedModel(
        [
            [
                *(call('hold_connection', f'hold-{i}', seconds=10) for i in range(3)),
                call('search_directory', 'search', query='Cardiology', schema_name=MEDICAL_SCHEMA),
                call('get_directory_entry', 'entry', entry_id=1),
            ]
        ]
    )
    async with directory_gate():
        run = asyncio.create_task(make_agent(model).run('find', deps=acme))
        await wait_for_backends(lock_waiters=2, sleepers=3)
        assert pool_status().checked_out == 6  # five tool calls and the gate
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert pool_status().checked_out == 1  # only the gate
    assert pool_status().checked_out == 0
    await wait_for_backends(lock_waiters=0, sleepers=0)  # and the server stopped the cancelled queries


# --- tenant scoping ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('config', ['seeded', 'unrestricted'])
async def test_tools_never_reach_another_accounts_entries(config: str) -> None:
    # 'unrestricted': no `schemas` in the agent config, so only the account scoping stands in the way.
    acme = await deps_for(MEDICAL_ACCOUNT, **({'config': {}} if config == 'unrestricted' else {}))
    grocer_ids = await entry_ids(PRODUCE_ACCOUNT)
    model = ScriptedModel(
        [
            [
                call('get_directory_entry', 'b-entry', entry_id=grocer_ids[0]),
                call('search_directory', 'b-schema', query='Farms', schema_name=PRODUCE_SCHEMA),
                call(
                    'search_directory',
                    'b-filter',
                    query=None,
                    schema_name=MEDICAL_SCHEMA,
                    filters={'certification': 'USDA Organic'},
                ),
                call('search_directory', 'b-words', query='Farms Growers Orchards', schema_name=MEDICAL_SCHEMA),
            ]
        ]
    )
    await make_agent(model).run('find', deps=acme)
    returns = model.returns()

    assert {k: p.outcome for k, p in returns.items()} == {
        'b-entry': 'retried',
        'b-schema': 'retried',
        'b-filter': 'retried',
        'b-words': 'success',
    }
    saw = {k: p.model_response_str() for k, p in returns.items()}
    assert f'no entry with id {grocer_ids[0]} in this directory' in saw['b-entry']
    assert "unknown directory 'produce_suppliers'; valid directories: medical_providers" in saw['b-schema']
    assert "unknown filter(s) 'certification'" in saw['b-filter']
    assert 'valid filters: accepting_new_patients, category, city, insurance, language, specialty' in saw['b-filter']
    assert returns['b-words'].content.total_matches == 0
    # B's directory never shows up as something A may use.
    assert not any('produce_suppliers, ' in s or 'directories: produce' in s for s in saw.values())


async def test_agent_config_limits_the_directories_a_tool_may_use() -> None:
    acme_ids = await entry_ids(MEDICAL_ACCOUNT)
    restricted = await deps_for(MEDICAL_ACCOUNT, config={'schemas': ['some_other_directory']})
    model = ScriptedModel(
        [
            [
                call('search_directory', 's', query=None, schema_name=MEDICAL_SCHEMA),
                call('get_directory_entry', 'e', entry_id=acme_ids[0]),
            ]
        ]
    )
    await make_agent(model).run('find', deps=restricted)
    saw = {k: p.model_response_str() for k, p in model.returns().items()}
    assert "unknown directory 'medical_providers'; valid directories: none" in saw['s']
    assert f'no entry with id {acme_ids[0]}' in saw['e']


@pytest.mark.parametrize(
    ('schemas', 'said'),
    [
        (MEDICAL_SCHEMA, f"not a string: '{MEDICAL_SCHEMA}'"),
        ([MEDICAL_SCHEMA, 7], f"not an array holding other values: ['{MEDICAL_SCHEMA}', 7]"),
        ({MEDICAL_SCHEMA: True}, 'not an object'),
    ],
)
async def test_schemas_the_tools_cannot_read_refuse_the_run_never_open_every_directory(
    schemas: object, said: str
) -> None:
    # Deps built by hand never went through the tenant lookup's check: a string of schemas was no restriction at all.
    odd = await deps_for(MEDICAL_ACCOUNT, config={'schemas': schemas})
    acme_ids = await entry_ids(MEDICAL_ACCOUNT)
    model = ScriptedModel([[call('search_directory', 's', query=None, schema_name=MEDICAL_SCHEMA)]])
    with pytest.raises(ConfigError, match=re.escape(f'"schemas" must be a list of schema names (text), {said}')):
        await make_agent(model).run('find', deps=odd)
    assert model.seen == []  # refused before any tool ran
    read_entry = directory_toolset.tools['get_directory_entry'].function
    context = RunContext(deps=odd, model=FunctionModel(ScriptedModel([])), usage=RunUsage())
    with pytest.raises(ConfigError, match='"schemas" must be a list'):
        await read_entry(context, acme_ids[0])


async def test_schemas_as_a_list_or_tuple_restrict_the_tools() -> None:
    for schemas in ([MEDICAL_SCHEMA], (MEDICAL_SCHEMA,)):
        model = ScriptedModel([[call('search_directory', 's', query=None, schema_name=MEDICAL_SCHEMA)]])
        await make_agent(model).run('find', deps=await deps_for(MEDICAL_ACCOUNT, config={'schemas': schemas}))
        assert model.returns()['s'].outcome == 'success'


async def test_tool_description_lists_the_agents_own_filters() -> None:
    model = ScriptedModel([])
    await make_agent(model).run('hi', deps=await deps_for(PRODUCE_ACCOUNT))
    search = next(t for t in model.tools if t.name == 'search_directory')
    assert 'produce_suppliers: city' in (search.description or '')
    assert 'certification' in (search.description or '') and 'insurance (' not in (search.description or '')
    assert search.parameters_json_schema['properties']['limit']['maximum'] == 25


# --- malformed arguments -------------------------------------------------------------------------------------------


async def test_malformed_arguments_become_retries_never_crashes() -> None:
    acme = await deps_for(MEDICAL_ACCOUNT)
    search = {'query': None, 'schema_name': MEDICAL_SCHEMA}
    retried = {
        'limit-word': call('search_directory', 'limit-word', **search, limit='many'),
        'limit-huge': call('search_directory', 'limit-huge', **search, limit=10_000),
        'limit-zero': call('search_directory', 'limit-zero', **search, limit=0),
        'query-huge': call('search_directory', 'query-huge', query='x' * 10_000, schema_name=MEDICAL_SCHEMA),
        'filters-str': call('search_directory', 'filters-str', **search, filters='city=Seattle'),
        'filters-many': call('search_directory', 'filters-many', **search, filters={f'f{i}': 'x' for i in range(50)}),
        'value-huge': call('search_directory', 'value-huge', **search, filters={'city': 'S' * 5_000}),
        'value-int': call('search_directory', 'value-int', **search, filters={'accepting_new_patients': 1}),
        'value-maybe': call('search_directory', 'value-maybe', **search, filters={'accepting_new_patients': 'maybe'}),
        # true for a text filter matched the text 'True': nothing, said as zero matches (QA)
        'value-bool': call('search_directory', 'value-bool', **search, filters={'city': True}),
        # lower-cased after parsing, one name dropped the other's criterion without a word (QA)
        'filter-twice': call(
            'search_directory', 'filter-twice', **search, filters={'CITY': 'Seattle', 'city': 'Boston'}
        ),
        'filter-unknown': call('search_directory', 'filter-unknown', **search, filters={'zip': '98101'}),
        'filter-sql': call('search_directory', 'filter-sql', **search, filters={INJECTION: 'x'}),
        'schema-sql': call('search_directory', 'schema-sql', query=None, schema_name=f'{MEDICAL_SCHEMA}{INJECTION}'),
        'schema-missing': call('search_directory', 'schema-missing', query='Cardiology'),
        'extra-arg': call('search_directory', 'extra-arg', **search, account_id=1),
        'query-nul': call('search_directory', 'query-nul', query='a\x00b', schema_name=MEDICAL_SCHEMA),
        'value-nul': call('search_directory', 'value-nul', **search, filters={'city': 'a\x00b'}),
        'bad-json': ToolCallPart(
            'search_directory', '{"query": "a\\ud800", "schema_name": "x"}', tool_call_id='bad-json'
        ),
        'id-negative': call('get_directory_entry', 'id-negative', entry_id=-5),
        'id-word': call('get_directory_entry', 'id-word', entry_id='abc'),
        'id-overflow': call('get_directory_entry', 'id-overflow', entry_id=10**30),
        'id-missing': call('get_directory_entry', 'id-missing', entry_id=10**12),
    }
    succeeded = {
        'query-sql': call('search_directory', 'query-sql', query=INJECTION, schema_name=MEDICAL_SCHEMA),
        'value-sql': call(
            'search_directory', 'value-sql', **search, filters={'city': INJECTION, 'insurance': INJECTION}
        ),
        'odd-case': call('search_directory', 'odd-case', **search, filters={' City ': 'seattle'}, limit='5'),
    }
    model = ScriptedModel([[*retried.values(), *succeeded.values()]])

    result = await make_agent(model).run('find', deps=acme)

    assert result.output == 'done'
    returns = model.returns()
    assert {k for k, p in returns.items() if p.outcome == 'retried'} == set(retried)
    assert {k for k, p in returns.items() if p.outcome == 'success'} == set(succeeded)
    saw = {k: p.model_response_str() for k, p in returns.items()}
    assert 'less than or equal to 25' in saw['limit-huge']
    assert 'at most 200 characters' in saw['query-huge']
    assert (
        'valid filters: accepting_new_patients, category, city, insurance, language, specialty' in saw['filter-unknown']
    )
    assert 'true or false' in saw['value-maybe']
    assert "filter 'city' takes a text value" in saw['value-bool'] and 'only yes/no filters' in saw['value-bool']
    assert "'CITY' and 'city' are the same filter" in saw['filter-twice']
    assert 'no entry with id 1000000000000 in this directory' in saw['id-missing']
    assert returns['query-sql'].content.total_matches == returns['value-sql'].content.total_matches == 0
    odd = returns['odd-case'].content
    assert len(odd.results) == 5 and {hit.city for hit in odd.results} == {'Seattle'}
    async with get_db_session(account=Unscoped.ADMIN) as session:
        assert (await session.execute(select(func.count()).select_from(Account))).scalar_one() == 2
    assert pool_status().checked_out == 0
