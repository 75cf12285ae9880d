"""`simple_chat` / `simple_chat_stream` with the demo model against the seeded directory."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from pydantic_ai import Agent, FunctionToolset, ModelResponse, RunContext, TextPart, ToolCallPart
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ModelMessage, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from sqlalchemy import func, select, text

from agentrt.agents.demo_model import DEMO_MODEL_NAME
from agentrt.agents.simple_chat import (
    BASE_INSTRUCTIONS,
    ToolEvent,
    create_simple_chat_agent,
    simple_chat,
    simple_chat_stream,
)
from agentrt.db.engine import current_settings, pool_status
from agentrt.db.errors import ConfigError, InvalidInputError
from agentrt.db.models import ConversationRow, DirectoryEntry
from agentrt.db.session import Unscoped, get_read_only_session
from agentrt.services.background import get_supervisor
from agentrt.services.conversations import ConcurrentTurnError, PostgresConversationStore, TurnClaim
from agentrt.services.tenancy import UnknownTenantError
from agentrt.tools.dependencies import SessionDependencies
from agentrt.tools.directory_tools import directory_toolset
from tests.factories import ledger_rows

QUESTION = 'Find me cardiologists in Seattle who accept Medicare'


async def test_plain_turn_answers_from_the_directory(demo_data: None) -> None:
    result = await simple_chat(QUESTION, session_id='s1', account='acme-health')
    assert result.output.startswith('I found ')
    assert 'Cardiology providers in Seattle who accept Medicare' in result.output
    assert '1. Dr. ' in result.output
    assert result.model_name == DEMO_MODEL_NAME
    assert result.usage.requests == 3
    assert result.usage.tool_calls == 7
    assert result.usage.input_tokens > 0 and result.usage.output_tokens > 0
    assert result.cost is None  # the demo model is unpriced
    await get_supervisor().join()
    assert pool_status().checked_out == 0


async def test_streamed_and_plain_paths_give_the_same_text(demo_data: None) -> None:
    plain = await simple_chat(QUESTION, session_id='plain', account='acme-health')
    events: list[ToolEvent] = []
    stream = simple_chat_stream(QUESTION, session_id='streamed', account='acme-health', on_tool_event=events.append)
    deltas = [delta async for delta in stream]
    assert len(deltas) > 10
    assert ''.join(deltas) == plain.output
    assert stream.result is not None and stream.result.output == plain.output
    assert stream.result.usage.requests == plain.usage.requests


async def test_stream_reports_parallel_tool_calls(demo_data: None) -> None:
    events: list[ToolEvent] = []
    stream = simple_chat_stream(QUESTION, session_id='events', account='acme-health', on_tool_event=events.append)
    async for _ in stream:
        pass
    searches = [e for e in events if e.tool_name == 'search_directory']
    assert len(searches) == 8  # 4 starts + 4 finishes
    first_finish = next(i for i, e in enumerate(searches) if e.finished)
    assert first_finish == 4, 'all four searches start before the first one finishes'
    assert all(e.outcome == 'success' and e.duration_s is not None for e in searches if e.finished)


async def test_an_on_tool_event_that_returns_an_awaitable_is_refused(demo_data: None) -> None:
    # A plain function wrapping an async one (`lambda event: handle(event)`): its coroutine was never awaited, the
    # callback never ran, with only a RuntimeWarning to say so (QA).
    async def handle(event: ToolEvent) -> None:
        pytest.fail('never awaited')

    stream = simple_chat_stream(
        QUESTION, session_id='events-async', account='acme-health', on_tool_event=lambda e: handle(e)
    )
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)  # no "coroutine was never awaited"
        with pytest.raises(InvalidInputError, match='on_tool_event returned an awaitable') as raised:
            async for _ in stream:
                pass
    assert raised.value.field == 'on_tool_event'
    # A task is already scheduled: its work runs, and the turn goes on (the message advises handing work to one).
    seen: list[str] = []

    async def log(event: ToolEvent) -> None:
        seen.append(event.tool_name)

    turn = {'session_id': 'events-task', 'account': 'acme-health'}
    stream = simple_chat_stream(QUESTION, **turn, on_tool_event=lambda event: asyncio.create_task(log(event)))
    async for _ in stream:
        pass
    await asyncio.sleep(0)
    assert stream.result is not None and 'search_directory' in seen


async def test_history_persists_across_turns(demo_data: None) -> None:
    first = await simple_chat(QUESTION, session_id='conv', account='acme-health')
    seen: list[int] = []

    def count_history(messages, info):
        from pydantic_ai import ModelResponse, TextPart

        seen.append(len(messages))
        return ModelResponse(parts=[TextPart('noted')])

    second = await simple_chat('thanks', session_id='conv', account='acme-health', model=FunctionModel(count_history))
    assert second.output == 'noted'
    assert seen[0] > 6, "the second turn sees the first turn's messages"
    from tests.agents.conftest import account_id

    store = PostgresConversationStore(await account_id('acme-health'))
    conversation = await store.load('conv')
    assert conversation is not None
    texts = [p.content for m in conversation.messages if m.kind == 'response' for p in m.parts if p.part_kind == 'text']
    assert texts == [first.output, 'noted']
    assert conversation.messages[-1].parts[0].content == 'noted'


async def test_concurrent_turns_on_one_conversation(demo_data: None) -> None:
    await simple_chat(QUESTION, session_id='race', account='acme-health')
    outcomes = await asyncio.gather(
        simple_chat('Dermatologists in Boston', session_id='race', account='acme-health'),
        simple_chat('Pediatricians in Denver', session_id='race', account='acme-health'),
        return_exceptions=True,
    )
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], ConcurrentTurnError), outcomes
    assert 'race' in str(errors[0])
    await get_supervisor().join()  # the winner's post-turn work holds connections of its own
    assert pool_status().checked_out == 0


async def test_tenant_sees_only_its_own_directory(demo_data: None) -> None:
    result = await simple_chat('organic berries in Fresno', session_id='t', account='green-grocer')
    assert 'Berries suppliers in Fresno' in result.output
    medical = await simple_chat('organic berries in Fresno', session_id='t', account='acme-health')
    assert 'Berries' not in medical.output.split('\n', 1)[0] or 'no' in medical.output


async def test_unknown_account_lists_the_valid_ones(demo_data: None) -> None:
    with pytest.raises(UnknownTenantError, match="unknown account 'nope'; accounts: acme-health, green-grocer"):
        await simple_chat(QUESTION, session_id='x', account='nope')


async def test_unknown_agent_lists_the_valid_ones(demo_data: None) -> None:
    with pytest.raises(UnknownTenantError, match='agents: provider-finder'):
        await simple_chat(QUESTION, session_id='x', account='acme-health', agent_instance='nope')


@pytest.mark.parametrize('model', ['nosuch:model', 'openai-chat:gpt-4o-mini'])
async def test_unusable_model_fails_before_anything_runs(
    demo_data: None, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv('OPENAI_API_KEY', raising=False)
    with pytest.raises(ConfigError, match=model):
        await simple_chat(QUESTION, session_id='x', account='acme-health', model=model)


@pytest.mark.parametrize('model', ['', '   '])
async def test_an_empty_model_name_is_refused_not_the_default(demo_data: None, model: str) -> None:
    # `--model "$MODEL"` with MODEL unset ran the configured default (the demo) as if no model had been asked for,
    # while AGENTRT_MODEL= is refused; blanks said "Unknown model: ".
    with pytest.raises(ConfigError, match='the model name is empty'):
        await simple_chat(QUESTION, session_id='x', account='acme-health', model=model)


async def test_empty_message_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match='empty'):
        await simple_chat('   ', session_id='x', account='acme-health')


async def test_consumer_stopping_a_stream_early_saves_nothing_and_bills_what_ran(demo_data: None) -> None:
    from sqlalchemy import func, select

    from agentrt.db.models.ledger import LLMRequestRow
    from agentrt.db.session import Unscoped, get_db_session
    from agentrt.services.ledger import get_request_tracker

    received = []
    async with simple_chat_stream(QUESTION, session_id='early', account='acme-health', stream_delay=0.01) as stream:
        async for delta in stream:
            received.append(delta)
            if len(received) == 3:
                break
    assert stream.result is None
    await get_request_tracker().flush()
    await get_supervisor().join()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = (
            await session.execute(
                select(LLMRequestRow.status, LLMRequestRow.run_step).order_by(LLMRequestRow.started_at)
            )
        ).all()
        conversations = (await session.execute(select(func.count()).select_from(ConversationRow))).scalar_one()
    assert [status for status, _ in rows] == [
        'complete',
        'complete',
        'cancelled',
    ]  # two tool rounds, the stopped answer
    # The cut request's own step: it is recorded as the run ends, whose context said step 0 (a QA run: 105 of 105).
    assert [step for _, step in rows] == [1, 2, 3]
    assert conversations == 0  # an unfinished turn is not saved
    assert pool_status().checked_out == 0


async def test_a_stream_dropped_without_aclose_closes_cleanly(demo_data: None) -> None:
    """A consumer that breaks out of `async for` and drops the stream without `aclose()` or `async with`: the stream
    once referred to itself through its generator, so only the cyclic GC freed it, finalising the nested generators
    all at once ("Task exception was never retrieved: aclose(): asynchronous generator is already running")."""
    import gc

    from sqlalchemy import func, select

    from agentrt.db.models.ledger import LLMRequestRow
    from agentrt.db.session import Unscoped, get_db_session
    from agentrt.services.ledger import get_request_tracker

    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        stream = simple_chat_stream(QUESTION, session_id='dropped', account='acme-health', stream_delay=0.01)
        async for _ in stream:
            break
        del stream
        for _ in range(50):  # the finaliser's aclose() runs as a task of its own
            gc.collect()
            await asyncio.sleep(0.02)
            if await _cancelled_rows('dropped') == 1:
                break
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert reported == []
    await get_request_tracker().flush()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        statuses = (await session.execute(select(LLMRequestRow.status).order_by(LLMRequestRow.started_at))).scalars()
        conversations = (await session.execute(select(func.count()).select_from(ConversationRow))).scalar_one()
    assert list(statuses) == ['complete', 'complete', 'cancelled'] and conversations == 0
    result = await simple_chat(QUESTION, session_id='dropped', account='acme-health')  # the claim was released
    assert result.output


async def _cancelled_rows(session_id: str) -> int:
    from agentrt.services.ledger import get_request_tracker
    from tests.factories import scalar

    await get_request_tracker().flush()
    return int(
        await scalar(
            "SELECT count(*) FROM llm_requests WHERE status = 'cancelled' AND chat_session_id = :id", id=session_id
        )
    )


# Extra toolsets and instructions: per turn, or baked into an agent of one's own; never a module-level change.

_extra_tools = FunctionToolset[SessionDependencies]()


@_extra_tools.tool
async def count_entries(ctx: RunContext[SessionDependencies]) -> int:
    """How many directory entries this account has."""
    async with get_read_only_session(account=Unscoped.ADMIN) as session:
        query = select(func.count()).where(DirectoryEntry.account_id == ctx.deps.account_id)
        return (await session.execute(query)).scalar_one()


class _Seen:
    """A scripted model that calls `count_entries` if it is offered, and reports what it was given."""

    def __init__(self) -> None:
        self.tools: list[list[str]] = []
        self.instructions: list[str | None] = []

    def respond(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.tools.append(sorted(tool.name for tool in info.function_tools))
        self.instructions.append(info.instructions)
        returned = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        if returned:
            return ModelResponse(parts=[TextPart(f'{returned[-1].content} entries')])
        if 'count_entries' in self.tools[-1]:
            return ModelResponse(parts=[ToolCallPart('count_entries', {})])
        return ModelResponse(parts=[TextPart('no extra tool')])

    async def stream(self, messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        response = self.respond(messages, info)
        for part in response.parts:
            if isinstance(part, TextPart):
                yield part.content
            elif isinstance(part, ToolCallPart):
                yield {0: DeltaToolCall(name=part.tool_name, json_args='{}', tool_call_id=part.tool_call_id)}

    def model(self) -> FunctionModel:
        return FunctionModel(self.respond, stream_function=self.stream)


async def test_extra_toolsets_and_instructions_apply_to_one_turn_only(demo_data: None) -> None:
    seen = _Seen()
    result = await simple_chat(
        'how many?',
        session_id='extra',
        account='acme-health',
        model=seen.model(),
        toolsets=[_extra_tools],
        instructions='Count before answering.',
    )
    assert result.output == '3000 entries'  # the tool ran, in its own session, scoped to acme-health
    assert seen.tools[0] == ['count_entries', 'get_directory_entry', 'search_directory']
    assert seen.instructions[0] is not None and 'Count before answering.' in seen.instructions[0]
    assert seen.instructions[0].startswith(BASE_INSTRUCTIONS)

    later = await simple_chat('how many now?', session_id='plain-after', account='acme-health', model=seen.model())
    assert later.output == 'no extra tool' and seen.tools[-1] == ['get_directory_entry', 'search_directory']
    # `toolsets=None` is "no extra tools", as it is for pydantic-ai (it was refused as not a sequence).
    none = await simple_chat(
        'and now?', session_id='none-extra', account='acme-health', model=seen.model(), toolsets=None
    )
    assert none.output == 'no extra tool' and seen.tools[-1] == ['get_directory_entry', 'search_directory']
    async with simple_chat_stream(
        'and now?', session_id='none-extra', account='acme-health', model=seen.model(), toolsets=None
    ) as stream:
        assert ''.join([delta async for delta in stream]) == 'no extra tool'
    assert create_simple_chat_agent(toolsets=None).toolsets  # the directory toolset alone
    assert 'Count before answering.' not in (seen.instructions[-1] or '')
    assert sorted(directory_toolset.tools) == ['get_directory_entry', 'search_directory']


async def test_streamed_turn_takes_extra_toolsets_and_instructions(demo_data: None) -> None:
    seen = _Seen()
    async with simple_chat_stream(
        'how many?',
        session_id='extra-stream',
        account='green-grocer',
        model=seen.model(),
        toolsets=[_extra_tools],
        instructions=[lambda ctx: f'Tenant {ctx.deps.account_slug} asks.'],
    ) as stream:
        text = ''.join([delta async for delta in stream])
    assert text == '1500 entries' and stream.result is not None and stream.result.output == text
    assert 'Tenant green-grocer asks.' in (seen.instructions[0] or '')


async def test_an_agent_built_with_extras_runs_through_simple_chat(demo_data: None) -> None:
    seen = _Seen()
    agent = create_simple_chat_agent(toolsets=[_extra_tools], instructions='Always count.')
    result = await simple_chat(
        'how many?', session_id='own-agent', account='acme-health', model=seen.model(), agent=agent
    )
    assert result.output == '3000 entries' and 'Always count.' in (seen.instructions[0] or '')
    rows = await ledger_rows(chat_session_id='own-agent')
    assert len(rows) == 2 and {row['agent_name'] for row in rows} == {'simple_chat'}  # the ledger rides along


def _answer(text: str) -> FunctionModel:
    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        yield text

    return FunctionModel(
        lambda messages, info: ModelResponse(parts=[TextPart(text)]), stream_function=stream, model_name=f'says-{text}'
    )


@pytest.mark.parametrize('streamed', [False, True])
async def test_an_agents_own_model_runs_its_turns_unless_the_call_names_one(demo_data: None, streamed: bool) -> None:
    # create_simple_chat_agent(model) is "the default model of the agent": a turn without model= runs it, not
    # AGENTRT_MODEL (the demo), and a turn's own model= still wins.
    agent = create_simple_chat_agent(_answer('mine'))

    async def turn(session_id: str, model: FunctionModel | None = None) -> tuple[str, str]:
        arguments = {'session_id': session_id, 'account': 'acme-health', 'agent': agent, 'model': model}
        if not streamed:
            result = await simple_chat('who answers?', **arguments)  # type: ignore[arg-type]
            return result.output, result.model_name
        async with simple_chat_stream('who answers?', **arguments) as stream:  # type: ignore[arg-type]
            text = ''.join([delta async for delta in stream])
        assert stream.result is not None
        return text, stream.result.model_name

    assert await turn(f'agent-model-{streamed}') == ('mine', 'says-mine')
    assert await turn(f'call-model-{streamed}', _answer('theirs')) == ('theirs', 'says-theirs')
    rows = await ledger_rows(chat_session_id=f'agent-model-{streamed}')
    assert [row['model'] for row in rows] == ['says-mine']


@pytest.mark.parametrize('streamed', [False, True])
async def test_an_agent_of_ones_own_without_the_ledger_is_billed_all_the_same(demo_data: None, streamed: bool) -> None:
    # A turn bills every model request (and holds it against a budget) whatever agent runs it: an agent built without
    # `ledger_capability()` left its turns without a ledger row, and without a budget's admission.
    agent = Agent(_answer('unledgered'), deps_type=SessionDependencies)
    session_id = f'no-ledger-{streamed}'
    arguments = {'session_id': session_id, 'account': 'acme-health', 'agent': agent}
    if streamed:
        async with simple_chat_stream('bill me', **arguments) as stream:  # type: ignore[arg-type]
            assert ''.join([delta async for delta in stream]) == 'unledgered'
    else:
        assert (await simple_chat('bill me', **arguments)).output == 'unledgered'  # type: ignore[arg-type]
    rows = await ledger_rows(chat_session_id=session_id)
    billed = [(row['model'], row['status'], row['streamed']) for row in rows]
    assert billed == [('says-unledgered', 'complete', streamed)]


_broken_tools = FunctionToolset[SessionDependencies]()


@_broken_tools.tool_plain(name='count_entries')
async def broken_count() -> int:
    """A tool of the user's own that fails with an exception of its own."""
    raise ZeroDivisionError('the tool broke')


