"""`agentrt serve`'s log configuration redacts uvicorn's lines too: the access log (a URL's path and query, where a
client may put a key: `?api_key=...`, or a secret as a conversation id) and the error log (the traceback of an
exception that escaped the app, with a provider's or driver's error text chained in it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SECRET = 'sk-proj-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7'
# What uvicorn logs, in its own words (uvicorn/protocols/http/*_impl.py), under the configuration `serve` gives it.
SCRIPT = f"""
import logging.config
from agentrt.agents.cli.serve import _log_config

logging.config.dictConfig(_log_config('INFO'))
logging.getLogger('uvicorn.access').info(
    '%s - "%s %s HTTP/%s" %d', '127.0.0.1:5000', 'GET', '/api/v1/conversations/{SECRET}?api_key={SECRET}', '1.1', 404
)
# Percent-encoded, as uvicorn quotes a path and as a client sends a query: '%20' before the key hid it from the rules.
logging.getLogger('uvicorn.access').info(
    '%s - "%s %s HTTP/%s" %d', '127.0.0.1:5000', 'GET', '/api/v1/conversations/a%20{SECRET}?q=key%3A{SECRET}', '1.1',
    422,
)
try:
    raise RuntimeError('provider said: invalid key {SECRET}')
except RuntimeError as exc:
    logging.getLogger('uvicorn.error').error('Exception in ASGI application\\n', exc_info=exc)
logging.getLogger('uvicorn.error').info('client sent %s', '{SECRET}')
# What `--log-level trace` prints of each request (uvicorn's message logger): its scope, the raw path and query in it.
logging.getLogger('uvicorn.asgi').info('ASGI [1] Started scope=%s', {{'query_string': b'q=x%3A{SECRET}'}})
"""


def test_uvicorns_access_and_error_lines_are_redacted(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, '-c', SCRIPT], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    assert '"GET /api/v1/conversations/[REDACTED]?api_key=[REDACTED] HTTP/1.1" 404' in done.stdout
    assert '"GET /api/v1/conversations/a%20[REDACTED]?q=key%3A[REDACTED] HTTP/1.1" 422' in done.stdout
    assert 'Exception in ASGI application' in done.stderr and 'RuntimeError: provider said: invalid key' in done.stderr
    assert 'client sent [REDACTED]' in done.stderr
    assert 'aB3dE5fG7hJ9' not in done.stdout + done.stderr


# A client's address as uvicorn takes it from `X-Forwarded-For` sent from 127.0.0.1 (trusted by default): anything.
FORWARDED = """
import logging.config
from agentrt.agents.cli.serve import _log_config

logging.config.dictConfig(_log_config('INFO'))
logging.getLogger('uvicorn.access').info(
    '%s - "%s %s HTTP/%s" %d', '9.9.9.9\\x9b2J\\u202e\\x1b]0;T\\x07\\nINFO: forged:0', 'GET', '/health/live', '1.1', 200
)
"""


def test_the_access_logs_client_is_written_out(tmp_path: Path) -> None:
    # uvicorn trusts `X-Forwarded-For` from 127.0.0.1 and printed it as sent: a local client put an 8-bit CSI, a
    # right-to-left override or a newline of its own in the access log (qa140).
    done = subprocess.run(
        [sys.executable, '-c', FORWARDED], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert line.isprintable(), repr(line)
    assert r'9.9.9.9\x9b2J\u202e\x1b]0;T\x07\nINFO: forged:0 - "GET /health/live HTTP/1.1" 200' in line, line


# A background task an outage stops, logged by the real supervisor under `serve`'s configuration.
OUTAGE = """
import asyncio, logging.config, sys
import agentrt.agents.run_errors  # as the served app does: the runtime's loggers redact their records from then on
from agentrt.agents.cli.serve import _log_config
from agentrt.db.errors import DatabaseUnavailableError
from agentrt.services.background import get_supervisor

logging.config.dictConfig(_log_config(sys.argv[1]))

async def rollup():
    raise DatabaseUnavailableError('cannot connect to PostgreSQL at 127.0.0.1:5432: Connection refused')

