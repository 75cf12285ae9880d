"""The tracker's write path: idempotent group commits, retries through killed connections, the spool and its replay."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from agentrt.db import engine, transaction_setup
from agentrt.db.engine import get_engine, pool_status
from agentrt.db.session import Unscoped, get_db_session, get_side_session
from agentrt.db.settings import Settings
from agentrt.services.ledger import (
    LedgerRecord,
    LedgerSpool,
    LLMRequestTracker,
    RetryPolicy,
    is_transient_db_error,
    utc_now,
)
from tests.factories import content_rows, fast_config, ledger_record, ledger_rows, scalar
from tests.ports import free_port
from tests.programs import run_program
from tests.stalling_proxy import StallingDatabase


def _record(**overrides: object) -> LedgerRecord:
    now = utc_now()
    return ledger_record(started_at=now, finished_at=now, **overrides)


class _Outage:
    """The writer's sessions during an outage: a server that refuses connections (a closed port) while `down`, this
    test's database once it is set False. `tries` counts the sessions asked for."""

    def __init__(self) -> None:
        self.engine = create_async_engine(
            f'postgresql+asyncpg://nobody:pw@127.0.0.1:{free_port()}/nowhere', connect_args={'timeout': 2}
        )
        self._dead = async_sessionmaker(self.engine)
        self.down = True
        self.tries = 0

    @asynccontextmanager
    async def sessions(self) -> AsyncIterator[AsyncSession]:
        self.tries += 1
        if self.down:
            async with self._dead() as session, session.begin():
                yield session
        else:
            async with get_side_session(account=Unscoped.ADMIN) as session:
                yield session


async def test_the_same_key_twice_writes_one_row(tmp_path: Path):
    tracker = LLMRequestTracker(fast_config(tmp_path))
    record = _record()
    copy = _record(id=record.id)
    assert await asyncio.gather(tracker.track_request(record), tracker.track_request(copy)) == ['written'] * 2
    assert await scalar('SELECT count(*) FROM llm_requests WHERE id = :id', id=record.id) == 1
    await tracker.flush()
    assert len(await content_rows(record.id)) == 2


async def test_a_commit_whose_reply_is_lost_is_retried_without_billing_twice(tmp_path: Path):
    calls = 0

    @asynccontextmanager
    async def reply_lost_once() -> AsyncIterator[AsyncSession]:
        nonlocal calls
        calls += 1
        async with get_side_session(account=Unscoped.ADMIN) as session:
            yield session
        if calls == 1:  # committed, but the caller never hears so
            raise ConnectionResetError('connection reset by peer')

    tracker = LLMRequestTracker(fast_config(tmp_path, store_content=False), session_factory=reply_lost_once)
    record = _record()
    assert await tracker.track_request(record) == 'written'
    assert calls == 2 and tracker.stats.retries == 1
    assert await scalar('SELECT count(*) FROM llm_requests') == 1


async def test_a_backend_killed_mid_write_gives_exactly_one_row_after_the_retry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger='agentrt.db')
    tracker = LLMRequestTracker(fast_config(tmp_path, lock_timeout_ms=20_000, store_content=False))
    record = _record()
    async with get_engine().connect() as locker:
        # Hold a lock the INSERT must wait for, so the tracker's backend is caught in the middle of its write.
        await locker.execute(text('LOCK TABLE llm_requests IN SHARE ROW EXCLUSIVE MODE'))
        ack = tracker.submit(record)
        pid = None
        for _ in range(500):
            await locker.execute(text('SELECT pg_stat_clear_snapshot()'))  # activity is cached per transaction
            pid = (
                await locker.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database() AND query LIKE '%INSERT INTO llm_requests%' "
                        'AND pid <> pg_backend_pid()'
                    )
                )
            ).scalar()
            if pid is not None:
                break
            await asyncio.sleep(0.01)
        assert pid is not None, 'the tracker never started its INSERT'
        assert (await locker.execute(text('SELECT pg_terminate_backend(:pid)'), {'pid': pid})).scalar() is True
        await locker.rollback()
    assert await asyncio.wait_for(ack, 30) == 'written'
    # Repeated by the tracker (the writer's Core connection has no repeat of its own): the statement is idempotent.
    assert tracker.stats.retries >= 1
    assert await scalar('SELECT count(*) FROM llm_requests WHERE id = :id', id=record.id) == 1
    assert pool_status().checked_out == 0