@pytest.mark.parametrize('streamed', [False, True])
async def test_a_users_own_tool_raising_reaches_the_caller_as_it_is_unsaved_and_billed(
    demo_data: None, streamed: bool
) -> None:
    # The README's errors section: code of your own that raises reaches you untranslated; the turn is not saved and
    # the ledger has the request that asked for the tool.
    session_id = f'broken-tool-{streamed}'
    turn = {'session_id': session_id, 'account': 'acme-health', 'model': _Seen().model(), 'toolsets': [_broken_tools]}
    with pytest.raises(ZeroDivisionError, match='the tool broke'):
        await _turn(streamed, 'how many?', **turn)
    await get_supervisor().join()
    rows = await ledger_rows()
    assert [(row['status'], row['chat_session_id']) for row in rows] == [('complete', session_id)]
    assert await PostgresConversationStore(rows[0]['account_id']).read_record(session_id) is None
    assert pool_status().checked_out == 0


@dataclass
class _CancelsItsCaller(AbstractCapability[Any]):
    """Cancels `caller` `after` turns of the event loop once the run has started (`before_run`)."""

    after: int
    caller: asyncio.Task[Any] | None = None

    async def before_run(self, ctx: RunContext[Any]) -> None:
        loop = asyncio.get_running_loop()

        def step(left: int) -> None:
            if left:
                loop.call_soon(step, left - 1)
            elif self.caller is not None:
                self.caller.cancel()

        step(self.after)


