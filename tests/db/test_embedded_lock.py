"""The embedded server's lifecycle lock (`agentrt.db.embedded_lock`): a wait for it is said, and stops when its caller
does; a holder that does not let go (suspended) is named, with what lets it go on."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from agentrt.db import embedded_lock
from agentrt.db.embedded_lock import lifecycle_lock
from agentrt.db.errors import EmbeddedPostgresError
from tests.agents.cli.helpers import ROOT


def test_a_wait_for_the_lock_is_said_and_ends_when_its_caller_stops_waiting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_lock, 'SAY_AFTER_SECONDS', 0.1)
    data_dir = tmp_path / 'pgdata'
    cancelled = threading.Event()
    failures: list[BaseException] = []

    def wait() -> None:
        try:
            with lifecycle_lock(data_dir, cancelled):
                pass
        except EmbeddedPostgresError as exc:
            failures.append(exc)

    with caplog.at_level(logging.WARNING, logger='agentrt.db'), lifecycle_lock(data_dir):
        waiter = threading.Thread(target=wait)
        waiter.start()
        for _ in range(200):  # a poll: until the waiter said it waits
            if caplog.records:
                break
            waiter.join(0.05)
        cancelled.set()
        waiter.join(10)
        assert not waiter.is_alive()
    me = f'another process (pid {os.getpid()}, '
    assert [record.getMessage() for record in caplog.records] == [
        f'embedded PostgreSQL in {data_dir}: {me}{_name(os.getpid())}) is starting or stopping it; waiting for it to '
        'finish'
    ]
    assert len(failures) == 1 and str(failures[0]).startswith(
        f'embedded PostgreSQL in {data_dir}: stopped while waiting ({me}'
    )
    with lifecycle_lock(data_dir):  # given back: the next one takes it at once
        pass


def _name(pid: int) -> str:
    import psutil

    return psutil.Process(pid).name()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from agentrt.db.embedded_lock import lifecycle_lock
    with lifecycle_lock(Path(sys.argv[1])):
        print('held', flush=True)
        time.sleep(120)
    """
)


async def test_a_command_waiting_for_a_suspended_holder_says_so_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    # A command whose start found another agentrt process suspended (Ctrl-Z) while it started the server waited on the
    # lock in silence, for good; Ctrl-C and SIGTERM did not stop it (the wait ran in a thread `asyncio.run` waits for).
    data_dir = tmp_path / 'pgdata'
    env = {k: v for k, v in os.environ.items() if k != 'DATABASE_URL'}
    env |= {'AGENTRT_DATA_DIR': str(data_dir), 'COLUMNS': '400'}
    holder = await asyncio.create_subprocess_exec(
        sys.executable, '-c', HOLDER, str(data_dir), stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    command = None
    try:
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 60) == b'held\n'
        holder.send_signal(signal.SIGSTOP)
        command = await asyncio.create_subprocess_exec(
            sys.executable,
            '-m',
            'agentrt.agents.cli',
            'costs',
            env=env,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert command.stderr is not None
        said = ''
        while 'waiting for it to finish' not in ' '.join(said.split()):  # rich wraps a log line at COLUMNS
            line = await asyncio.wait_for(command.stderr.readline(), 60)
            assert line, said
            said += line.decode()
        line = ' '.join(said.split())
        resume = f'it is suspended (Ctrl-Z or SIGSTOP): resume it with `fg` or `kill -CONT {holder.pid}`'
        assert line.startswith('WARNING ') and f'(pid {holder.pid}, ' in line and resume in line, line
        command.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(command.communicate(), 30)
        assert (command.returncode, out, err.decode()) == (
            130,
            b'',
            'error: stopped by SIGINT; nothing in progress was saved\n',
        )
    finally:
        for process in (command, holder):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()  # SIGKILL ends a suspended process too


def test_a_start_reads_the_clusters_version_only_under_the_lock(tmp_path: Path) -> None:
    """Two processes started at once on a new data directory: the second read PG_VERSION before taking the lock, while
    the first's initdb had made the file and not written it yet, and refused the directory as "made by PostgreSQL ''"
    (a CI run failed so). It now waits for the lock, as for every other look at the directory."""
    from agentrt.db.embedded import start_embedded

    data_dir = tmp_path / 'pgdata'
    data_dir.mkdir(mode=0o700)
    cancelled = threading.Event()
    failures: list[BaseException] = []

    def start() -> None:
        try:
            start_embedded(data_dir, stop_at_exit=False, cancelled=cancelled)
        except EmbeddedPostgresError as exc:
            failures.append(exc)

    with lifecycle_lock(data_dir):  # another process making the cluster: initdb made PG_VERSION, not written it yet
        (data_dir / 'PG_VERSION').write_text('')
        starter = threading.Thread(target=start)
        starter.start()
        starter.join(1.0)
        assert starter.is_alive(), failures  # waiting for the lock, not refusing a file it cannot read yet
        cancelled.set()
        starter.join(30)
    assert not starter.is_alive()
    assert len(failures) == 1 and 'made by PostgreSQL' not in str(failures[0]), failures