async def test_unreachable_database_spools_rows_then_replays_them_exactly_once(tmp_path: Path):
    outage = _Outage()
    tracker = LLMRequestTracker(fast_config(tmp_path), session_factory=outage.sessions)
    try:
        spooled = [
            _record(raw_contents=[('prompt', f'{{"n": {i}, "key": "sk-spooledSECRET123456789"}}')]) for i in range(5)
        ]
        assert await asyncio.gather(*(tracker.track_request(r) for r in spooled)) == ['spooled'] * 5
        assert tracker.stats.spooled == 5 and tracker.stats.retries > 0
        spool_text = tracker.spool.path.read_text()
        assert len(spool_text.splitlines()) == 5 and 'SECRET' not in spool_text  # redacted before it hits the disk
        assert await scalar('SELECT count(*) FROM llm_requests') == 0

        outage.down = False  # the database is back: the next successful write replays the spool
        assert await tracker.track_request(_record()) == 'written'
        await tracker.flush()
        assert await scalar('SELECT count(*) FROM llm_requests') == 6
        assert await scalar('SELECT count(*) FROM llm_request_contents') == 5 + 2
        assert not tracker.spool.has_pending() and tracker.stats.replayed_rows == 5

        # A replay that crashed before deleting its file runs again: still one row per key.
        tracker.spool.path.write_text(spool_text)
        report = await tracker.replay_spool()
        assert (report.rows, report.inserted, report.duplicates) == (5, 0, 5)
        assert report.contents == 0  # none new: it said 5 content rows written (QA)
        assert await scalar('SELECT count(*) FROM llm_requests') == 6
        assert await scalar('SELECT count(DISTINCT id) FROM llm_requests') == 6
    finally:
        await outage.engine.dispose()


async def test_spooled_rows_reach_the_database_once_it_is_back_without_another_write(tmp_path: Path):
    # An idle process (a server between requests) does not keep its spooled rows out of the database, and out of its
    # budgets' settlements, until its next write: it tries the spool again on a timer that backs off.
    outage = _Outage()
    config = fast_config(tmp_path, replay_retry_seconds=0.1, replay_check_interval=0.4)
    tracker = LLMRequestTracker(config, session_factory=outage.sessions)
    try:
        spooled = [_record() for _ in range(3)]
        assert await asyncio.gather(*(tracker.track_request(r) for r in spooled)) == ['spooled'] * 3
        queues = tracker._queues(asyncio.get_running_loop())
        tried = outage.tries
        await asyncio.sleep(1.5)  # still down: tried again, each wait twice the last, at most 0.4 s
        assert outage.tries > tried and queues.comeback_after == 0.4
        assert await scalar('SELECT count(*) FROM llm_requests') == 0 and tracker.spool.has_pending()

        outage.down = False  # back; nothing else is written
        for _ in range(100):
            if not tracker.spool.has_pending() and queues.replay_task is None:
                break
            await asyncio.sleep(0.05)
        assert await scalar('SELECT count(*) FROM llm_requests') == 3
        assert tracker.stats.replayed_rows == 3 and queues.comeback is None and queues.comeback_after == 0
    finally:
        await tracker.aclose()
        await outage.engine.dispose()