async def _turn(streamed: bool, message: str = 'hi', **arguments: Any) -> None:
    """One turn, `simple_chat_stream` read to its end or `simple_chat`."""
    if streamed:
        async with simple_chat_stream(message, **arguments) as stream:
            async for _ in stream:
                pass
    else:
        await simple_chat(message, **arguments)


def _slow_model(where: str) -> FunctionModel:
    """A model that sleeps in its request (`model`), or asks for two tools that sleep (`tools`), then answers."""

    async def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if where == 'model':
            await asyncio.sleep(30)
        if where == 'tools' and len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart('nap', {}, tool_call_id=f'nap-{i}') for i in range(2)])
        return ModelResponse(parts=[TextPart('done')])

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        response = await respond(messages, info)
        if isinstance(response.parts[0], TextPart):
            yield 'done'
        else:
            yield {i: DeltaToolCall('nap', '{}', tool_call_id=f'nap-{i}') for i in range(2)}

    return FunctionModel(respond, stream_function=stream)


@pytest.mark.parametrize('streamed', [False, True])
@pytest.mark.parametrize('where', ['model', 'tools'])
async def test_a_turn_an_anyio_cancel_scope_cuts_leaves_its_conversation_free(
    demo_data: None, streamed: bool, where: str
) -> None:
    # Starlette cuts a streamed response whose client left, and anyio code a timeout, with a cancel scope: it cancels
    # again at every await until it exits, and the claim's release was cancelled too; the next message on the
    # conversation was refused as concurrent ("one running now holds it") for the whole lease (QA: 59 s).
    toolset: FunctionToolset[SessionDependencies] = FunctionToolset()

    @toolset.tool_plain
    async def nap() -> str:
        await asyncio.sleep(30)
        return 'rested'

    session_id = f'anyio-cut-{where}-{streamed}'
    with anyio.move_on_after(0.5) as scope:
        await _turn(
            streamed, session_id=session_id, account='acme-health', model=_slow_model(where), toolsets=[toolset]
        )
    assert scope.cancelled_caught
    with anyio.fail_after(5):  # at once, not after the lease
        await _turn(streamed, 'again', session_id=session_id, account='acme-health', model=_answer('fine'))
    await get_supervisor().join()
    rows = await ledger_rows(account_slug='acme-health', chat_session_id=session_id)
    # the cut request `cancelled` (cut in its tools: its one request had ended), then the next turn's
    first = 'cancelled' if where == 'model' else 'complete'
    assert [row['status'] for row in rows] == [first, 'complete']


