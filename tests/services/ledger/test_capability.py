"""The ledger capability on offline models: every request recorded, whatever happens to the run."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic_ai import Agent, ModelResponse, RequestUsage, RunContext, TextPart, ToolCallPart
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import ModelMessage, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from sqlalchemy import text

from agentrt.db.engine import pool_status
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import LLMRequestTracker, ledger_capability
from agentrt.tools.dependencies import SessionDependencies
from tests.factories import chat_deps, content_rows, fast_config, ledger_record, ledger_rows, scalar
from tests.programs import run_program


def _tools_then_text(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """First request: two parallel tool calls; second: the answer."""
    if not any(isinstance(p, ToolReturnPart) for m in messages for p in m.parts):
        return ModelResponse(
            parts=[ToolCallPart('count_entries', {'n': 1}, tool_call_id='a'), ToolCallPart('count_entries', {'n': 2})],
            usage=RequestUsage(input_tokens=500, output_tokens=40, cache_read_tokens=100),
            provider_name='openai',
        )
    return ModelResponse(
        parts=[TextPart('done')], usage=RequestUsage(input_tokens=700, output_tokens=10), provider_name='openai'
    )


def _db_agent(tracker: LLMRequestTracker) -> Agent[SessionDependencies, str]:
    agent = Agent(
        FunctionModel(_tools_then_text, model_name='gpt-4o-mini'),
        deps_type=SessionDependencies,
        instructions='You are the directory assistant.',
        capabilities=[ledger_capability(tracker)],
    )

    @agent.tool
    async def count_entries(ctx: RunContext[SessionDependencies], n: int) -> int:
        # A tool opens its own session: the ledger never shares it.
        async with get_db_session(account=Unscoped.ADMIN) as session:
            return (await session.execute(text('SELECT count(*) + :n FROM accounts'), {'n': n})).scalar_one()

    return agent


async def test_plain_run_records_each_request_with_identity_tokens_cost_and_content(tracker: LLMRequestTracker):
    agent = _db_agent(tracker)
    result = await agent.run('how many?', deps=chat_deps())

    rows = await ledger_rows()
    responses = [m for m in result.all_messages() if isinstance(m, ModelResponse)]
    assert len(rows) == len(responses) == 2
    first = rows[0]
    assert (first['status'], first['success'], first['streamed']) == ('complete', True, False)
    assert first['run_id'] == result.run_id and [r['run_step'] for r in rows] == [1, 2]
    assert (first['chat_session_id'], first['account_id'], first['account_slug']) == ('chat-1', 7, 'acct-7')
    assert (first['agent_instance_id'], first['agent_instance_slug'], first['agent_type']) == (
        70,
        'agent-70',
        'simple_chat',
    )
    assert (first['model'], first['provider']) == ('gpt-4o-mini', 'openai')
    assert (first['input_tokens'], first['output_tokens'], first['cache_read_tokens']) == (500, 40, 100)
    assert first['total_tokens'] == 540
    for row, response in zip(rows, responses, strict=True):
        assert row['total_cost'] == response.usage.cost and row['total_cost'] > 0
        priced = response.cost()
        assert (row['input_cost'], row['output_cost']) == (priced.input_price, priced.output_price)
        assert row['price_source'].startswith('genai-prices') and 'openai/gpt-4o-mini' in row['price_source']
    assert sum(r['total_cost'] for r in rows) == result.usage.cost
    assert first['latency_ms'] >= 0 and first['time_to_first_token_ms'] is None
    contents = await content_rows(first['id'])  # the run waited for them: no flush needed
    assert [c['kind'] for c in contents] == ['prompt', 'response']
    assert 'You are the directory assistant.' in contents[0]['body'] and 'how many?' in contents[0]['body']
    assert 'count_entries' in contents[1]['body']
    assert pool_status().checked_out == 0


async def test_unpriced_model_stores_tokens_and_null_cost(tracker: LLMRequestTracker):
    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart('hi')], usage=RequestUsage(input_tokens=12, output_tokens=3))

    agent = Agent(FunctionModel(answer, model_name='my-local-llama'), capabilities=[ledger_capability(tracker)])
    await agent.run('hello')
    [row] = await ledger_rows()
    assert (row['input_tokens'], row['output_tokens']) == (12, 3)
    assert (row['input_cost'], row['output_cost'], row['total_cost']) == (None, None, None)
    assert row['price_source'] == 'unpriced'
    assert row['chat_session_id'] is None and row['account_id'] is None  # deps=None is handled


# Usage genai-prices refuses to price: a priced model's request was filed as unpriced, $0 against any budget (QA).
REFUSED_USAGE = {
    'cached-past-the-input': (
        'gpt-4o-mini',
        RequestUsage(input_tokens=100, output_tokens=20, cache_read_tokens=100_000),
    ),
    'cache-writes-past-the-input': (
        'claude-sonnet-4-5',
        RequestUsage(input_tokens=100, output_tokens=20, cache_write_tokens=90, cache_read_tokens=20),
    ),
    # Counts that agree with each other, which genai-prices refuses all the same: a model with a price and no cost.
    'one-hour-writes-past-the-writes': (
        'claude-sonnet-4-5',
        RequestUsage(input_tokens=200, output_tokens=20, cache_write_tokens=10, cache_write_1h_tokens=100),
    ),
}


@pytest.mark.parametrize('case', list(REFUSED_USAGE))
async def test_a_priced_models_usage_that_cannot_be_priced_is_unmeasured_not_unpriced(
    tracker: LLMRequestTracker, case: str
):
    model_name, usage = REFUSED_USAGE[case]
    provider = 'anthropic' if model_name.startswith('claude') else 'openai'

    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart('hi')], usage=usage, provider_name=provider)

    agent = Agent(FunctionModel(answer, model_name=model_name), capabilities=[ledger_capability(tracker)])
    result = await agent.run('hello')
    [row] = await ledger_rows()
    assert row['status'] == 'complete'
    assert (row['usage_reported'], row['price_source'], row['total_cost']) == (False, 'unmeasured', None)
    assert (row['input_tokens'], row['output_tokens'], row['cache_read_tokens']) == (0, 0, 0)
    assert result.usage.unmeasured_requests == 1 and result.usage.input_tokens == 0


def test_a_cut_streams_usage_that_cannot_be_priced_is_unmeasured_when_the_writer_prices_it() -> None:
    # A stream cut after its usage chunk is priced by the writer (pydantic-ai prices complete answers only): usage
    # genai-prices refuses for a model with a price was left `unpriced`, and the budget charged it nothing.
    usage = RequestUsage(input_tokens=200, output_tokens=20, cache_write_tokens=10, cache_write_1h_tokens=100)
    response = ModelResponse(
        parts=[TextPart('hi')],
        usage=usage,
        model_name='claude-sonnet-4-5',
        provider_name='anthropic',
        state='incomplete',
    )
    record = ledger_record(status='cancelled', success=False, price_source='unpriced', pricing=response)
    record.resolve_costs()
    assert (record.usage_reported, record.price_source, record.total_cost) == (False, 'unmeasured', None)
    assert (record.input_tokens, record.output_tokens) == (0, 0)
    unpriced = replace(response, model_name='my-local-llama', provider_name=None)
    record = ledger_record(status='cancelled', success=False, price_source='unpriced', pricing=unpriced)
    record.resolve_costs()
    assert (record.usage_reported, record.price_source, record.input_tokens) == (True, 'unpriced', 10), 'no price'


async def test_failed_model_request_is_recorded_with_success_false(tracker: LLMRequestTracker):
    def overloaded(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise ModelHTTPError(status_code=503, model_name='gpt-4o-mini', body={'error': 'overloaded'})

    agent = Agent(FunctionModel(overloaded, model_name='gpt-4o-mini'), capabilities=[ledger_capability(tracker)])
    with pytest.raises(ModelHTTPError):
        await agent.run('hi', deps=chat_deps())
    [row] = await ledger_rows()
    assert (row['status'], row['success'], row['error_type']) == ('error', False, 'ModelHTTPError')
    assert '503' in row['error_message'] and row['usage_reported'] is False
    await tracker.flush()
    error = {c['kind']: c for c in await content_rows(row['id'])}['error']
    assert 'overloaded' in error['body'] and '503' in error['body']


async def test_rollback_of_the_callers_transaction_keeps_the_ledger_row(tracker: LLMRequestTracker):
    agent = _db_agent(tracker)
    with pytest.raises(RuntimeError, match='caller gives up'):
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await session.execute(text("INSERT INTO accounts (slug, name) VALUES ('tmp', 'Temp')"))
            await agent.run('how many?', deps=chat_deps())
            raise RuntimeError('caller gives up')
    assert await scalar("SELECT count(*) FROM accounts WHERE slug = 'tmp'") == 0
    assert len(await ledger_rows()) == 2


async def test_stream_stopped_early_records_a_cancelled_row_with_usage_so_far(tracker: LLMRequestTracker):
    async def words(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        for word in ['one ', 'two ', 'three ', 'four ', 'five ', 'six']:
            await asyncio.sleep(0.005)
            yield word

    agent = Agent(
        FunctionModel(stream_function=words, model_name='gpt-4o-mini'), capabilities=[ledger_capability(tracker)]
    )
    async with agent.run_stream('count', deps=chat_deps()) as stream:
        async for delta in stream.stream_text(delta=True, debounce_by=None):
            if delta.startswith('two'):
                break
    await tracker.flush()
    [row] = await ledger_rows()
    assert (row['status'], row['success'], row['streamed'], row['run_step']) == ('cancelled', False, True, 1)
    assert 0 < row['output_tokens'] < 6 and row['input_tokens'] > 0  # FunctionModel estimates as it streams
    assert row['total_cost'] is not None and row['time_to_first_token_ms'] is not None
    assert row['time_to_first_token_ms'] <= row['latency_ms']


async def test_consumer_raising_mid_stream_and_cancelled_runs_are_recorded(tracker: LLMRequestTracker):
    async def slow(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        for word in ['a ', 'b ', 'c ', 'd ', 'e ']:
            await asyncio.sleep(0.01)
            yield word

    agent = Agent(
        FunctionModel(stream_function=slow, model_name='gpt-4o-mini'), capabilities=[ledger_capability(tracker)]
    )
    with pytest.raises(KeyError):
        async with agent.run_stream('go') as stream:
            async for delta in stream.stream_text(delta=True, debounce_by=None):
                if delta.startswith('b'):
                    raise KeyError('consumer failed')

    streaming = asyncio.Event()

    async def consume() -> None:
        async with agent.run_stream('go') as stream:
            async for _ in stream.stream_text(delta=True, debounce_by=None):
                streaming.set()

    task = asyncio.create_task(consume())
    # Cancelled mid-stream: once a token has arrived (the row's usage), while the rest is still coming (40 ms more).
    await asyncio.wait_for(streaming.wait(), 30)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await tracker.flush()
    rows = await ledger_rows()
    assert [(r['status'], r['success']) for r in rows] == [('cancelled', False), ('cancelled', False)]
    assert all(r['output_tokens'] > 0 and r['error_type'] == 'CancelledError' for r in rows)


async def test_redaction_keeps_planted_secrets_out_of_stored_content(tracker: LLMRequestTracker):
    secrets = [
        'sk-proj-PLANTEDplantedPLANTED1234567890',
        'ghp_PLANTEDplantedPLANTEDplanted12345678',
        'Bearer PLANTEDbearer0123456789',
        's3cr3t-PLANTED-pw',
    ]

    def echo(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart(f'echo: {secrets[0]} and password={secrets[3]}')])

    agent = Agent(
        FunctionModel(echo, model_name='gpt-4o-mini'),
        instructions=f'Use the key {secrets[1]}.',
        capabilities=[ledger_capability(tracker)],
    )
    prompt = f'key {secrets[0]}, header Authorization: {secrets[2]}, db postgresql://app:{secrets[3]}@db/prod'
    await agent.run(prompt)
    await tracker.flush()
    contents = await content_rows()
    assert {c['kind'] for c in contents} == {'prompt', 'response'}
    stored = ' '.join(c['body'] for c in contents)
    for planted in ('PLANTED', 's3cr3t'):
        assert planted not in stored
    assert all(c['redactions'] > 0 for c in contents)
    assert 'postgresql://app:[REDACTED]@db/prod' in stored


async def test_100_concurrent_chats_with_parallel_db_tools(tracker: LLMRequestTracker):
    agent = _db_agent(tracker)
    results = await asyncio.gather(*(agent.run('how many?', deps=chat_deps(f'chat-{i}')) for i in range(100)))
    await tracker.flush()
    requests = sum(r.usage.requests for r in results)
    assert requests == 200
    assert await scalar('SELECT count(*) FROM llm_requests') == requests
    assert await scalar('SELECT count(DISTINCT id) FROM llm_requests') == requests
    assert await scalar('SELECT count(DISTINCT chat_session_id) FROM llm_requests') == 100
    assert await scalar("SELECT count(*) FROM llm_requests WHERE status <> 'complete'") == 0
    assert await scalar('SELECT count(*) FROM llm_request_contents') == 2 * requests
    assert tracker.stats.spooled == tracker.stats.lost == tracker.stats.content_failures == 0
    assert tracker.stats.batches < requests  # group commit: fewer transactions than rows
    assert pool_status().checked_out == 0


async def test_per_run_capability_and_a_run_without_the_capability(tracker: LLMRequestTracker):
    agent = Agent(FunctionModel(_tools_then_text, model_name='gpt-4o-mini'))

    @agent.tool_plain
    def count_entries(n: int) -> int:
        return n

    await agent.run('untracked')
    assert await ledger_rows() == []
    await agent.run('tracked', capabilities=[ledger_capability(tracker)])
    rows = await ledger_rows()
    assert len(rows) == 2 and all(r['total_cost'] == Decimal(r['total_cost']) for r in rows)


@pytest.mark.parametrize('path', ['run_stream', 'run_stream_events'])
@pytest.mark.parametrize('failure', ['raises', 'empty'])
async def test_a_stream_the_model_fails_to_open_is_an_error_not_a_cancellation(
    tracker: LLMRequestTracker, path: str, failure: str
) -> None:
    # Before the first chunk: a custom model's own exception, or pydantic-ai's for a stream with no content. Neither
    # is a `ModelAPIError`, and the request's task is cancelled when the consumer stops, as when a caller gives up.
    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        if failure == 'raises':
            raise RuntimeError('the model broke')
        return
        yield ''

    agent = Agent(
        FunctionModel(stream_function=stream, model_name='gpt-4o-mini'), capabilities=[ledger_capability(tracker)]
    )
    with pytest.raises(Exception) as raised:
        if path == 'run_stream':
            async with agent.run_stream('go') as result:
                await result.get_output()
        else:
            async with agent.run_stream_events('go') as events:
                async for _ in events:
                    pass
    await tracker.flush()
    [row] = await ledger_rows()
    assert (row['status'], row['success'], row['streamed']) == ('error', False, True)
    assert row['error_type'] == type(raised.value).__qualname__ != 'CancelledError'


STREAMING_AS_THE_LOOP_ENDS = textwrap.dedent(
    """
    import asyncio, sys
    from pydantic_ai.models.function import FunctionModel
    from agentrt.agents.simple_chat import simple_chat_stream

    SENT = []

    async def words(messages, info):
        SENT.append(1)
        for _ in range(500):
            yield 'word '
            await asyncio.sleep(0.01)

    async def turn(streaming):
        model = FunctionModel(stream_function=words, model_name='cut-as-the-loop-ends')
        async with simple_chat_stream('hello', session_id=sys.argv[1], account='acme-health', model=model) as deltas:
            async for _ in deltas:
                streaming.set()

    async def main():
        streaming = asyncio.Event()
        task = asyncio.create_task(turn(streaming))  # a turn per task, as a service runs them
        await streaming.wait()
        return task  # and the loop ends: asyncio.run cancels the turn's tasks, its request still streaming

    asyncio.run(main())
    print(len(SENT))
    """
)


async def test_a_stream_still_running_as_asyncio_run_ends_is_recorded_as_cancelled(
    database_url: str, demo_data: None, tmp_path: Path
) -> None:
    # No `shutdown_runtime()`, the turn in a task of its own: `asyncio.run` cancels every task at once, and the run's
    # `wrap_run` ended (nothing to record yet) before the request's task saw its cancellation and noted the cut for it.
    # The request was sent and had no row anywhere, neither in the ledger, the spool nor the journal (QA: 5 of 5).
    spool = tmp_path / 'spool.jsonl'
    done = await run_program(
        '-c', STREAMING_AS_THE_LOOP_ENDS, 'cut-at-loop-end', database_url=database_url, AGENTRT_LEDGER_SPOOL=str(spool)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sent = int(done.stdout)
    await LLMRequestTracker(fast_config(tmp_path, spool_path=spool)).replay_spool()  # what the loop's end left
    rows = await ledger_rows(chat_session_id='cut-at-loop-end')
    assert sent == len(rows) == 1, done.stderr[-3000:]
    assert (rows[0]['status'], rows[0]['streamed'], rows[0]['model']) == ('cancelled', True, 'cut-as-the-loop-ends')