async def test_a_replay_its_loop_ended_is_tried_again_at_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `asyncio.run` cancels what is left as it ends: a replay cancelled so waited for the periodic check (30 s), and a
    # script of short loops cancelled each try, its spooled rows out of the ledger until another process came (QA).
    outage = _Outage()
    config = fast_config(tmp_path, replay_check_interval=3600, replay_retry_seconds=3600)  # no timer tries it
    tracker = LLMRequestTracker(config, session_factory=outage.sessions)
    fallback = tracker._fallback
    replay, started = fallback.replay, asyncio.Event()

    async def held_up(*args: Any, **kwargs: Any) -> Any:
        started.set()
        await asyncio.sleep(3600)  # cut off by the loop's end, as a turn's short `asyncio.run` does

    try:
        assert await tracker.track_request(_record()) == 'spooled'
        outage.down = False
        monkeypatch.setattr(fallback, 'replay', held_up)
        assert await tracker.track_request(_record()) == 'written'  # the write that starts a replay
        queues = tracker._queues(asyncio.get_running_loop())
        await asyncio.wait_for(started.wait(), 10)
        task = queues.replay_task
        assert task is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        monkeypatch.setattr(fallback, 'replay', replay)
        assert await tracker.track_request(_record()) == 'written'  # tried again now, not in an hour
        for _ in range(100):
            if not tracker.spool.has_pending() and queues.replay_task is None:
                break
            await asyncio.sleep(0.05)
        assert await scalar('SELECT count(*) FROM llm_requests') == 3 and not tracker.spool.has_pending()
    finally:
        await tracker.aclose()
        await outage.engine.dispose()


async def test_closing_the_tracker_stops_its_tries_of_the_spool(tmp_path: Path):
    outage = _Outage()
    tracker = LLMRequestTracker(fast_config(tmp_path, replay_retry_seconds=0.1), session_factory=outage.sessions)
    try:
        assert await tracker.track_request(_record()) == 'spooled'
        queues = tracker._queues(asyncio.get_running_loop())
        assert queues.comeback is not None
        await tracker.aclose()
        assert queues.comeback is None  # a later start replays the spool (`replay_pending_in_background`)
        await asyncio.sleep(0.3)
        assert queues.replay_task is None and tracker.spool.has_pending()
    finally:
        await outage.engine.dispose()