@pytest.mark.parametrize('streamed', [False, True])
async def test_a_turn_cancelled_again_while_it_releases_its_conversation_still_frees_it(
    demo_data: None, streamed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second task.cancel() (an outer timeout over an inner one, a task group aborting) landing while the turn gave
    # its claim back cancelled the release's statement, or the wait before it: the conversation stayed claimed for the
    # whole lease, silently (QA: 12 of 32 cuts with two cancels 2 ms apart). The lease is short here so that the
    # claim's heartbeat runs (its end is waited for first); the release is made slow enough for the cancels to land.
    monkeypatch.setattr(current_settings(), 'turn_lease_seconds', 0.6)
    real_release = TurnClaim.release

    async def slow_release(self: TurnClaim) -> None:
        await asyncio.sleep(0.05)
        await real_release(self)

    monkeypatch.setattr(TurnClaim, 'release', slow_release)
    session_id = f'cancelled-again-{streamed}'
    for cancels in (2, 30):
        task = asyncio.create_task(
            _turn(streamed, session_id=session_id, account='acme-health', model=_slow_model('model'))
        )
        await asyncio.sleep(0.4)  # in its model request, its heartbeat running
        for _ in range(cancels):
            task.cancel()
            await asyncio.sleep(0.002)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)  # the release's statement done, whatever ran it
        async with get_read_only_session(account=Unscoped.ADMIN) as session:
            claims = (await session.execute(text('SELECT count(*) FROM conversation_turns'))).scalar_one()
        assert claims == 0, f'{cancels} cancels left the conversation claimed'
    await get_supervisor().join()


