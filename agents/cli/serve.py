"""`agentrt serve`: the HTTP API (agentrt.api) under uvicorn. Needs the `http` extra."""

from __future__ import annotations

import importlib.util
import logging
import os
from asyncio import CancelledError
from typing import Any

import typer

from agentrt.agents.cli.support import EXIT_USAGE, Stopped, err_console, fail, long_running, run
from agentrt.agents.cli_entry import CUT_BY_SECOND_SIGNAL

# By name, not imported: the API layer sits above this one (api -> agents), and uvicorn's workers import it
# themselves. Each worker process builds the app and its own engine and pool.
APP_FACTORY = 'agentrt.api.app:create_served_app'
# httptools (fast) with a bound on the request's header section, which httptools has none of (api/header_limit.py).
HTTP_PROTOCOL = 'agentrt.api.header_limit:HeaderLimitedProtocol'
HTTP_PACKAGES = ('fastapi', 'uvicorn', 'starlette')
LOG_LEVELS = ('critical', 'error', 'warning', 'info', 'debug', 'trace')  # uvicorn's


def serve(
    host: str = typer.Option('127.0.0.1', '--host', envvar='AGENTRT_HTTP_HOST', help='Address to listen on.'),
    port: int = typer.Option(8000, '--port', min=1, max=65535, envvar='AGENTRT_HTTP_PORT', help='Port to listen on.'),
    workers: int = typer.Option(
        1, '--workers', min=1, max=64, envvar='AGENTRT_HTTP_WORKERS', help='Server processes (each has its own pool).'
    ),
    log_level: str = typer.Option('info', '--log-level', help='uvicorn log level (debug, info, warning, error).'),
    shutdown_seconds: int = typer.Option(
        20,
        '--shutdown-seconds',
        min=0,
        max=3600,
        envvar='AGENTRT_HTTP_SHUTDOWN_SECONDS',
        help='On SIGTERM, how long running requests (streamed answers) may go on before they are cut off.',
    ),
    web_ui: bool | None = typer.Option(
        None,
        '--web-ui/--no-web-ui',
        help='Serve the web UI at / (default: AGENTRT_HTTP_WEB_UI, true).',
        show_default=False,
    ),
) -> None:
    """Serve the HTTP API and the web UI: streamed chat, conversations, the audit, costs and health (see README)."""
    missing = missing_http_packages()
    if missing:
        needed = ', '.join(missing)  # `fail` prints text as it is (`[http]` is no style tag)
        fail(
            f"the HTTP server needs the http extra ({needed} not installed): pip install -e '.[http]' in a clone of "
            "agentrt, pip install 'agentrt[http]' where it was installed as a package",
            EXIT_USAGE,
        )
    if web_ui is not None:
        # The workers build their app from the settings (create_served_app), so the flag travels as the variable.
        os.environ['AGENTRT_HTTP_WEB_UI'] = 'true' if web_ui else 'false'
    if log_level.lower() not in LOG_LEVELS:  # uvicorn's KeyError, once the database had started: an internal error
        fail(f'--log-level must be one of {", ".join(LOG_LEVELS)}, got {log_level!r}', EXIT_USAGE)
    _check_address(host, port)
    _check_model()
    _warn_plain_http(host)
    long_running()
    try:
        _serve(host, port, workers, log_level, shutdown_seconds)
    except Stopped as stopped:
        # Before uvicorn's own handling of signals (the database's start, the app's import): a stop ends as one after
        # it does, with exit code 0 (systemd counts 143 as a failure), in one line.
        err_console.print(f'serve stopped by {stopped} before it served', highlight=False)