async def main():
    get_supervisor().spawn(rollup, name='usage rollup')
    await get_supervisor().join()

asyncio.run(main())
"""


@pytest.mark.parametrize('level', ['INFO', 'DEBUG'])
def test_a_background_task_an_outage_stops_is_one_warning_line(tmp_path: Path, level: str) -> None:
    # It was an ERROR with the task's whole traceback (about 130 lines under a real outage) for every task stopped; and
    # still was under `agentrt serve` once the log redaction had taken the exception off the record before the filter.
    done = subprocess.run(
        [sys.executable, '-c', OUTAGE, level], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if 'usage rollup' in line and not line.startswith('DEBUG')]
    assert lines == [
        'WARNING:  background task usage rollup not done: database unavailable: cannot connect to PostgreSQL at '
        '127.0.0.1:5432: Connection refused (a later turn does it again)'
    ], done.stderr
    assert ('Traceback' in done.stderr) == (level == 'DEBUG')


# What OpenTelemetry's exporters log while the collector is down (a retry, a batch given up on, the metrics' too), in
# their own words, with a password in the endpoint as a user may put it there.
EXPORT_FAILURES = f"""
import logging.config, sys
from agentrt.agents.cli.serve import _log_config

logging.config.dictConfig(_log_config(sys.argv[1]))
for name, level, message in [
    ('opentelemetry.exporter.otlp.proto.http.trace_exporter', logging.WARNING, 'Transient error %s, retrying in 1s.'),
    ('opentelemetry.exporter.otlp.proto.http.trace_exporter', logging.WARNING, 'Transient error %s, retrying in 2s.'),
    ('opentelemetry.sdk._shared_internal', logging.ERROR, 'Failed to export span batch: %s'),
    ('opentelemetry.exporter.otlp.proto.http.metric_exporter', logging.WARNING, 'Transient error %s, retrying in 1s.'),
]:
    logging.getLogger(name).log(level, message, 'http://otel:{SECRET}@collector:4318 refused')
"""


@pytest.mark.parametrize('level', ['INFO', 'DEBUG'])
def test_a_collector_down_is_one_line_per_server_process(tmp_path: Path, level: str) -> None:
    # A worker of `agentrt serve --workers N` printed each of them, every few seconds while the collector was down,
    # bare (Python's last-resort handler: no level, no redaction), where a command prints one line.
    done = subprocess.run(
        [sys.executable, '-c', EXPORT_FAILURES, level],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    if level == 'INFO':
        [line] = lines
        assert line.startswith('WARNING:') and 'tracing: Transient error' in line and '--log-level debug' in line
    else:
        assert len(lines) == 4 and all(line.startswith(('WARNING:', 'ERROR:')) for line in lines), lines
    assert 'aB3dE5fG7hJ9' not in done.stderr


# psycopg's pool failing to connect the job queue, in its own words, with a secret in the driver's text.
QUEUE_CONNECT = f"""
import logging.config
import agentrt.services.jobs  # its filter rewords the pool's notices in the runtime's words
from agentrt.agents.cli.serve import _log_config

logging.config.dictConfig(_log_config('INFO'))
logging.getLogger('psycopg.pool').warning(
    'error connecting in %r: %s', 'agentrt-jobs', 'connection failed: password {SECRET} refused'
)
"""


def test_the_job_queues_connect_failures_go_through_serves_handlers(tmp_path: Path) -> None:
    # With no logger of psycopg's in serve's configuration, they went through Python's last-resort handler: no level
    # prefix, and not through the handlers' redaction.
    done = subprocess.run(
        [sys.executable, '-c', QUEUE_CONNECT], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        'WARNING:  the job queue cannot connect to PostgreSQL (connection failed: password [REDACTED] refused); '
        'trying again'
    ], done.stderr


# What SQLAlchemy's pool logs in a worker of `--workers N` when a dropped stream cancels a connection's closing, and a
# library's warning with a secret in it.
LIBRARIES = f"""
import asyncio, logging.config, sys
from agentrt.agents.cli.serve import _log_config

logging.config.dictConfig(_log_config(sys.argv[1]))
try:
    raise asyncio.CancelledError()