async def test_a_turn_sent_while_the_last_one_is_still_ending_takes_its_conversation_over(demo_data: None) -> None:
    # A client that hangs up and sends its next message at once (the server cancels the cut turn, whose tools take a
    # moment to stop): the new turn was refused as concurrent, "one running now holds it" (QA: 6 of 10 retries).
    toolset: FunctionToolset[SessionDependencies] = FunctionToolset()

    @toolset.tool_plain
    async def nap() -> str:
        try:
            await asyncio.sleep(30)
        finally:  # a tool whose clean-up takes a while (a rollback, a remote call's cancel)
            await asyncio.shield(asyncio.sleep(0.5))
        return 'rested'

    cut = asyncio.create_task(
        simple_chat('nap', session_id='ending', account='acme-health', model=_slow_model('tools'), toolsets=[toolset])
    )
    await asyncio.sleep(0.5)  # in its tools
    cut.cancel()
    with anyio.fail_after(5):
        result = await simple_chat('again', session_id='ending', account='acme-health', model=_answer('fine'))
    assert result.output == 'fine'
    with contextlib.suppress(asyncio.CancelledError):
        await cut
    assert cut.cancelled()

    running = asyncio.create_task(  # a turn that is not ending is still refused
        simple_chat('nap', session_id='running', account='acme-health', model=_slow_model('tools'), toolsets=[toolset])
    )
    await asyncio.sleep(0.5)
    assert not running.done(), running
    with pytest.raises(ConcurrentTurnError) as refused:
        await simple_chat('meanwhile', session_id='running', account='acme-health', model=_answer('fine'))
    assert refused.value.stage == 'start'
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    await get_supervisor().join()


