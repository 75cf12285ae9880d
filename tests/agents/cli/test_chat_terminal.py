"""`agentrt chat` in a real terminal (a pty): line editing, Ctrl-C that stops an answer, Ctrl-C twice that leaves."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from pathlib import Path

import pexpect
from sqlalchemy import text

from agentrt.db.session import Unscoped, get_db_session
from tests.agents.cli.helpers import ROOT

QUESTION = 'Find cardiologists in Seattle'


def _session(database_url: str, history: Path) -> tuple[int | None, str]:
    # As a user's shell has it: pydantic-ai keeps its first-run banner away under pytest and CI by itself.
    quiet = ('PYTEST_VERSION', 'CI', 'PYDANTIC_AI_NO_BANNER')
    env = {
        **{k: v for k, v in os.environ.items() if k not in quiet},
        'DATABASE_URL': database_url,
        'AGENTRT_CHAT_HISTORY': str(history),
        'PROMPT_TOOLKIT_NO_CPR': '1',  # pexpect does not answer the cursor position request
        'TERM': 'xterm',
    }
    child = pexpect.spawn(
        sys.executable,
        ['-m', 'agentrt.agents.cli', 'chat', '--session', 'term', '--delay', '0.05'],
        cwd=str(ROOT),
        env=env,
        encoding='utf-8',
        timeout=60,
        dimensions=(40, 100),
    )
    seen = io.StringIO()
    child.logfile_read = seen  # everything the terminal showed
    try:
        child.expect('you>')
        child.send(QUESTION + '\r')
        child.expect('✓')  # a tool finished: the answer is on its way
        child.expect('I found')  # the answer itself is streaming
        child.sendcontrol('c')
        child.expect('stopped: this answer was not saved')
        child.expect('you>')
        child.send('abc')
        child.sendcontrol('c')  # clears the line...
        child.sendcontrol('c')  # ...then, at an empty prompt, asks once more...
        child.expect('press Ctrl-C again')
        child.sendcontrol('c')  # ...and leaves
        child.expect(pexpect.EOF)
    finally:
        child.close()
    return child.exitstatus, seen.getvalue()


async def test_ctrl_c_stops_the_answer_and_ctrl_c_twice_leaves(
    demo_data: None, database_url: str, tmp_path: Path
) -> None:
    history = tmp_path / 'history'
    status, output = await asyncio.to_thread(_session, database_url, history)
    assert status == 0, output
    assert 'Traceback' not in output and 'error:' not in output
    assert 'observability' not in output  # pydantic-ai's first-run banner stays away
    assert QUESTION in output and 'search_directory' in output
    async with get_db_session(account=Unscoped.ADMIN) as session:
        statuses = (
            await session.execute(text("SELECT status FROM llm_requests WHERE chat_session_id = 'term'"))
        ).scalars()
        assert 'cancelled' in set(statuses.all())  # the request the Ctrl-C cut off is billed, as cancelled
        saved = await session.execute(text("SELECT count(*) FROM conversations WHERE conversation_id = 'term'"))
        assert saved.scalar_one() == 0  # the stopped turn was not saved; 'abc' was never sent
    assert QUESTION in history.read_text() and 'abc' not in history.read_text()
    assert oct(history.stat().st_mode & 0o777) == '0o600'
