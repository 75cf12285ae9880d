"""What the queue's tests share: a turn that queues its jobs, the queue's rows, the rollup held mid-job, and
`agentrt worker` run as a separate process, as a user runs it (its stderr read as it comes, to signal it on cue)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import text

from agentrt.agents.simple_chat import simple_chat
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.conversations import _turns
from agentrt.services.ledger import get_request_tracker
from tests.agents.cli.helpers import ROOT
from tests.factories import scalar

QUESTION = 'Find cardiologists in Seattle'
PROCRASTINATE_TABLES = 'procrastinate_events, procrastinate_periodic_defers, procrastinate_jobs, procrastinate_workers'
_ROLLUP_LOCK = 'SELECT pg_advisory_xact_lock(1919904876, 0)'  # services/ledger/_rollups.py: 'roll', exclusive


async def chat(session_id: str) -> None:
    """A turn of the demo model, its ledger rows written and its jobs queued."""
    await simple_chat(QUESTION, session_id=session_id, account='acme-health')
    await get_request_tracker().flush()
    await get_supervisor().join()  # the task that queues the turn's jobs


PERIODIC_TASKS = ('agentrt.reconcile', 'agentrt.retry_stalled')
"""The periodic maintenance jobs (services/jobs/_tasks.py): a worker running at the start of a minute (every fifth for
the reconcile) queues one, which a burst worker that found the queue empty leaves behind; `queued_jobs` leaves them
out, so a test's count of the jobs its turns queued does not depend on the clock."""


async def queued_jobs() -> list[tuple[str, str]]:
    """`(task name, status)` of every job in the queue but the periodic ones (`PERIODIC_TASKS`), in queued order."""
    async with get_db_session(account=Unscoped.OWNER) as session:
        rows = await session.execute(
            text('SELECT task_name, status::text FROM procrastinate_jobs WHERE task_name <> ALL(:p) ORDER BY id'),
            {'p': list(PERIODIC_TASKS)},
        )
        return [(str(name), str(status)) for name, status in rows]


async def rolled_up_requests() -> int:
    return int(await scalar('SELECT coalesce(sum(requests), 0) FROM usage_daily_rollups'))


async def title(session_id: str) -> Any:
    return await scalar('SELECT title FROM conversations WHERE conversation_id = :c', c=session_id)


def titles_left_to_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    """The turns' saves cannot make the title and summary (as when a turn's messages do not reach back to the start
    of a long conversation), so the post-turn work is due them."""
    monkeypatch.setattr(_turns, 'summary_source', lambda *args, **kwargs: None)


@asynccontextmanager
async def rollup_lock_held() -> AsyncIterator[None]:
    """Hold the rollup's lock while inside: a rollup job started meanwhile waits for it, mid-job, inside its
    transaction (up to its lock timeout, 30 s): a slow job made of the product's own, with no hook of the tests'."""
    release = asyncio.Event()
    locked = asyncio.Event()

    async def hold() -> None:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            await session.execute(text(_ROLLUP_LOCK))
            locked.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await locked.wait()
    try:
        yield
    finally:
        release.set()
        await holder


async def wait_for(predicate: Any, seconds: float, what: str) -> None:
    """Poll the async `predicate` until it is true."""
    try:
        async with asyncio.timeout(seconds):
            while not await predicate():  # noqa: ASYNC110 - polling the database is the wait
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f'timed out waiting for {what}') from None


def queue_url(database_url: str) -> str:
    """The test database's URL as a user gives it (libpq's scheme)."""
    return database_url.replace('postgresql+asyncpg://', 'postgresql://')


class WorkerProcess:
    """`agentrt worker ARGS...` in a process of its own, its stderr collected line by line as it comes."""

    def __init__(self, database_url: str, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = {
            **os.environ,
            'DATABASE_URL': queue_url(database_url),
            'AGENTRT_AUTO_MIGRATE': 'false',
            'COLUMNS': '200',  # log lines on one line each
            'PYTHONUNBUFFERED': '1',
            **(env or {}),
        }
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'agentrt.agents.cli', 'worker', *args],
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip())
                self._changed.notify_all()

    @property
    def stderr(self) -> str:
        return '\n'.join(self.lines)

    async def said(self, fragment: str, seconds: float = 30) -> None:
        """Wait until a line of its stderr holds `fragment`."""

        def wait() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: any(fragment in line for line in self.lines), seconds)

        if not await asyncio.to_thread(wait):
            raise AssertionError(f'the worker never said {fragment!r}: {self.stderr[-3000:]}')

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def exit_code(self, seconds: float) -> int:
        """Its exit code, once it has exited (within `seconds`, else the test fails)."""
        try:
            code = await asyncio.to_thread(self.process.wait, seconds)
        except subprocess.TimeoutExpired:
            raise AssertionError(f'the worker did not exit within {seconds} s: {self.stderr[-3000:]}') from None
        await asyncio.to_thread(self._reader.join, 5)
        return code

    def kill(self) -> None:
        """Whatever happened: the process gone, its pipe closed."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()
