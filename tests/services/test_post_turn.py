"""Post-turn work after real chat turns: titled, summarised conversations and a rollup equal to the ledger."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from logfire.testing import CaptureLogfire
from sqlalchemy import func, select, text

from agentrt.agents.simple_chat import simple_chat
from agentrt.db.engine import current_settings, pool_status
from agentrt.db.models.ledger import LLMRequestRow
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import TaskSupervisor, drain_supervisor, get_supervisor
from agentrt.services.post_turn import schedule_post_turn_work
from tests.agents.conftest import account_id
from tests.services.ledger.usage_oracle import ledger_totals, rollup_totals

ACCOUNT = 'acme-health'
QUESTIONS = (
    'Find me cardiologists in Seattle who accept Medicare',
    'Which pediatricians in Portland take new patients?',
    'List dermatologists in Boston',
)


@pytest_asyncio.fixture(autouse=True)
async def _drain() -> AsyncIterator[None]:
    yield
    await drain_supervisor(30)


async def _turn(conversation_id: str, question: str) -> None:
    """One chat turn; `simple_chat` schedules its post-turn work itself."""
    await simple_chat(question, session_id=conversation_id, account=ACCOUNT)


@pytest.mark.parametrize('every_turns', [1, 5])
async def test_concurrent_chats_leave_titled_summarised_conversations_and_exact_rollups(
    demo_data: None, every_turns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Titles after the first turn, summaries when due (every turn, or not yet at the second of five), stored by the
    saves, and one roll-up per interval whose last run, pending when the supervisor drains, leaves the rollup equal
    to the ledger."""
    settings = current_settings()
    monkeypatch.setattr(settings, 'summary_every_turns', every_turns)
    monkeypatch.setattr(settings, 'usage_rollup_seconds', 600.0)
    await drain_supervisor()  # the report below counts this test's background work only, whatever ran before it
    conversations = [f'chat-{i}' for i in range(12)]
    await asyncio.gather(*(_turn(c, QUESTIONS[i % 3]) for i, c in enumerate(conversations)))
    await asyncio.gather(*(_turn(c, 'And in Seattle?') for c in conversations[:4]))
    report = await drain_supervisor(timeout=60)
    assert report is not None and (report.failed, report.cancelled, report.rejected) == (0, 0, 0)
    # The titles and summaries were stored by the turns' saves (the turns had the text), so the background ran only
    # the roll-ups: one at once, the one pending at the end when draining.
    assert report.completed == 2

    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = (
            await session.execute(
                text('SELECT conversation_id, title, summary FROM conversations ORDER BY conversation_id')
            )
        ).all()
        assert len(rows) == 12
        for i, conversation_id in enumerate(conversations):
            row = next(r for r in rows if r.conversation_id == conversation_id)
            assert row.title == QUESTIONS[i % 3].rstrip('?')
            assert row.summary.startswith(f'Topic: {row.title}')
            assert ('And in Seattle?' in row.summary) == (i < 4 and every_turns == 1)

        ledger_rows = (await session.execute(select(func.count()).select_from(LLMRequestRow))).scalar_one()
        for by in ('account', 'agent', 'model', 'day'):
            assert await rollup_totals(by, session=session) == await ledger_totals(by, session=session)
        rolled_up = sum(t.requests for t in await rollup_totals('day', session=session))
    assert rolled_up == ledger_rows >= 16 * 3  # the demo model makes three requests per turn
    assert pool_status().checked_out == 0