def _waiting_run_tasks() -> list[asyncio.Task[Any]]:
    """pydantic-ai's tasks that run a run's `wrap_run` chain (`ScopedTask`), still running."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and task.get_coro().__qualname__.startswith('ScopedTask.')  # type: ignore[union-attr]
    ]


@pytest.mark.parametrize('streamed', [False, True])
async def test_a_turn_cancelled_as_its_run_starts_leaves_no_task_behind(demo_data: None, streamed: bool) -> None:
    # pydantic-ai runs a run's `wrap_run` chain in a task of its own that waits for the run's body to end; a
    # cancellation of the caller landing just after the body started left that task waiting for ever, holding the
    # run's context and messages (4% of the turns cancelled at random by `asyncio.timeout` in
    # scripts/leak_check_library.py: 12 tasks after 300 turns). Each delay below lands the cancellation one turn of the
    # loop later, so one of them falls in that window whatever the run does before it.
    for after in range(12):
        capability = _CancelsItsCaller(after)
        agent = Agent(_answer('late'), deps_type=SessionDependencies, capabilities=[capability])
        arguments: dict[str, Any] = {'session_id': f'cancelled-{streamed}-{after}', 'account': 'acme-health'}

        task = asyncio.create_task(_turn(streamed, agent=agent, **arguments))
        capability.caller = task
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await asyncio.sleep(0)
    assert _waiting_run_tasks() == []
    async with get_read_only_session(account=Unscoped.ADMIN) as session:
        claims = (await session.execute(text('SELECT count(*) FROM conversation_turns'))).scalar_one()
    assert claims == 0