async def test_a_commit_on_the_writers_own_connection_whose_reply_is_lost_is_written_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The default writer (`driver_transaction`, the driver's SQL): a lost reply is retried, and the row, its contents
    and its budget settlement are there once."""
    tracker = LLMRequestTracker(fast_config(tmp_path))
    opened = tracker._session_factory
    calls = 0

    @asynccontextmanager
    async def reply_lost_once() -> AsyncIterator[object]:
        nonlocal calls
        calls += 1
        async with opened() as connection:
            yield connection
        if calls == 1:  # committed, but the caller never hears so
            raise ConnectionResetError('connection reset by peer')

    monkeypatch.setattr(tracker, '_session_factory', reply_lost_once)
    record = _record(raw_contents=[('prompt', '{"q": 1}'), ('response', '{"a": 2}')])
    assert await tracker.track_request(record) == 'written'
    assert calls == 2 and tracker.stats.retries == 1
    assert await scalar('SELECT count(*) FROM llm_requests WHERE id = :id', id=record.id) == 1
    assert len(await content_rows(record.id)) == 2


async def test_the_writers_own_connection_spools_when_the_database_cannot_be_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    outage = _Outage()
    tracker = LLMRequestTracker(fast_config(tmp_path))
    try:
        with monkeypatch.context() as patched:
            patched.setattr('agentrt.db.driver.get_engine', lambda: outage.engine)
            record = _record(raw_contents=[('prompt', '{"key": "sk-spooledSECRET123456789"}')])
            assert await tracker.track_request(record) == 'spooled'
        assert tracker.stats.retries > 0 and 'SECRET' not in tracker.spool.path.read_text()
        assert await tracker.track_request(_record()) == 'written'  # the database is back: the spool is replayed
        await tracker.flush()
        assert await scalar('SELECT count(*) FROM llm_requests WHERE id = :id', id=record.id) == 1
        assert len(await content_rows(record.id)) == 1 and not tracker.spool.has_pending()
    finally:
        await outage.engine.dispose()


async def test_a_torn_spool_line_is_set_aside_and_the_rest_replayed(tmp_path: Path):
    tracker = LLMRequestTracker(fast_config(tmp_path))
    good = _record()
    tracker.spool.append([{'v': 1, 'row': _row_json(good), 'contents': []}])
    torn = tracker.spool.path.read_text() + '{"v": 1, "row": {"id": "trunc'
    tracker.spool.path.write_text(torn)
    report = await tracker.replay_spool()
    assert (report.inserted, report.rejected) == (1, 1)
    assert tracker.spool.rejected_path.read_text().startswith('{"v": 1, "row": {"id": "trunc')
    assert not tracker.spool.has_pending()


def _row_json(record: LedgerRecord) -> dict[str, object]:
    row: dict[str, object] = record.spool_entry(None)['row']
    return row


async def test_writer_cancelled_at_shutdown_spools_what_it_held(tmp_path: Path):
    tracker = LLMRequestTracker(fast_config(tmp_path))
    records = [_record() for _ in range(3)]
    acks = [tracker.submit(r) for r in records]
    writer = tracker._queues(asyncio.get_running_loop()).ledger_task
    assert writer is not None
    writer.cancel()  # what asyncio.run() does to leftover tasks when the program ends
    assert await asyncio.gather(*acks) == ['spooled'] * 3
    assert len(tracker.spool.path.read_text().splitlines()) == 3
    assert (await tracker.replay_spool()).inserted == 3
    assert await scalar('SELECT count(*) FROM llm_requests') == 3


async def test_rows_pending_when_the_program_ends_are_spooled_then_replayed(tmp_path: Path):
    @asynccontextmanager
    async def stuck() -> AsyncIterator[AsyncSession]:
        await asyncio.sleep(3600)  # the database never answers before the program ends
        yield  # type: ignore[misc]

    stalled = LLMRequestTracker(fast_config(tmp_path), session_factory=stuck)
    records = [_record() for _ in range(4)]

    async def program() -> None:
        for record in records:
            stalled.submit(record)  # queued, not awaited: then the program returns

    await asyncio.to_thread(asyncio.run, program())  # asyncio.run cancels the writer on its way out
    assert len(stalled.spool.path.read_text().splitlines()) == 4 and stalled.stats.spooled == 4
    report = await LLMRequestTracker(fast_config(tmp_path)).replay_spool()
    assert report.inserted == 4
    assert await scalar('SELECT count(*) FROM llm_requests') == 4
    assert await scalar('SELECT count(*) FROM llm_request_contents') == 8


async def test_a_row_submitted_as_the_program_ends_is_spooled_by_the_loops_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A turn's task cut by `asyncio.run`'s end records its request as it unwinds (a cut request is recorded so): the
    # writer that row starts is not among the tasks the loop's end cancels, and was in its write when the loop closed,
    # the row in no spool or journal (QA's plain turn: 2 runs in 4, with "aclose(): asynchronous generator is already
    # running" for the writer's transaction).
    class Slow:  # a class, not an async generator, which asyncio.run's end would report as still running
        async def __aenter__(self) -> AsyncSession:
            await asyncio.sleep(3600)  # a write takes more than the loop's last steps
            raise AssertionError('unreachable')

        async def __aexit__(self, *exc_info: object) -> None:
            return None

    tracker = LLMRequestTracker(fast_config(tmp_path), session_factory=Slow)
    record = _record()

    async def turn(started: asyncio.Event) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            tracker.commit_now([tracker.submit(record)])  # as the ledger does for a cancelled run
            raise

    async def program() -> asyncio.Task[None]:
        started = asyncio.Event()
        task = asyncio.create_task(turn(started))
        await started.wait()
        return task  # and the loop ends, the turn still running

    with caplog.at_level(logging.WARNING, logger='agentrt.ledger'):
        await asyncio.to_thread(asyncio.run, program())
    assert [_row_json(record)['id']] == [
        json.loads(line)['row']['id'] for line in tracker.spool.path.read_text().splitlines()
    ]
    assert 'its event loop ended' in caplog.text
    assert (await LLMRequestTracker(fast_config(tmp_path)).replay_spool()).inserted == 1
    assert [row['id'] for row in await ledger_rows()] == [record.id]


async def test_a_batch_being_spooled_as_the_program_ends_is_spooled_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer appends a batch the database did not take to the spool in a worker thread, which the loop's end does
    # not stop: the writer cancelled there left the batch to the loop's end as well, each row spooled twice (QA: turns
    # cut by `shutdown_runtime()`'s timeout, "6 row(s), 3 new, 3 already there" at the replay, 4 runs in 6).
    outage = _Outage()
    tracker = LLMRequestTracker(fast_config(tmp_path), session_factory=outage.sessions)
    appending = threading.Event()
    append = LedgerSpool.append

    def slow_append(spool: LedgerSpool, entries: list[dict[str, Any]]) -> None:
        if not appending.is_set():  # the writer's: a slow disk's fsync, the loop ending meanwhile
            appending.set()
            time.sleep(0.5)
        append(spool, entries)

    monkeypatch.setattr(LedgerSpool, 'append', slow_append)
    records = [_record() for _ in range(3)]

    async def program() -> None:
        for record in records:
            tracker.submit(record)
        await asyncio.to_thread(appending.wait, 10)  # and the loop ends, the writer in its spooling

    try:
        await asyncio.to_thread(asyncio.run, program())
    finally:
        await outage.engine.dispose()
    spooled = [json.loads(line)['row']['id'] for line in tracker.spool.path.read_text().splitlines()]
    assert sorted(spooled) == sorted(str(record.id) for record in records)
    report = await LLMRequestTracker(fast_config(tmp_path)).replay_spool()
    assert (report.inserted, report.duplicates) == (3, 0)


CUT_BY_THE_SHUTDOWN = textwrap.dedent(
    """
    import asyncio
    import sys

    from pydantic_ai.messages import ModelResponse, TextPart
    from pydantic_ai.models.function import FunctionModel

    from agentrt.agents.runtime import shutdown_runtime
    from agentrt.agents.simple_chat import simple_chat, simple_chat_stream

    async def answers(messages, info):
        await asyncio.sleep(3600)
        return ModelResponse(parts=[TextPart('never')])

    async def streams(messages, info):
        await asyncio.sleep(3600)
        yield 'never'

    model = FunctionModel(answers, stream_function=streams)

    async def turn(i: int) -> None:
        session_id = f'cut-{sys.argv[1]}-{i}'
        if sys.argv[1] == 'plain':
            await simple_chat('hello', session_id=session_id, account='acme-health', model=model)
            return
        async with simple_chat_stream('hello', session_id=session_id, account='acme-health', model=model) as stream:
            async for _ in stream:
                pass

    async def main() -> None:
        turns = [asyncio.create_task(turn(i)) for i in range(3)]
        await shutdown_runtime(timeout=1)  # the turns outlive it: cut by the loop's end, their requests recorded
        print('running', sum(not t.done() for t in turns), flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize('mode', ['plain', 'stream'])
async def test_turns_cut_after_shutdown_runtime_are_spooled_once_and_said_so(
    mode: str, database_url: str, demo_data: None, tmp_path: Path
) -> None:
    # The rows of turns still running when `shutdown_runtime()`'s timeout ran out were spooled by the writer and
    # again by the loop's end (a replay's "6 row(s), 3 new, 3 already there"), which said "(no shutdown_runtime())"
    # although it had been awaited (QA).
    spool = tmp_path / 'spool' / 'llm-ledger.jsonl'
    done = await run_program(
        '-c', CUT_BY_THE_SHUTDOWN, mode, database_url=database_url, AGENTRT_LEDGER_SPOOL=str(spool)
    )
    assert done.returncode == 0 and 'running 3' in done.stdout, done.stdout + done.stderr[-3000:]
    lines = [line for path in spool.parent.glob('*.jsonl') for line in path.read_text().splitlines()]
    ids = [json.loads(line)['row']['id'] for line in lines]
    assert len(ids) == 3 and len(set(ids)) == 3, done.stderr[-3000:]
    assert 'no shutdown_runtime()' not in done.stderr, done.stderr[-3000:]
    said = (
        'of turns still running after shutdown_runtime() (its timeout ran out)',
        'the runtime had shut down (a turn',
    )
    assert any(words in done.stderr for words in said), done.stderr[-3000:]  # the loop's end, or the writer first
    report = await LLMRequestTracker(fast_config(tmp_path, spool_path=spool)).replay_spool()
    assert (report.inserted, report.duplicates) == (3, 0)


async def test_a_failed_content_write_leaves_the_ledger_row(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    tracker = LLMRequestTracker(fast_config(tmp_path))
    async with get_db_session(account=Unscoped.OWNER) as session:  # DDL: the owner
        await session.execute(
            text('ALTER TABLE llm_request_contents ADD CONSTRAINT ck_test_refuse CHECK (false) NOT VALID')
        )
    try:
        record = _record()
        assert await tracker.track_request(record) == 'written'
        await tracker.flush()
    finally:
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text('ALTER TABLE llm_request_contents DROP CONSTRAINT ck_test_refuse'))
    assert len(await ledger_rows(id=record.id)) == 1
    assert await content_rows(record.id) == []
    assert tracker.stats.content_failures == 1 and tracker.stats.spooled == 0
    assert 'content of request' in caplog.text


async def test_no_content_row_can_exist_without_its_ledger_row(tmp_path: Path):
    with pytest.raises(sqlalchemy.exc.IntegrityError, match='foreign key'):
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await session.execute(
                text(
                    'INSERT INTO llm_request_contents (request_id, kind, body, size_bytes, truncated, redactions) '
                    "VALUES (:id, 'prompt', '{}', 2, false, 0)"
                ),
                {'id': uuid.uuid4()},
            )
    tracker = LLMRequestTracker(fast_config(tmp_path))
    await asyncio.gather(*(tracker.track_request(_record()) for _ in range(20)))
    await tracker.flush()
    orphans = (
        'SELECT count(*) FROM llm_request_contents c LEFT JOIN llm_requests r ON r.id = c.request_id WHERE r.id IS NULL'
    )
    assert await scalar(orphans) == 0 and await scalar('SELECT count(*) FROM llm_request_contents') == 40


async def test_content_over_the_cap_is_cut_and_flagged(tmp_path: Path):
    tracker = LLMRequestTracker(fast_config(tmp_path, content_max_bytes=1024))
    record = _record(raw_contents=[('prompt', 'é' * 3000)])
    await tracker.track_request(record)
    await tracker.flush()
    [content] = await content_rows(record.id)
    assert content['truncated'] is True and content['size_bytes'] == 6000
    assert len(content['body'].encode()) <= 1024 and set(content['body']) == {'é'}


async def test_200_concurrent_writers_share_commits(tmp_path: Path):
    tracker = LLMRequestTracker(fast_config(tmp_path, store_content=False))

    async def writer() -> None:
        for _ in range(10):
            await tracker.track_request(_record(raw_contents=[]))

    await asyncio.gather(*(writer() for _ in range(200)))
    assert await scalar('SELECT count(*) FROM llm_requests') == 2000
    # The collapse this guards against is a commit per row: the rows of concurrent writers share commits (10 of 200
    # rows here). A floor on rows/s (1,000; about 2,500 measured under load) failed on a busy enough machine: the
    # rate is scripts/bench_ledger_throughput.py's figure, not a test's.
    assert tracker.stats.batches <= 200, tracker.stats.as_dict()


@pytest.mark.parametrize(
    ('error', 'transient'),
    [
        (ConnectionRefusedError(111, 'refused'), True),
        (ConnectionResetError(104, 'reset'), True),
        (OSError('network unreachable'), True),
        (TimeoutError(), True),
        (sqlalchemy.exc.TimeoutError('QueuePool limit reached'), True),
        (sqlalchemy.exc.OperationalError('SELECT 1', {}, Exception('server closed')), True),
        (sqlalchemy.exc.InterfaceError('SELECT 1', {}, Exception('connection is closed')), True),
        (sqlalchemy.exc.DBAPIError('SELECT 1', {}, Exception('x'), connection_invalidated=True), True),
        (asyncpg.exceptions.ConnectionDoesNotExistError('closed in the middle of operation'), True),
        (asyncpg.exceptions.CannotConnectNowError('the database system is starting up'), True),
        (sqlalchemy.exc.IntegrityError('INSERT', {}, Exception('duplicate key')), False),
        (sqlalchemy.exc.ProgrammingError('INSERT', {}, Exception('relation does not exist')), False),
        (ValueError('bad value'), False),
    ],
)
def test_transient_error_classifier(error: BaseException, transient: bool):
    assert is_transient_db_error(error) is transient


def test_transient_error_found_in_the_cause_chain():
    try:
        try:
            raise asyncpg.exceptions.AdminShutdownError('terminating connection due to administrator command')
        except Exception as inner:
            raise RuntimeError('wrapped') from inner
    except RuntimeError as outer:
        assert is_transient_db_error(outer)


async def test_a_spool_path_naming_someone_elses_file_is_never_claimed(tmp_path: Path) -> None:
    # AGENTRT_LEDGER_SPOOL=~/.bashrc: the replay after a write renamed it, moved its lines to `.rejected` (as text)
    # and deleted it. A spool whose first append was torn (the next one continues that line) is still claimed.
    foreign = LedgerSpool(tmp_path / 'bashrc')
    foreign.path.write_bytes(b'export PATH=/opt/bin:$PATH\n\xff\xfe binary\n')
    assert not foreign.holds_spooled_rows() and foreign.pending_files() == [] and foreign.claim() == []
    assert sorted(os.listdir(tmp_path)) == ['bashrc']
    torn = LedgerSpool(tmp_path / 'spool.jsonl')
    torn.path.write_text('{"v": 1, "row": {"id"' + json.dumps({'v': 1, 'row': {}, 'contents': []}) + '\n')
    torn.append([{'v': 1, 'row': {}, 'contents': []}])
    assert torn.holds_spooled_rows() and torn.pending_files() == [torn.path]
    assert len(torn.claim()) == 1 and not torn.path.exists()


@pytest.mark.parametrize(
    'damage',
    [
        pytest.param({'id': 123}, id='a number for the id'),
        pytest.param({'contents': ['not an object']}, id='a content that is not an object'),
        pytest.param({'contents': 'text'}, id='contents that are not a list'),
        pytest.param({'row': {'model': 'gpt-4o'}}, id='a row without its id'),
    ],
)
async def test_a_spooled_line_that_can_never_be_written_is_set_aside_and_the_rest_replayed(
    tmp_path: Path, damage: dict[str, object]
) -> None:
    # A damaged line (edited by hand, written by another version) went through as an AttributeError: the replay
    # failed, kept the file, and failed again on every later write, holding back the good rows beside it.
    tracker = LLMRequestTracker(fast_config(tmp_path))
    good = _record()
    bad_entry: dict[str, object] = {'v': 1, 'row': _row_json(_record()), 'contents': []}
    if 'id' in damage:
        bad_entry['row'] = {**_row_json(_record()), 'id': damage['id']}
    else:
        bad_entry.update(damage)
    tracker.spool.append([bad_entry, {'v': 1, 'row': _row_json(good), 'contents': []}])
    report = await tracker.replay_spool()
    assert (report.rows, report.inserted, report.rejected) == (1, 1, 1)
    assert await scalar('SELECT id::text FROM llm_requests') == str(good.id)
    assert json.loads(tracker.spool.rejected_path.read_text()) == json.loads(json.dumps(bad_entry))
    assert not tracker.spool.has_pending()


async def test_a_row_neither_the_database_nor_the_spool_takes_is_reported_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The database down and the spool refused (a directory others may write): the row is held in memory; when the
    # process ends with neither taking it, it is lost, and the log names the row (nothing else keeps it).
    outage = _Outage()
    shared = tmp_path / 'shared'
    shared.mkdir()
    shared.chmod(0o777)
    tracker = LLMRequestTracker(
        fast_config(tmp_path, spool_path=shared / 'llm-ledger.jsonl'), session_factory=outage.sessions
    )
    record = _record()
    try:
        with caplog.at_level(logging.ERROR, logger='agentrt.ledger'):
            assert await tracker.track_request(record) == 'held'
            assert tracker.stats.held == 1 and tracker.stats.lost == 0
            await tracker.aclose()
    finally:
        await outage.engine.dispose()
    assert tracker.stats.lost == 1 and tracker.stats.spooled == 0
    assert os.listdir(shared) == []
    assert await scalar('SELECT count(*) FROM llm_requests') == 0
    lost = [r.getMessage() for r in caplog.records if 'neither the database nor the spool took this' in r.getMessage()]
    assert len(lost) == 1 and str(record.id) in lost[0] and 'writable by others' in lost[0]


async def test_a_replay_while_another_one_runs_does_nothing_and_leaves_the_spool_to_it(tmp_path: Path) -> None:
    # Two processes replaying at once (`agentrt ledger replay` beside a server's writer): the second one steps aside.
    tracker = LLMRequestTracker(fast_config(tmp_path))
    spooled = _record()
    tracker.spool.append([{'v': 1, 'row': _row_json(spooled), 'contents': []}])
    other = LedgerSpool(tracker.spool.path)  # another process's: a lock of its own open file
    with other.replay_lock() as acquired:
        assert acquired
        report = await tracker.replay_spool()
        assert report.skipped and report.rows == 0
        assert tracker.spool.pending_files() == [tracker.spool.path]
        assert await scalar('SELECT count(*) FROM llm_requests') == 0
    report = await tracker.replay_spool()
    assert not report.skipped and report.inserted == 1
    assert await scalar('SELECT id::text FROM llm_requests') == str(spooled.id)


async def test_a_write_that_outlives_the_shutdown_on_a_frozen_database_is_spooled_for_the_next_start(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A server stopped while PostgreSQL was frozen: a cut-off turn's row, written after shutdown_runtime(), was spooled
    # with DatabaseNotInitializedError's advice to a developer ("start it with init_database()") in the operator's
    # log, and a background replay was started and retried 4 times over 30 s, each failing the same way (QA). Now one
    # line says the runtime had shut down, and nothing tries the spool before the next start.
    monkeypatch.setattr(transaction_setup, 'CLIENT_WAIT_MARGIN_SECONDS', 0.4)  # a statement given up after 1.4 s
    saved, shut_down = engine._runtime, engine._shut_down
    engine._runtime = None
    retry = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, attempt_timeout=1)  # each try cut after 1 s
    tracker = LLMRequestTracker(fast_config(tmp_path, replay_retry_seconds=0.1, retry=retry))
    try:
        async with StallingDatabase(database_url).running() as proxy:
            try:
                await engine.init_database(Settings(database_url=proxy.url, statement_timeout_ms=1000), migrate=False)
                assert await tracker.track_request(_record()) == 'written'  # a pooled connection through the proxy
                proxy.stall()
                writing = asyncio.create_task(tracker.track_request(_record()))
                await asyncio.sleep(0.3)  # blocked on the frozen database
                with caplog.at_level(logging.INFO):
                    await engine.close_database()
                    assert await writing == 'spooled'
                    await asyncio.sleep(0.5)  # a retry of the spool would have been due by now
                queues = tracker._queues(asyncio.get_running_loop())
                assert queues.comeback is None and queues.replay_task is None
                assert tracker.spool.has_pending()  # for the next start
            finally:
                await engine.close_database()
                proxy.resume()
    finally:
        engine._runtime, engine._shut_down = saved, shut_down
    assert 'init_database' not in caplog.text and 'will retry' not in caplog.text, caplog.text
    assert 'the runtime had shut down' in caplog.text, caplog.text
