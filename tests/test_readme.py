"""README.md's Python example runs as written: the block is read from the README, so the two cannot drift apart."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select

from agentrt.db.models import ConversationRow
from agentrt.db.session import Unscoped, get_db_session

README = Path(__file__).resolve().parents[1] / 'README.md'


def python_example() -> str:
    """The first ```python block of the section "Using it from Python"."""
    text = README.read_text()
    section = text[text.index('## Using it from Python') :]
    section = section[: section.index('\n## ', 3)]
    match = re.search(r'```python\n(.*?)```', section, re.DOTALL)
    assert match is not None, 'README.md: no python block under "Using it from Python"'
    return match.group(1)


def test_the_example_is_a_whole_program() -> None:
    code = python_example()
    compile(code, 'README.md', 'exec')
    assert 'asyncio.run(main())' in code and 'agentrt_runtime()' in code and 'toolsets=[my_tools]' in code


async def test_the_python_example_runs_as_written(demo_data: None, database_url: str, tmp_path: Path) -> None:
    script = tmp_path / 'example.py'
    script.write_text(python_example())
    env = {**os.environ, 'DATABASE_URL': database_url, 'AGENTRT_LEDGER_SPOOL': str(tmp_path / 'spool.jsonl')}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,  # anywhere: the installed `agentrt` package is what it imports
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert 'Cardiology providers in Seattle who accept Medicare' in out and 'None' in out  # unpriced: cost None
    assert 'Boston' in out and 'RunUsage(' in out  # the streamed turn finished and was saved
    assert 'Traceback' not in result.stderr
    async with get_db_session(account=Unscoped.ADMIN) as session:
        saved = (await session.execute(select(func.count()).where(ConversationRow.conversation_id == 's-1'))).scalar()
    assert saved == 1
