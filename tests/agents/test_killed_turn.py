"""A turn whose process was killed (SIGKILL, the OOM killer) while it held its conversation: the next turn on the same
host takes the conversation over at once instead of being refused until the dead turn's lease expires (60 s by
default), and starts from what was saved before, the killed turn having saved nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai.messages import ModelRequest, UserPromptPart
from sqlalchemy import text

from agentrt.agents.demo_model import demo_model
from agentrt.agents.simple_chat import ChatResult, simple_chat, simple_chat_stream
from agentrt.db.engine import current_settings
from agentrt.db.processes import process_start, this_host
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.conversations import PostgresConversationStore
from agentrt.services.ledger import LLMRequestTracker
from tests.agents.conftest import account_id
from tests.factories import fast_config, ledger_rows, scalar

ROOT = Path(__file__).resolve().parents[2]
QUESTION = 'Find me cardiologists in Seattle who accept Medicare'


async def _turn(session_id: str, streamed: bool) -> ChatResult:
    if not streamed:
        return await simple_chat(QUESTION, session_id=session_id, account='acme-health', model=demo_model())
    async with simple_chat_stream(QUESTION, session_id=session_id, account='acme-health', model=demo_model()) as stream:
        async for _ in stream:
            pass
    assert stream.result is not None
    return stream.result


async def _claim_holder(session_id: str) -> tuple[Any, ...] | None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        row = await session.execute(
            text('SELECT holder_host, holder_pid, holder_started FROM conversation_turns WHERE conversation_id = :c'),
            {'c': session_id},
        )
        found = row.first()
        return None if found is None else tuple(found)


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_the_next_turn_takes_over_at_once_the_conversation_of_a_turn_killed_while_it_held_it(
    demo_data: None, database_url: str, tmp_path: Path, streamed: bool
) -> None:
    assert current_settings().turn_lease_seconds >= 30  # the refusal would last that long without the takeover
    session_id = f'killed-{uuid.uuid4().hex[:8]}'
    await _turn(session_id, streamed=False)  # a saved turn to continue from
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        '-m',
        'tests.agents.turn_and_die',
        database_url,
        session_id,
        str(tmp_path / 'child'),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert json.loads(await asyncio.wait_for(process.stdout.readline(), 60)) == {'at_model': True}
        started = process_start(process.pid)
        # The claim names its holder: this host, the process's pid and its start.
        assert await _claim_holder(session_id) == (this_host(), process.pid, started)
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()

    result = await _turn(session_id, streamed)  # refused for the lease's 60 s before (ConcurrentTurnError)

    assert result.output
    conversation = await PostgresConversationStore(await account_id('acme-health')).load(session_id)
    assert conversation is not None
    prompts = [
        part.content
        for message in conversation.messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, UserPromptPart)
    ]
    assert prompts == [QUESTION, QUESTION]  # the first turn and this one: the killed turn saved nothing
    assert await scalar('SELECT count(*) FROM conversation_turns WHERE conversation_id = :c', c=session_id) == 0


async def _journal_holding_a_row(spool: Path) -> Path:
    """The journal beside `spool` once it holds a line (its writer wrote the held row), waiting up to 30 s."""
    for _ in range(600):
        for journal in spool.parent.glob(spool.name + '.journal-*'):
            if journal.stat().st_size:
                return journal
        await asyncio.sleep(0.05)
    raise AssertionError(f'no journal with a row beside {spool}')


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_the_ledger_row_a_process_held_when_it_was_killed_mid_turn_is_replayed_once_with_its_prompt(
    demo_data: None, database_url: str, tmp_path: Path, streamed: bool
) -> None:
    """The first request's row waits for the commit delay in the writer's memory; the process dies (SIGKILL) during
    the second request. The row was in the journal, so the next replay writes it (with its stored prompt), once."""
    session_id = f'held-{uuid.uuid4().hex[:8]}'
    spool = tmp_path / 'spool' / 'ledger.jsonl'
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        '-m',
        'tests.agents.turn_held_and_die',
        database_url,
        session_id,
        str(tmp_path / 'child'),
        'streamed' if streamed else 'plain',
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, 'AGENTRT_LEDGER_SPOOL': str(spool)},
    )
    try:
        assert process.stdout is not None
        assert json.loads(await asyncio.wait_for(process.stdout.readline(), 60)) == {'at_second_request': True}
        journal = await _journal_holding_a_row(spool)
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    # Held, never committed: without the journal this row, a request the provider bills, was gone with the process.
    assert await scalar('SELECT count(*) FROM llm_requests WHERE chat_session_id = :s', s=session_id) == 0

    tracker = LLMRequestTracker(fast_config(tmp_path, spool_path=spool))
    report = await tracker.replay_spool()
    assert (report.rows, report.inserted) == (1, 1)
    [row] = await ledger_rows(chat_session_id=session_id)
    assert row['success'] and row['streamed'] is streamed and row['input_tokens'] > 0 and row['run_step'] == 1
    prompt = await scalar(
        "SELECT body FROM llm_request_contents WHERE request_id = :r AND kind = 'prompt'", r=row['id']
    )
    assert 'Find me cardiologists in Seattle' in prompt
    assert not journal.exists() and not list(spool.parent.glob('*.journal-*'))
    again = await tracker.replay_spool()
    assert (again.rows, again.inserted) == (0, 0)
    assert await scalar('SELECT count(*) FROM llm_requests WHERE chat_session_id = :s', s=session_id) == 1