async def test_a_full_backlog_skips_post_turn_work_without_failing_the_turn(demo_data: None) -> None:
    await drain_supervisor()
    supervisor = get_supervisor()
    assert isinstance(supervisor, TaskSupervisor)
    supervisor.max_queued = 0
    gate = asyncio.Event()
    for _ in range(supervisor.max_running):
        supervisor.spawn(gate.wait)  # every slot busy, no room to queue
    await asyncio.sleep(0)
    assert supervisor.stats().running == supervisor.max_running

    await _turn('chat-skipped', QUESTIONS[0])
    assert supervisor.stats().rejected == 1  # the roll-up (the title and summary rode on the save)
    gate.set()
    await supervisor.join()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        title = await session.execute(text("SELECT title FROM conversations WHERE conversation_id = 'chat-skipped'"))
        assert title.scalar() == QUESTIONS[0]
        assert not await rollup_totals('account', session=session)
    # The next turn's roll-up does the skipped work too.
    supervisor.max_queued = 100
    await _turn('chat-skipped', 'And in Portland?')
    await supervisor.join()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rolled_up = await rollup_totals('account', session=session)
        assert rolled_up and rolled_up == await ledger_totals('account', session=session)


async def test_post_turn_spans_are_named_by_their_kind_with_the_ids_as_attributes(
    demo_data: None, capfire: CaptureLogfire, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A span's name is what a trace backend groups by: `background task conversation summary chat-7 (run 0193...)`
    made one name per turn (a new series of metrics each, in most backends). The ids are attributes; the log lines
    still name them."""
    monkeypatch.setattr(current_settings(), 'usage_rollup_seconds', 0.0)
    await drain_supervisor()
    with caplog.at_level(logging.INFO, logger='agentrt.background'):
        tasks = schedule_post_turn_work(
            await account_id(ACCOUNT), 'chat-7', run_id='run-1', summarise=True, summary=None, rollup_interval_s=0
        )
        await asyncio.gather(*tasks)
    spans = {
        span['name']: span['attributes']
        for span in capfire.exporter.exported_spans_as_dict()
        if span['name'].startswith('background task')
    }
    assert set(spans) == {'background task conversation summary', 'background task usage rollup'}, set(spans)
    summary, rollup = spans['background task conversation summary'], spans['background task usage rollup']
    assert (summary['gen_ai.conversation.id'], summary['agentrt.run_id']) == ('chat-7', 'run-1')
    assert (rollup['agentrt.account_id'], rollup['agentrt.run_id']) == (await account_id(ACCOUNT), 'run-1')
    completed = [r.getMessage() for r in caplog.records if 'completed in' in r.getMessage()]
    assert any(m.startswith('background task conversation summary (conversation chat-7, run run-1)') for m in completed)


async def test_a_post_turn_roll_up_stops_after_its_batch_when_the_supervisor_shuts_down(
    demo_data: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A one-shot `agentrt chat` on a backlog of millions (after an upgrade) waited its supervisor's 10 s at exit for
    the post-turn roll-up, then cancelled it with two WARNING lines (QA). It now stops after the batch under way,
    the rest left queued for the next roll-up."""
    from agentrt.services.ledger import _rollups

    monkeypatch.setattr(_rollups, 'ROLL_UP_BATCH', 2)
    await drain_supervisor()
    await _turn('backlog', QUESTIONS[0])  # its three requests queued, and its roll-up
    await drain_supervisor()
    async with get_db_session(account=Unscoped.ADMIN) as session:  # a backlog: the ledger's rows queued again
        await session.execute(text('DELETE FROM usage_rolled_up_requests'))
        await session.execute(text('DELETE FROM usage_daily_rollups'))
        await session.execute(
            text(
                'INSERT INTO usage_pending_requests SELECT id, account_id, recorded_at FROM llm_requests '
                'ON CONFLICT DO NOTHING'
            )
        )
        queued = (await session.execute(text('SELECT count(*) FROM usage_pending_requests'))).scalar_one()
    assert queued >= 3
    acme = await account_id(ACCOUNT)
    [rollup] = schedule_post_turn_work(acme, 'backlog', summarise=False, rollup_interval_s=0)
    with caplog.at_level(logging.WARNING):
        report = await drain_supervisor(timeout=30)
    assert report is not None and (report.completed, report.cancelled) == (1, 0) and rollup.done()
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    async with get_db_session(account=Unscoped.ADMIN) as session:
        left = (await session.execute(text('SELECT count(*) FROM usage_pending_requests'))).scalar_one()
    assert left == queued - 2  # one batch of two taken, then it stopped
