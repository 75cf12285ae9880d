"""A response's stored content is taken once pydantic-ai has stamped it (`run_id`, `conversation_id`, `model_id`), on
every way a run can go: each request's prompt and response stored once, nothing lost, rows never held back longer than
the commit delay (`ResponseBody`, `_schedule.seal_due`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai import Agent, ModelResponse, RequestUsage, RunContext, TextPart, ToolCallPart
from pydantic_ai.exceptions import ModelHTTPError, UsageLimitExceeded
from pydantic_ai.messages import ModelMessage, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.usage import UsageLimits

from agentrt.services.ledger import LLMRequestTracker, ledger_capability
from agentrt.services.ledger._contents import RunBodies
from tests.factories import chat_deps, content_rows, fast_config, ledger_record, ledger_rows


def _answered(messages: list[ModelMessage]) -> bool:
    return any(isinstance(part, ToolReturnPart) for message in messages for part in message.parts)


def _lookup_then(answer: Any) -> FunctionModel:
    """A model that calls `lookup` first, then does `answer(messages)` (returns a response or raises)."""

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if not _answered(messages):
            return ModelResponse(
                parts=[ToolCallPart('lookup', {'n': 1}, tool_call_id='a')],
                usage=RequestUsage(input_tokens=500, output_tokens=40),
            )
        return answer(messages)  # type: ignore[no-any-return]

    return FunctionModel(model, model_name='gpt-4o-mini')


def _agent(model: FunctionModel, tracker: LLMRequestTracker, tool: Any = None) -> Agent[Any, str]:
    agent = Agent(model, capabilities=[ledger_capability(tracker)])

    @agent.tool
    async def lookup(ctx: RunContext[Any], n: int) -> int:
        return n if tool is None else await tool(ctx)  # type: ignore[no-any-return]

    return agent


async def _stored(tracker: LLMRequestTracker, statuses: list[str]) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """Each request's row and its contents by kind, once everything is written: the rows have `statuses`, every
    content was written once (the writer's counters agree with the table), and each prompt resends the responses
    before it as they were stored."""
    await tracker.flush()
    rows = await ledger_rows()
    assert [row['status'] for row in rows] == statuses
    stored = [(row, {c['kind']: c['body'] for c in await content_rows(row['id'])}) for row in rows]
    assert tracker.stats.written == len(rows)
    assert tracker.stats.contents_written == sum(len(contents) for _, contents in stored)
    for i, (_, contents) in enumerate(stored):
        assert 'prompt' in contents
        for _, earlier in stored[:i]:
            if 'response' in earlier:
                assert earlier['response'] in contents['prompt']
    return stored


def _assert_stamped(row: dict[str, Any], body: str) -> None:
    response = json.loads(body)
    assert response['kind'] == 'response'
    assert response['run_id'] == row['run_id'] is not None
    assert response['conversation_id'] == row['conversation_id'] is not None
    assert response['model_id'] == 'function:gpt-4o-mini'


async def test_a_provider_error_mid_turn_stores_each_request_once_with_the_stamped_response(
    tracker: LLMRequestTracker,
) -> None:
    def overloaded(messages: list[ModelMessage]) -> ModelResponse:
        raise ModelHTTPError(status_code=503, model_name='gpt-4o-mini', body={'error': 'overloaded'})

    with pytest.raises(ModelHTTPError):
        await _agent(_lookup_then(overloaded), tracker).run('go', deps=chat_deps())
    (first, contents), (_, failed) = await _stored(tracker, ['complete', 'error'])
    assert set(contents) == {'prompt', 'response'} and set(failed) == {'prompt', 'error'}
    _assert_stamped(first, contents['response'])


async def test_a_usage_limit_stores_each_request_once_with_the_stamped_response(tracker: LLMRequestTracker) -> None:
    def answer(messages: list[ModelMessage]) -> ModelResponse:
        return ModelResponse(parts=[TextPart('done')], usage=RequestUsage(input_tokens=700, output_tokens=10))

    with pytest.raises(UsageLimitExceeded):
        await _agent(_lookup_then(answer), tracker).run(
            'go', deps=chat_deps(), usage_limits=UsageLimits(total_tokens_limit=1_000)
        )
    stored = await _stored(tracker, ['complete', 'complete'])
    for row, contents in stored:
        assert set(contents) == {'prompt', 'response'}
        _assert_stamped(row, contents['response'])


async def test_a_stream_cancelled_mid_answer_stores_each_request_once(tracker: LLMRequestTracker) -> None:
    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        if not _answered(messages):
            yield {0: DeltaToolCall(name='lookup', json_args='{"n": 1}', tool_call_id='a')}
            return
        for word in ['a ', 'b ', 'c ', 'd ', 'e ']:
            await asyncio.sleep(0.01)
            yield word

    agent = _agent(FunctionModel(stream_function=stream, model_name='gpt-4o-mini'), tracker)
    streaming = asyncio.Event()

    async def consume() -> None:
        async with agent.run_stream('go', deps=chat_deps()) as result:
            async for _ in result.stream_text(delta=True, debounce_by=None):
                streaming.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(streaming.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (first, contents), (cut, partial) = await _stored(tracker, ['complete', 'cancelled'])
    assert first['streamed'] and set(contents) == {'prompt', 'response'}
    assert set(partial) == {'prompt', 'response', 'error'} and cut['error_type'] == 'CancelledError'
    _assert_stamped(first, contents['response'])
    assert json.loads(partial['response'])['parts'][0]['content'].startswith('a')  # what came before the cut


async def test_a_row_is_not_held_back_by_a_slow_tool_and_its_response_is_stamped(tracker: LLMRequestTracker) -> None:
    """The writer seals a record its run has not sealed yet once its commit delay passed: the first request's row
    is committed while the tool it asked for still runs, with its response as pydantic-ai stamped it."""
    seen: list[list[tuple[dict[str, Any], dict[str, str]]]] = []

    async def slow_tool(ctx: RunContext[Any]) -> int:
        for _ in range(500):  # at most 5 s
            rows = await ledger_rows()
            if rows:
                seen.append([(row, {c['kind']: c['body'] for c in await content_rows(row['id'])}) for row in rows])
                return 1
            await asyncio.sleep(0.01)
        return 0

    def answer(messages: list[ModelMessage]) -> ModelResponse:
        return ModelResponse(parts=[TextPart('done')], usage=RequestUsage(input_tokens=700, output_tokens=10))

    await _agent(_lookup_then(answer), tracker, slow_tool).run('go', deps=chat_deps())
    [[(row, contents)]] = seen  # the first row, committed during the tool call
    _assert_stamped(row, contents['response'])
    stored = await _stored(tracker, ['complete', 'complete'])
    assert stored[0][1] == contents
    _assert_stamped(stored[1][0], stored[1][1]['response'])


@pytest.mark.parametrize('how', ['flush', 'commit delay'])
async def test_a_record_its_run_never_sealed_is_written_all_the_same(tracker: LLMRequestTracker, how: str) -> None:
    """A hand-driven record (no run to seal its response): the writer seals it when it is due, as it is then."""
    response = ModelResponse(parts=[TextPart('hi')], model_name='gpt-4o-mini')
    record = ledger_record(raw_contents=[('response', RunBodies().response(response))])
    assert not record.sealed()
    future = tracker.submit(record)
    response.run_id = 'run-1'
    if how == 'flush':
        await tracker.flush()
    assert await asyncio.wait_for(asyncio.shield(future), 10) == 'written'
    [stored] = await content_rows(record.id)
    assert json.loads(stored['body'])['run_id'] == 'run-1'


async def test_a_due_batch_takes_the_waiting_records_whose_responses_are_stamped(tmp_path: Path) -> None:
    """A batch written before a run sealed its last response takes that record along once pydantic-ai stamped it
    (one transaction, as if it had been ready), and leaves one it has not stamped yet to its own commit delay."""
    # A commit delay no stall of a loaded machine reaches before the due record comes (with the default 50 ms, a
    # fresh-clone CI under load wrote the stamped record in a batch of its own first: two batches, not one).
    tracker = LLMRequestTracker(fast_config(tmp_path, commit_delay_ms=2000))
    try:
        stamped, unstamped = (ModelResponse(parts=[TextPart(text)], model_name='gpt-4o-mini') for text in ('a', 'b'))
        bodies = RunBodies()
        waiting = [ledger_record(raw_contents=[('response', bodies.response(r))]) for r in (stamped, unstamped)]
        futures = [tracker.submit(record) for record in waiting]
        stamped.run_id = 'run-1'
        assert await tracker.track_request(ledger_record()) == 'written'  # due at once: one batch
        assert futures[0].done() and not futures[1].done() and tracker.stats.batches == 1
        unstamped.run_id = 'run-2'
        assert await asyncio.wait_for(asyncio.shield(futures[1]), 10) == 'written'  # its commit delay passed
        assert tracker.stats.batches == 2
        for record, run_id in zip(waiting, ('run-1', 'run-2'), strict=True):
            [stored] = await content_rows(record.id)
            assert json.loads(stored['body'])['run_id'] == run_id
    finally:
        await tracker.flush()


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_without_a_commit_delay_each_row_is_written_alone_with_its_stamped_response(
    tmp_path: Path, streamed: bool
) -> None:
    """Delay 0: each row is written as soon as the writer gets to it, never held for its response's stamps. A plain
    request's response is stamped by then (pydantic-ai does not yield between the ledger's hook and the stamps); a
    streamed one's may not be (pydantic-ai closes the stream first): it is stored as it was, as before."""
    tracker = LLMRequestTracker(fast_config(tmp_path, commit_delay_ms=0))

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        if not _answered(messages):
            yield {0: DeltaToolCall(name='lookup', json_args='{"n": 1}', tool_call_id='a')}
        else:
            yield 'done'

    def answer(messages: list[ModelMessage]) -> ModelResponse:
        return ModelResponse(parts=[TextPart('done')], usage=RequestUsage(input_tokens=700, output_tokens=10))

    async def events(ctx: RunContext[Any], stream: AsyncIterator[Any]) -> None:
        async for _ in stream:
            pass

    if streamed:
        agent = _agent(FunctionModel(stream_function=stream, model_name='gpt-4o-mini'), tracker)
        await agent.run('go', deps=chat_deps(), event_stream_handler=events)
    else:
        await _agent(_lookup_then(answer), tracker).run('go', deps=chat_deps())
    stored = await _stored(tracker, ['complete', 'complete'])
    assert tracker.stats.batches == 2
    for row, contents in stored:
        assert set(contents) == {'prompt', 'response'}
        if not streamed:
            _assert_stamped(row, contents['response'])