except asyncio.CancelledError as exc:
    pool = logging.getLogger('sqlalchemy.pool.impl.AsyncAdaptedQueuePool')
    pool.error('Exception closing connection %r', 'c', exc_info=exc)
logging.getLogger('some.library').warning('could not reach %s', 'http://u:{SECRET}@host')
"""


@pytest.mark.parametrize('level', ['INFO', 'DEBUG'])
def test_library_records_are_log_lines_and_a_cancelled_pool_close_is_not_one(tmp_path: Path, level: str) -> None:
    # The workers of `agentrt serve --workers N` printed SQLAlchemy's pool record bare (Python's last-resort handler:
    # no level, no redaction, 20 lines of traceback) for a connection the pool discards as it should (QA).
    done = subprocess.run(
        [sys.executable, '-c', LIBRARIES, level], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    assert ('Exception closing connection' in done.stderr) == (level == 'DEBUG'), done.stderr
    [warned] = [line for line in done.stderr.splitlines() if 'could not reach' in line]
    assert warned.startswith('WARNING:') and 'aB3dE5fG7hJ9' not in done.stderr, done.stderr


# What uvicorn logs of requests its shutdown cancels, as their code ends: anyio's task group (Starlette's streamed
# response) handles uvicorn's cancellation and re-raises a bare CancelledError of its own, the message on its context.
CUT_OFF = """
import asyncio, logging.config, sys
from agentrt.agents.cli.serve import _log_config
from agentrt.agents.cli_entry import CUT_BY_SECOND_SIGNAL

logging.config.dictConfig(_log_config(sys.argv[1]))
GRACE_OVER = 'Task cancelled, timeout graceful shutdown exceeded'  # uvicorn/server.py

def raised_while_handling(message):
    try:
        try:
            raise asyncio.CancelledError(message)
        except asyncio.CancelledError:
            raise asyncio.CancelledError()
    except asyncio.CancelledError as exc:
        return exc

looped = asyncio.CancelledError()
looped.__context__ = asyncio.CancelledError()
looped.__context__.__context__ = looped
for exc in [
    asyncio.CancelledError(GRACE_OVER),  # uvicorn's own, as a JSON turn's code may end with it
    raised_while_handling(GRACE_OVER),
    raised_while_handling(CUT_BY_SECOND_SIGNAL),
    BaseExceptionGroup('unhandled errors in a TaskGroup', [raised_while_handling(GRACE_OVER)]),
    raised_while_handling('cancelled by something else'),  # not the stop's: as it is
    looped,  # a chain that loops, and not the stop's
]:
    logging.getLogger('uvicorn.error').error('Exception in ASGI application\\n', exc_info=exc)
"""


@pytest.mark.parametrize('level', ['INFO', 'DEBUG'])
def test_a_request_the_stop_cuts_off_is_one_warning_line_wherever_its_cancellation_is_chained(
    tmp_path: Path, level: str
) -> None:
    # A stream's code ended with anyio's bare CancelledError raised while handling uvicorn's: the shutdown's message
    # was only on its __context__, so "ERROR: Exception in ASGI application" and two tracebacks were logged for each
    # stream cut off, where README promises a WARNING line (QA: 3 at a stop, for 2 streams and a JSON turn).
    done = subprocess.run(
        [sys.executable, '-c', CUT_OFF, level], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    grace = 'WARNING:  a request still running after --shutdown-seconds (AGENTRT_HTTP_SHUTDOWN_SECONDS) was cut off'
    second = 'WARNING:  a request still running at a second Ctrl-C was cut off'
    logged = [line for line in done.stderr.splitlines() if line.startswith(('WARNING:', 'ERROR:'))]
    assert logged == [grace, grace, second, grace] + ['ERROR:    Exception in ASGI application'] * 2, done.stderr
    # The tracebacks of the requests cut off only with --log-level debug; the other cancellation's always.
    assert ('timeout graceful shutdown exceeded' in done.stderr) == (level == 'DEBUG'), done.stderr
    assert ('cut off by a second Ctrl-C' in done.stderr) == (level == 'DEBUG'), done.stderr
    assert 'CancelledError: cancelled by something else' in done.stderr