def _serve(host: str, port: int, workers: int, log_level: str, shutdown_seconds: int) -> None:
    # Start (and migrate) the database once, here, so a bad setting or an unreachable server is one clear error
    # before any worker starts, and workers never race to migrate.
    run(_check_database)
    import uvicorn

    options: dict[str, Any] = {
        'factory': True,
        'host': host,
        'port': port,
        'workers': workers,
        'log_level': log_level.lower(),
        'log_config': _log_config(log_level.upper()),
        'timeout_graceful_shutdown': shutdown_seconds,
        'http': HTTP_PROTOCOL,  # by name, as the app: each worker of `--workers N` imports it
    }
    if workers > 1:
        # uvicorn's supervisor: SIGTERM and Ctrl-C stop every worker gracefully and it exits 0; SIGHUP replaces the
        # workers (uvicorn's reload), as documented for it. It pings each worker every half second and kills one that
        # does not answer within `timeout_worker_healthcheck` (5 s by default), counting from the worker's spawn: a
        # new interpreter that configures the logging (the redaction filters import the ledger) before it can answer
        # took longer than 5 s on a busy 2-core host, so workers were killed as they started ("Child process [...]
        # died"), again and again while the load lasted.
        uvicorn.run(APP_FACTORY, **options, timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS)
        return
    from agentrt.agents.cli.served import GracefulServer

    config = uvicorn.Config(APP_FACTORY, **options)
    config.load_app()  # as `uvicorn.run` does: an app that does not import is one line and exit code 3
    server = GracefulServer(config)
    try:
        server.run()
    except KeyboardInterrupt:  # as `uvicorn.run`: Ctrl-C outside the server's own handling ends it quietly
        pass
    if not server.started:  # the app's start-up failed (uvicorn logged why): as `uvicorn.run` ends then
        raise typer.Exit(STARTUP_FAILURE)


STARTUP_FAILURE = 3
"""uvicorn's exit code for an app whose start-up failed (`uvicorn.config.STARTUP_FAILURE`)."""

WORKER_HEALTHCHECK_SECONDS = 30
"""How long uvicorn's supervisor of `--workers N` waits for a worker's answer to its ping before it kills the worker as
hung (uvicorn's default is 5 s): a start on a loaded host stays well within it."""


def missing_http_packages() -> list[str]:
    """The packages of the `http` extra that are not installed."""
    return [name for name in HTTP_PACKAGES if importlib.util.find_spec(name) is None]


def _check_address(host: str, port: int) -> None:
    """A usage error (exit 2) for an address this machine cannot listen on: a host that does not resolve or is not
    its own, a port in use. uvicorn found out only after the database had started, logged it as a line of its own
    and exited with 3, the code of an unreachable PostgreSQL."""
    import socket

    where = f'{host}:{port} (--host, --port; AGENTRT_HTTP_HOST, AGENTRT_HTTP_PORT)'
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (OSError, UnicodeError, ValueError) as exc:  # gaierror; an IDNA label too long; a NUL
        fail(
            f'cannot listen on {where}: the host does not resolve ({getattr(exc, "strerror", None) or exc})', EXIT_USAGE
        )
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            fail(f'cannot listen on {where}: {exc.strerror or exc}', EXIT_USAGE)


