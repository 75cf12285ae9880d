"""Turns racing on one conversation: one turn at a time. The first to claim it runs and saves; the others are
refused before any model request (`ConcurrentTurnError`, stage 'start'); a turn that loses its conversation while
running stops before its next model request (stage 'request'). The ledger shows how far each got."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pydantic_ai import FunctionToolset, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.models.wrapper import WrapperModel
from sqlalchemy import text

from agentrt.agents import chat_turn
from agentrt.agents.demo_model import demo_model
from agentrt.agents.simple_chat import ChatResult, simple_chat, simple_chat_stream
from agentrt.db.driver import DriverStatement
from agentrt.db.engine import current_settings, pool_status
from agentrt.db.errors import DatabaseDisconnectedError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.conversations import ConcurrentTurnError, PostgresConversationStore
from agentrt.services.ledger import get_request_tracker
from agentrt.tools.dependencies import SessionDependencies
from tests.agents.conftest import account_id
from tests.factories import ledger_rows, scalar, slow_commit_reply

TURNS = 20
QUESTIONS = ['Find me cardiologists in Seattle who accept Medicare', 'Pediatricians in Denver who speak Spanish']


async def _turn(message: str, session_id: str, streamed: bool, **kwargs: object) -> ChatResult:
    if not streamed:
        return await simple_chat(message, session_id=session_id, account='acme-health', **kwargs)  # type: ignore[arg-type]
    async with simple_chat_stream(message, session_id=session_id, account='acme-health', **kwargs) as stream:  # type: ignore[arg-type]
        async for _ in stream:
            pass
    assert stream.result is not None
    return stream.result


class _HeldDemoModel(WrapperModel):
    """The demo model, holding a turn's first request until each of the `turns` has either been refused or reached
    the model: the winner keeps the conversation until every other turn has tried to claim it, however slowly they
    get there (on a loaded machine a turn may otherwise end before the last ones reach the claim)."""

    def __init__(self, turns: int) -> None:
        super().__init__(demo_model())
        self._waiting = turns
        self._all_arrived = asyncio.Event()

    def arrived(self) -> None:
        self._waiting -= 1
        if self._waiting == 0:
            self._all_arrived.set()

    async def _hold(self, messages: list[ModelMessage]) -> None:
        if not self._all_arrived.is_set():  # a turn's first request: its later ones come after the gate opened
            self.arrived()
        await self._all_arrived.wait()

    async def request(self, messages: list[ModelMessage], *args: Any, **kwargs: Any) -> ModelResponse:
        await self._hold(messages)
        return await super().request(messages, *args, **kwargs)

    @asynccontextmanager
    async def request_stream(self, messages: list[ModelMessage], *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        await self._hold(messages)
        async with super().request_stream(messages, *args, **kwargs) as stream:
            yield stream


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_twenty_turns_at_once_one_runs_and_the_others_are_refused_before_any_request(
    demo_data: None, streamed: bool
) -> None:
    first = await _turn('Dermatologists in Boston', 'crowd', streamed)
    held = _HeldDemoModel(TURNS)

    async def crowd_turn(message: str) -> ChatResult:
        try:
            return await _turn(message, 'crowd', streamed, model=held)
        except ConcurrentTurnError:
            held.arrived()
            raise

    outcomes = await asyncio.gather(*(crowd_turn(QUESTIONS[i % 2]) for i in range(TURNS)), return_exceptions=True)
    saved = [o for o in outcomes if isinstance(o, ChatResult)]
    lost = [o for o in outcomes if not isinstance(o, ChatResult)]
    assert len(saved) == 1 and len(lost) == TURNS - 1, outcomes
    assert all(isinstance(o, ConcurrentTurnError) and o.stage == 'start' for o in lost), lost
    assert 'another turn holds conversation' in str(lost[0]) and 'sent nothing' in str(lost[0])
    await get_request_tracker().flush()
    await get_supervisor().join()
    per_run = Counter(row['run_id'] for row in await ledger_rows(chat_session_id='crowd'))
    assert per_run == {first.run_id: first.usage.requests, saved[0].run_id: 3}, 'the losers sent nothing'
    conversation = await PostgresConversationStore(await account_id('acme-health')).load('crowd')
    assert conversation is not None and len(conversation.messages) == 12
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0, 'every claim was released'
    assert pool_status().checked_out == 0


def _respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Request 1 calls `wait_turn`; request 2 answers."""
    if any(isinstance(p, ToolReturnPart) for p in messages[-1].parts):
        return ModelResponse(parts=[TextPart('done')])
    return ModelResponse(parts=[ToolCallPart('wait_turn', {}, tool_call_id='wait-1')])


