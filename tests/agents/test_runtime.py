"""`agentrt_runtime()` blocks in a program of a user's own: nested and overlapping blocks on one event loop."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest

from agentrt.agents import runtime
from agentrt.agents.runtime import LEDGER_CLOSE_SECONDS
from agentrt.services.ledger import LLMRequestTracker
from tests.factories import fast_config, ledger_rows, scalar
from tests.private_database import PrivateDatabase
from tests.programs import run_program

ROOT = Path(__file__).resolve().parents[2]

NESTED = textwrap.dedent(
    """
    import asyncio
    from sqlalchemy import text
    from agentrt.agents.runtime import agentrt_runtime
    from agentrt.db.errors import DatabaseNotInitializedError
    from agentrt.db.session import Unscoped, get_db_session

    async def one() -> int:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            return (await session.execute(text('SELECT 1'))).scalar_one()

    async def helper() -> None:  # a library's helper, with a block of its own
        async with agentrt_runtime():
            print('inner', await one())

    async def overlapping(delay: float) -> None:
        async with agentrt_runtime():
            await asyncio.sleep(delay)
            print('overlapping', delay, await one())

    async def main() -> None:
        async with agentrt_runtime():
            await helper()
            print('after inner', await one())  # was DatabaseNotInitializedError: the inner end shut it down
            await asyncio.gather(overlapping(0.0), overlapping(0.3))
        try:
            await one()
        except DatabaseNotInitializedError:
            print('down after the last block')

    asyncio.run(main())
    """
)


async def test_a_nested_block_leaves_the_runtime_up_for_the_block_around_it(database_url: str) -> None:
    done = await run_program('-c', NESTED, database_url=database_url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split('\n')[:-1] == [
        'inner 1',
        'after inner 1',
        'overlapping 0.0 1',
        'overlapping 0.3 1',
        'down after the last block',
    ], done.stdout + done.stderr[-3000:]


FROZEN_STOP = textwrap.dedent(
    """
    import asyncio, os, signal, sys, time
    import psutil
    from agentrt.agents.runtime import shutdown_runtime
    from agentrt.db.engine import init_database
    from agentrt.services.ledger import get_request_tracker
    from tests.factories import ledger_record

    async def main() -> None:
        await init_database()
        tracker = get_request_tracker()
        tracker.submit(ledger_record(model='before-the-freeze'))
        await tracker.flush()  # the pool's connections are made
        postmaster = psutil.Process(int(sys.argv[1]))
        frozen = [postmaster, *postmaster.children()]
        for process in frozen:
            process.send_signal(signal.SIGSTOP)
        try:
            record = ledger_record(model='held-at-the-stop')
            tracker.submit(record)
            started = time.monotonic()
            await shutdown_runtime(1)
            print(record.id, round(time.monotonic() - started, 1))
        finally:
            for process in frozen:
                process.send_signal(signal.SIGCONT)

    asyncio.run(main())
    """
)


async def test_a_stop_on_a_database_that_does_not_answer_is_bounded_and_loses_no_row(
    private_database: PrivateDatabase, tmp_path: Path
) -> None:
    # A frozen database held `agentrt serve`'s stop 75-150 s in the ledger writer's retries, past a process manager's
    # kill timeout (QA). Now the flush gets `timeout` (at least LEDGER_CLOSE_SECONDS); the row it could not write
    # stays in the journal, and the next replay writes it.
    spool = tmp_path / 'spool.jsonl'
    url = private_database.server.url(sslmode='disable')
    postmaster = (private_database.server.data / 'postmaster.pid').read_text().split()[0]
    done = await run_program(
        '-c',
        FROZEN_STOP,
        postmaster,
        database_url=url,
        cwd=ROOT,
        AGENTRT_LEDGER_SPOOL=str(spool),
        DB_CONNECT_TIMEOUT='2',
    )
    assert done.returncode == 0, done.stderr[-3000:]
    request_id, seconds = done.stdout.split()
    assert float(seconds) < LEDGER_CLOSE_SECONDS + 4, done.stderr[-3000:]
    assert 'they stay in the journal' in done.stderr
    async with private_database.active():
        report = await LLMRequestTracker(fast_config(tmp_path, spool_path=spool)).replay_spool()
        assert report.inserted == 1, report
        assert [row['model'] for row in await ledger_rows(id=uuid.UUID(request_id))] == ['held-at-the-stop']


FORKED = textwrap.dedent(
    """
    import asyncio, multiprocessing, sys
    from agentrt.agents.runtime import agentrt_runtime
    from agentrt.agents.simple_chat import simple_chat

    def child() -> None:  # a process forked while the parent's runtime runs: a runtime of its own, on its own loop
        result = asyncio.run(simple_chat('Dermatologists in Boston', session_id='forked-child', account='acme-health'))
        print('child', bool(result.output), flush=True)

    async def main() -> None:
        async with agentrt_runtime():
            await simple_chat('Dermatologists in Boston', session_id='forked-parent', account='acme-health')
            process = multiprocessing.get_context('fork').Process(target=child)
            process.start()
            await asyncio.to_thread(process.join, 60)
            print('child exit', process.exitcode, flush=True)
            # Its connections untouched by the child: the parent's pool goes on.
            await simple_chat('And in Chicago?', session_id='forked-parent', account='acme-health')
            print('parent after', flush=True)

    asyncio.run(main())
    """
)


async def test_a_child_forked_while_the_runtime_runs_starts_its_own_and_leaves_the_parents_alone(
    database_url: str, demo_data: None
) -> None:
    # The child took the copy of the parent's running loop for a loop of another thread: every turn and even
    # `shutdown_runtime()` refused as "in use on another event loop" (QA). Now the fork forgets the parent's runtime.
    done = await run_program('-c', FORKED, database_url=database_url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split('\n')[:-1] == ['child True', 'child exit 0', 'parent after'], done.stderr[-3000:]
    child_rows = await ledger_rows(chat_session_id='forked-child')
    assert child_rows and all(row['success'] for row in child_rows)  # billed, by the child's own ledger writer
    assert len({row['run_id'] for row in await ledger_rows(chat_session_id='forked-parent')}) == 2
    saved = await scalar(
        'SELECT count(*) FROM conversations WHERE conversation_id = :id AND head_id IS NOT NULL',
        id=child_rows[0]['conversation_id'],
    )
    assert saved == 1


async def test_the_last_block_to_end_shuts_down_and_lets_go_of_the_embedded_server_if_any_block_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `create_app()`'s lifespan asks to let go of the embedded server (uvicorn's process ends by a signal, no exit
    # hook); run inside a program's `agentrt_runtime()` block, the block's end is the runtime's, and does it.
    stops: list[tuple[float, bool]] = []

    async def stopped(timeout: float = 10.0, *, release_embedded_server: bool = False) -> None:  # noqa: ASYNC109
        stops.append((timeout, release_embedded_server))

    monkeypatch.setattr(runtime, 'shutdown_runtime', stopped)
    async with runtime.runtime_block(shutdown_timeout=3.0):
        async with runtime.runtime_block(release_embedded_server=True):
            pass
        assert stops == []  # the inner end left the runtime up
    assert stops == [(3.0, True)]
    async with runtime.runtime_block(release_embedded_server=True):
        async with runtime.runtime_block(shutdown_timeout=2.0):
            pass
    async with runtime.runtime_block():  # a block of its own afterwards: nobody asked
        pass
    assert stops == [(3.0, True), (10.0, True), (10.0, False)]


TURNS_STARTING = textwrap.dedent(
    """
    import asyncio, sys
    from agentrt.agents.runtime import shutdown_runtime
    from agentrt.agents.simple_chat import simple_chat

    async def main() -> None:
        if sys.argv[1] == 'warm':  # the runtime up: the turns below reach their claims quickly
            await simple_chat('Dermatologists in Boston', session_id='starting-warm', account='acme-health')
        sessions = [f'starting-{sys.argv[1]}-{sys.argv[2]}-{i}' for i in range(3)]
        turns = [
            asyncio.create_task(simple_chat('Cardiologists in Seattle', session_id=session, account='acme-health'))
            for session in sessions
        ]
        if sys.argv[2] == 'stepped':
            await asyncio.sleep(0)  # each turn's first step taken, none holding its conversation yet
        await shutdown_runtime()
        print('done', [turn.done() and not turn.cancelled() and turn.exception() is None for turn in turns], flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize(('start', 'stepped'), [('warm', 'stepped'), ('cold', 'stepped'), ('warm', 'created')])
async def test_shutdown_lets_the_turns_still_starting_finish(
    database_url: str, demo_data: None, start: str, stepped: str
) -> None:
    # README: `shutdown_runtime()` "lets the turns still running finish". It waited only for turns holding their
    # conversation: turns still starting were cut by the loop's end, their conversations left claimed (QA).
    done = await run_program('-c', TURNS_STARTING, start, stepped, database_url=database_url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split('\n')[:-1] == ['done [True, True, True]'], done.stdout + done.stderr[-3000:]
    assert 'stays claimed' not in done.stderr, done.stderr[-3000:]
    for i in range(3):
        rows = await ledger_rows(chat_session_id=f'starting-{start}-{stepped}-{i}')
        assert rows and all(row['success'] for row in rows)
        claimed = 'SELECT count(*) FROM conversation_turns WHERE conversation_id = :id'
        assert await scalar(claimed, id=rows[0]['conversation_id']) == 0


TURN_HANGING = textwrap.dedent(
    """
    import asyncio
    from agentrt.agents.runtime import shutdown_runtime
    from agentrt.agents.simple_chat import create_simple_chat_agent, simple_chat
    from pydantic_ai import RunContext
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel

    def calls_the_tool(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart('wait_for_ever', {})])
        return ModelResponse(parts=[TextPart('done')])

    agent = create_simple_chat_agent(FunctionModel(calls_the_tool))

    @agent.tool
    async def wait_for_ever(ctx: RunContext) -> str:
        await asyncio.sleep(3600)
        return 'never'

    async def main() -> None:
        turn = asyncio.create_task(simple_chat('hang', session_id='hanging-tool', account='acme-health', agent=agent))
        await asyncio.sleep(1)  # the tool called, its turn holding its conversation
        await shutdown_runtime(timeout=1)
        print('stopped', turn.done(), flush=True)

    asyncio.run(main())
    """
)


async def test_a_turn_whose_tool_never_returns_bounds_the_shutdown_and_is_said_as_such(
    database_url: str, demo_data: None
) -> None:
    # The shutdown's line for a turn still running blamed only the database ("a database that does not answer?"),
    # which had answered all along: a tool that never returns is the likelier cause now that shutdown waits for every
    # turn in progress (QA).
    done = await run_program('-c', TURN_HANGING, database_url=database_url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'stopped False' in done.stdout, done.stdout + done.stderr[-3000:]
    assert (
        '1 turn(s) still running or releasing their conversations at shutdown (a tool or a model that does not '
        'return, or a database that does not answer)' in done.stderr
    ), done.stderr[-3000:]