def _warn_plain_http(host: str) -> None:
    """One warning line when `host` is not a loopback address: the server speaks plain HTTP (it has no TLS option), so
    every request's key crosses the network readable by anyone on its path."""
    import ipaddress
    import socket

    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError, ValueError):  # _check_address has said it resolves; nothing to add if not
        return
    if addresses and all(ipaddress.ip_address(str(address).split('%')[0]).is_loopback for address in addresses):
        return
    err_console.print(
        f'warning: serving plain HTTP on {host}: API keys cross the network in clear text; put a reverse proxy '
        'that terminates TLS in front (README "In front of it")',
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _check_model() -> None:
    """A configuration error (exit 2) for a model the served chats cannot use (`AGENTRT_MODEL`: unknown, its API key
    or provider package missing), as for any other bad setting: the server started, `/health/ready` said ready, and
    every chat answered 500 `configuration_error`. Building it makes no request (its client is not called)."""
    from agentrt.agents.model_resolution import resolve_model
    from agentrt.db.settings import get_settings

    resolve_model(None, default=get_settings().model)


async def _check_database() -> None:
    from agentrt.db.engine import close_database, init_database

    await init_database()
    await close_database()


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, redacted, plus the runtime's own loggers (error ids of failed requests are logged there)."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = {**LOGGING_CONFIG, 'loggers': dict(LOGGING_CONFIG['loggers'])}
    debug = level in ('DEBUG', 'TRACE')
    # Secrets out of uvicorn's lines as out of the runtime's: a key in a URL's query (the access log), a provider's
    # error in the traceback of an exception that escaped the app (the error log).
    config['filters'] = {
        'redact': {'()': 'agentrt.services.log_redaction.RedactingFilter'},
        'redact_arguments': {'()': 'agentrt.services.log_redaction.ArgumentRedactingFilter'},
        # Before the redaction, which then reads the line as rewritten: an outage's background failures, one line each.
        'outage': {'()': 'agentrt.services.background.OutageAsOneLine', 'keep_traceback': debug},
        'cut_off': {'()': 'agentrt.agents.cli.serve.CutOffAsOneLine', 'keep_traceback': debug},
    }
    config['handlers'] = {
        name: {**handler, 'filters': ['redact_arguments'] if name == 'access' else ['outage', 'cut_off', 'redact']}
        for name, handler in LOGGING_CONFIG['handlers'].items()
    }
    known = level if level in logging.getLevelNamesMapping() else 'INFO'
    config['loggers']['agentrt'] = {'handlers': ['default'], 'level': known, 'propagate': False}
    # OpenTelemetry's exporters (a collector down or not answering: a warning per retry, an error per batch given up
    # on, every few seconds): one line per process, as a command prints, unless debug. The workers of `--workers N`
    # printed every one of them bare, through Python's last-resort handler (no logging of the CLI's in them).
    # On a handler of their own: a logger's filters see only the records logged on it, not its children's.
    config['handlers']['tracing'] = {**LOGGING_CONFIG['handlers']['default'], 'filters': ['redact']}
    if not debug:
        config['filters']['export_once'] = {
            '()': 'agentrt.agents.cli.logs.ExportFailuresOnce',
            'shows_all': '--log-level debug',
        }
        config['handlers']['tracing']['filters'] = ['export_once', 'redact']
    exporters = {'handlers': ['tracing'], 'level': 'DEBUG' if debug else 'WARNING', 'propagate': False}
    config['loggers']['opentelemetry'] = exporters
    # psycopg's pool logs the job queue's failed connections (reworded by the runtime: "the job queue cannot connect
    # to PostgreSQL"); with no handler of its own they went through Python's last-resort handler, bare and unredacted.
    config['loggers']['psycopg'] = {
        'handlers': ['default'],
        'level': 'DEBUG' if debug else 'WARNING',
        'propagate': False,
    }
    # Every other library's records too (SQLAlchemy's pool first): in the workers of `--workers N` they had no handler
    # and went through Python's last-resort one, a bare traceback each (QA: "Exception closing connection ...
    # CancelledError", 15 in a soak, for a pooled connection whose closing a dropped stream cancelled, which the pool
    # discards: not reported, as the CLI's logging and `--workers 1` do not).
    config['filters']['pool_close'] = {'()': 'agentrt.agents.cli.serve.CancelledCloseDropped', 'keep': debug}
    config['handlers']['library'] = {
        **LOGGING_CONFIG['handlers']['default'],
        'filters': ['pool_close', 'outage', 'redact'],
    }
    config['root'] = {'handlers': ['library'], 'level': 'DEBUG' if debug else 'WARNING'}
    return config


class CancelledCloseDropped(logging.Filter):
    """Drop SQLAlchemy's pool record of a connection whose closing was cancelled (a client that dropped its stream
    cancels the request's work): the pool discards the connection, nothing is wrong (`agents/cli/logs.py` drops it
    from the CLI's logging alike). Kept with `keep` (`--log-level debug`)."""

    def __init__(self, keep: bool = False) -> None:
        super().__init__()
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        """False for such a record; every other record passes."""
        exc = record.exc_info[1] if record.exc_info else None
        return self.keep or not (isinstance(exc, CancelledError) and record.name.startswith('sqlalchemy.pool'))


class CutOffAsOneLine(logging.Filter):
    """A request still running when the shutdown's grace (`--shutdown-seconds`) ran out is cancelled by uvicorn, which
    logs the cancellation as an "Exception in ASGI application" with its traceback: one WARNING line instead. uvicorn's
    own line before them, "ERROR: Cancel N running task(s), timeout graceful shutdown exceeded", is a WARNING too,
    saying which setting ran out: an ordinary stop with a long answer still streaming is not an error of the server's.
    Any other record passes as it is."""

    def __init__(self, keep_traceback: bool = False) -> None:
        super().__init__()
        self.keep_traceback = keep_traceback

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite uvicorn's record of a request cancelled by the shutdown in place; keep every record."""
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == 'uvicorn.error' and record.msg == _CANCELLING and isinstance(record.args, tuple):
            record.levelno, record.levelname = logging.WARNING, 'WARNING'
            record.msg = (
                'shutdown: %s request(s) still running after --shutdown-seconds (AGENTRT_HTTP_SHUTDOWN_SECONDS) are '
                'cancelled'
            )
            return True
        stop = _stop_cancellation(exc) if record.name == 'uvicorn.error' and _cancellation(exc) else None
        if stop is not None:
            record.levelno, record.levelname = logging.WARNING, 'WARNING'
            record.msg, record.args = (
                'a request still running after --shutdown-seconds (AGENTRT_HTTP_SHUTDOWN_SECONDS) was cut off'
                if _GRACE_OVER in stop
                else 'a request still running at a second Ctrl-C was cut off',
                (),
            )
            if not self.keep_traceback:
                record.exc_info, record.exc_text = None, None
        return True


_GRACE_OVER = 'timeout graceful shutdown exceeded'  # uvicorn's message on the cancellation (uvicorn/server.py)


def _cut_by_stop(message: str) -> bool:
    """Whether a cancellation's message is the shutdown's: the grace ran out, or a second Ctrl-C."""
    return _GRACE_OVER in message or CUT_BY_SECOND_SIGNAL in message


def _cancellation(exc: BaseException | None) -> bool:
    """Whether `exc` is a cancellation: a `CancelledError`, or a group of nothing else (a task group's)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_cancellation(member) for member in exc.exceptions)
    return isinstance(exc, CancelledError)


_CHAIN_LIMIT = 64
"""How many exceptions of a chain `_stop_cancellation` looks at: a chain is a few long, one built in a loop need not
be read to its end."""


def _stop_cancellation(exc: BaseException | None) -> str | None:
    """The message of the shutdown's cancellation if `exc` is it, or carries it in its `__context__` or `__cause__`
    chain or in a group's members; None otherwise.

    The request's code may not end with uvicorn's cancellation itself: anyio's task group (Starlette's streamed
    response) re-raises a bare `CancelledError` of its own while handling it, so the shutdown's message is only on the
    `__context__` of the exception uvicorn logs (QA: 3 tracebacks at a stop, for 2 streams and a JSON turn).
    """
    seen: set[int] = set()
    pending = [exc] if exc is not None else []
    while pending and len(seen) < _CHAIN_LIMIT:
        current = pending.pop()
        if id(current) in seen:  # a chain can loop (an exception raised again while handling itself)
            continue
        seen.add(id(current))
        if isinstance(current, CancelledError) and _cut_by_stop(str(current)):
            return str(current)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(linked for linked in (current.__cause__, current.__context__) if linked is not None)
    return None


_CANCELLING = 'Cancel %s running task(s), timeout graceful shutdown exceeded'  # its log line before it (the same)