async def _stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
    for part in _respond(messages, info).parts:
        if isinstance(part, TextPart):
            yield part.content
        else:
            yield {0: DeltaToolCall('wait_turn', '{}', tool_call_id='wait-1')}


def _gated(started: asyncio.Event, gate: asyncio.Event) -> FunctionToolset[SessionDependencies]:
    toolset = FunctionToolset[SessionDependencies]()

    @toolset.tool_plain
    async def wait_turn() -> str:
        """Hold the turn between its two model requests until the test lets it go."""
        started.set()
        await gate.wait()
        return 'go'

    return toolset


@pytest.mark.parametrize('check_s', [0.0, 0.2], ids=['checks-every-request', 'checks-after-a-pause'])
@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_turn_whose_conversation_moved_on_stops_before_its_next_request(
    demo_data: None, streamed: bool, check_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `AGENTRT_TURN_CHECK_SECONDS=0` the turn checks before every request; with a pause longer than the
    setting (a process that hung past its lease pauses far longer) it checks before the next one."""
    monkeypatch.setattr(current_settings(), 'turn_check_seconds', check_s)
    model = FunctionModel(_respond, stream_function=_stream)
    started, gate = asyncio.Event(), asyncio.Event()
    slow = asyncio.create_task(_turn('slow', 'moved', streamed, model=model, toolsets=[_gated(started, gate)]))
    await started.wait()  # request 1 sent; the turn sits in its tool
    # Its claim expires (as if its process had hung past the lease): another turn takes the conversation over.
    await scalar("UPDATE conversation_turns SET expires_at = now() - interval '1 second' RETURNING 1")
    go = asyncio.Event()
    go.set()
    other = await _turn('quick', 'moved', streamed, model=model, toolsets=[_gated(asyncio.Event(), go)])
    await asyncio.sleep(check_s * 1.25)
    gate.set()
    with pytest.raises(ConcurrentTurnError) as info:
        await slow
    assert info.value.stage == 'request' and info.value.stopped_early
    assert 'stopped before its next model request' in str(info.value)
    await get_request_tracker().flush()
    rows = await ledger_rows(chat_session_id='moved')
    per_run = Counter(row['run_id'] for row in rows)
    assert per_run.pop(other.run_id) == 2
    assert list(per_run.values()) == [1], 'the slow turn sent request 1 only'
    conversation = await PostgresConversationStore(await account_id('acme-health')).load('moved')
    assert conversation is not None and [m.parts[0].content for m in conversation.messages[:1]] == ['quick']
    assert len(conversation.messages) == 4
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0


@pytest.mark.parametrize('check_s', [0.0, 600.0], ids=['checked', 'found-at-save'])
async def test_a_save_by_a_writer_that_does_not_claim_stops_the_turn_once_it_checks(
    demo_data: None, check_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydantic-ai's own `save` on the same store takes no claim: a turn that checks (after
    `AGENTRT_TURN_CHECK_SECONDS`) stops before its next request; one that has not checked yet loses at its save."""
    monkeypatch.setattr(current_settings(), 'turn_check_seconds', check_s)
    store = PostgresConversationStore(await account_id('acme-health'))
    await _turn('first', 'unclaimed', False, model=FunctionModel(lambda m, i: ModelResponse(parts=[TextPart('ok')])))
    started, gate = asyncio.Event(), asyncio.Event()
    model = FunctionModel(_respond, stream_function=_stream)
    slow = asyncio.create_task(_turn('slow', 'unclaimed', False, model=model, toolsets=[_gated(started, gate)]))
    await started.wait()
    conversation = await store.load('unclaimed')
    assert conversation is not None
    conversation.messages.append(ModelRequest(parts=[UserPromptPart('written without a claim')]))
    await store.save(conversation)
    gate.set()
    with pytest.raises(ConcurrentTurnError) as info:
        await slow
    assert info.value.stage == ('request' if check_s == 0 else 'save')
    await get_request_tracker().flush()
    assert len(await ledger_rows(chat_session_id='unclaimed')) == (2 if check_s == 0 else 3)
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0


async def test_a_live_claim_of_another_process_refuses_the_turn_and_an_expired_one_is_taken_over(
    demo_data: None,
) -> None:
    account = await account_id('acme-health')
    claim = (
        'INSERT INTO conversation_turns (account_id, conversation_id, claim_id, expires_at) '
        "VALUES (:a, 'held', 'other-process', now() + interval '1 minute') RETURNING 1"
    )
    await scalar(claim, a=account)
    # From here a killed process's claim looks the same (or one a turn could not release when the database went down
    # as it ended): the message says how long the conversation stays held rather than only that a turn is running.
    for streamed in (False, True):
        with pytest.raises(ConcurrentTurnError, match=r"holds conversation 'held'.* for up to \d+ s more") as refused:
            await _turn(QUESTIONS[0], 'held', streamed)
        assert refused.value.expires_in_s is not None and 55 <= refused.value.expires_in_s <= 60
        # A running turn renews its claim: the time left is no promise while it runs, and the message says so.
        assert 'one running now holds it until it ends' in str(refused.value)
        assert 'process died' in str(refused.value) and 'AGENTRT_TURN_LEASE_SECONDS' in str(refused.value)
    # Without the claim's expiry at hand (a caller raising it itself) the message still says why a turn may wait.
    assert 'process died' in str(ConcurrentTurnError('held', stage='start'))
    await get_request_tracker().flush()
    assert await ledger_rows(chat_session_id='held') == []
    await scalar("UPDATE conversation_turns SET expires_at = now() - interval '1 second' RETURNING 1")
    result = await simple_chat(QUESTIONS[0], session_id='held', account='acme-health')
    assert result.output.startswith('I found')
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0


async def test_a_failed_or_abandoned_turn_releases_the_conversation(demo_data: None) -> None:
    def fail(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise RuntimeError('model down')

    with pytest.raises(RuntimeError):
        await simple_chat('hello', session_id='released', account='acme-health', model=FunctionModel(fail))
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0
    async with simple_chat_stream(QUESTIONS[1], session_id='released', account='acme-health') as stream:
        async for _ in stream:
            break  # the consumer walks away mid-answer
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0
    result = await simple_chat(QUESTIONS[0], session_id='released', account='acme-health')
    assert result.output.startswith('I found')


async def test_a_turn_cancelled_as_its_claim_commits_releases_the_conversation(
    demo_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A turn cancelled (a client gone, a timeout) while the reply to its start's COMMIT was in flight left its claim,
    # committed, to the lease: the user's next message on the conversation was refused (ConcurrentTurnError, HTTP
    # 409) for up to AGENTRT_TURN_LEASE_SECONDS, with no turn running.
    with slow_commit_reply(monkeypatch) as committed:
        turn = asyncio.create_task(simple_chat(QUESTIONS[0], session_id='cancelled-start', account='acme-health'))
        await committed.wait()  # the turn's first commit: its claim and the conversation's tail
        turn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await turn
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0
    result = await simple_chat(QUESTIONS[0], session_id='cancelled-start', account='acme-health')
    assert result.output.startswith('I found')


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_the_next_turn_takes_over_the_claim_a_cancelled_turns_start_commits_after_it_left(
    demo_data: None, monkeypatch: pytest.MonkeyPatch, streamed: bool
) -> None:
    # A turn cancelled during its start stops waiting for it (CANCELLED_START_WAIT_S); the start runs on and may commit
    # the conversation's claim after that. Its claim was marked this process's to take over only once the start had
    # ended: a next turn that claimed in between (the start's claim committed, its task not ended yet) was refused as
    # concurrent, "another turn holds conversation" (a flaky test on a loaded machine). Gates order it here.
    real_lookup, real_retry = chat_turn.lookup_tenant_on, chat_turn.retry_on_disconnect
    looking_up, answered, committed, end = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
    lookups, starts = [], []

    async def unanswered_lookup(*args: Any, **kwargs: Any) -> Any:
        lookups.append(1)
        if len(lookups) == 1:  # the cancelled turn's: a database that does not answer yet
            looking_up.set()
            await answered.wait()
        return await real_lookup(*args, **kwargs)

    async def start_ending_later(operation: Any, *, what: str = '') -> Any:
        result = await real_retry(operation, what=what)
        if what == 'turn start':
            starts.append(1)
            if len(starts) == 1:  # the cancelled turn's start: its claim committed, its task still running
                committed.set()
                await end.wait()
        return result

    monkeypatch.setattr(chat_turn, 'CANCELLED_START_WAIT_S', 0.1)
    monkeypatch.setattr(chat_turn, 'lookup_tenant_on', unanswered_lookup)
    monkeypatch.setattr(chat_turn, 'retry_on_disconnect', start_ending_later)
    try:
        async with asyncio.timeout(30):
            cancelled = asyncio.create_task(_turn(QUESTIONS[0], 'left-start', streamed))
            await looking_up.wait()
            cancelled.cancel()  # while its start has no claim yet
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            answered.set()
            await committed.wait()
            assert await scalar('SELECT count(*) FROM conversation_turns') == 1  # the left start's claim
            result = await _turn(QUESTIONS[1], 'left-start', streamed)  # not refused: taken over
            end.set()  # the left start ends: its undo releases its claim (taken over: it deletes nothing)
            for _ in range(500):
                if await scalar('SELECT count(*) FROM conversation_turns') == 0:
                    break
                await asyncio.sleep(0.02)
    finally:
        answered.set()
        end.set()
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0  # released: taken over, then the turn's save
    assert result.output.startswith('I found')
    assert result.conversation_usage.requests == result.usage.requests  # nothing of the cancelled turn was sent


@pytest.mark.parametrize('committed', [False, True], ids=['lost-before-commit', 'reply-lost-after-commit'])
async def test_a_turn_start_that_loses_its_connection_is_repeated_and_claims_once(
    demo_data: None, monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    await simple_chat(QUESTIONS[0], session_id='restarted', account='acme-health')
    entries = 'SELECT count(*) FROM conversation_entries'
    first = await scalar(entries)
    real, attempts = chat_turn.driver_transaction, []

    @asynccontextmanager
    async def losing(**kwargs: Any) -> AsyncIterator[Any]:
        attempts.append(1)
        async with real(**kwargs) as transaction:
            yield transaction
            if len(attempts) == 1 and not committed:  # killed with the claim taken and the tail read, uncommitted
                pid = (await transaction.fetch(DriverStatement.of(text('SELECT pg_backend_pid()')), {}))[0][0]
                async with get_db_session(account=Unscoped.OWNER) as owner:
                    await owner.execute(text('SELECT pg_terminate_backend(:pid)'), {'pid': pid})
        if len(attempts) == 1 and committed:  # the claim committed, its reply lost: the retry finds it its own
            raise DatabaseDisconnectedError('the connection to PostgreSQL was lost')

    monkeypatch.setattr(chat_turn, 'driver_transaction', losing)
    result = await simple_chat(QUESTIONS[1], session_id='restarted', account='acme-health')
    assert len(attempts) == 2 and result.output.startswith('I found')
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0  # released by the save
    assert await scalar(entries) == 2 * first  # this turn's messages once, after the first turn's


async def test_a_replaced_loader_that_takes_no_claim_still_leaves_the_turn_claimed(
    demo_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = chat_turn.load_recent_conversation
    claimed: list[int] = []

    async def loader_without_claim(*args: Any, claim: Any = None, **kwargs: Any) -> Any:
        return await real(*args, **kwargs)

    async def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        claimed.append(await scalar('SELECT count(*) FROM conversation_turns'))
        return ModelResponse(parts=[TextPart('ok')])

    monkeypatch.setattr(chat_turn, 'load_recent_conversation', loader_without_claim)
    await simple_chat('hello', session_id='own-loader', account='acme-health', model=FunctionModel(model))
    assert claimed == [1]  # taken before the model was called
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_turn_whose_conversation_was_deleted_meanwhile_says_so(demo_data: None, streamed: bool) -> None:
    # The conversation is deleted (the HTTP API's DELETE, an operator) while a turn runs on it: the save finds no
    # record to swap, and the error must not put that down to another turn alone.
    await _turn('Pediatricians in Denver', 'c-gone', streamed)
    store = PostgresConversationStore(await account_id('acme-health'))

    async def delete_then_answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        record = await store.read_record('c-gone')
        assert record is not None
        await store.delete_record('c-gone', expected_revision=record.revision)
        return ModelResponse(parts=[TextPart('too late')])

    async def delete_then_stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        await delete_then_answer(messages, info)
        yield 'too late'

    model = FunctionModel(delete_then_answer, stream_function=delete_then_stream)
    with pytest.raises(ConcurrentTurnError, match='or was deleted') as lost:
        await _turn('and in Boston?', 'c-gone', streamed, model=model)
    assert lost.value.stage == 'save'
    assert await store.read_record('c-gone') is None  # nothing brought back half-written
