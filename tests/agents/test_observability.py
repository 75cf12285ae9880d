"""Tracing: a turn's parallel tool calls each with their own database connection; where spans go; no noise when off."""

from __future__ import annotations

import asyncio
import io
import os
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from logfire.testing import CaptureLogfire
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.trace import StatusCode
from sqlalchemy import make_url, select, text
from sqlalchemy.exc import DBAPIError

from agentrt.agents.observability import (
    BACKEND_PID_ATTRIBUTE,
    ShownText,
    instrument_runtime,
    service_name,
    trace_export,
    uninstrument_runtime,
)
from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
from agentrt.db.driver import DriverStatement, driver_transaction
from agentrt.db.errors import ConfigError, DatabaseUnavailableError
from agentrt.db.models import LLMRequestRow
from agentrt.db.session import Unscoped, get_db_session
from agentrt.db.transaction_setup import TransactionSetup
from tests.agents.otlp_receiver import OtlpReceiver, SilentCollector
from tests.factories import ledger_rows
from tests.programs import run_program

QUESTION = 'Find cardiologists in Boston who accept Aetna'  # the demo model searches four ways at once


@pytest_asyncio.fixture
async def instrumented(capfire: CaptureLogfire) -> AsyncIterator[CaptureLogfire]:
    """The runtime's instrumentation on logfire as `capfire` configured it (in memory), removed afterwards."""
    instrument_runtime()
    try:
        yield capfire
    finally:
        uninstrument_runtime()


def _children(spans: list[dict[str, Any]], parent: dict[str, Any]) -> list[dict[str, Any]]:
    span_id = parent['context']['span_id']
    return [s for s in spans if s['parent'] is not None and s['parent']['span_id'] == span_id]


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_parallel_tool_calls_overlap_each_with_its_own_database_connection(
    demo_data: None, instrumented: CaptureLogfire, streamed: bool
) -> None:
    if streamed:
        async with simple_chat_stream(QUESTION, session_id='traced', account='acme-health') as stream:
            async for _ in stream:
                pass
    else:
        await simple_chat(QUESTION, session_id='traced', account='acme-health')
    spans = instrumented.exporter.exported_spans_as_dict()
    [turn] = [s for s in spans if s['name'] == 'chat turn']
    assert turn['parent'] is None and turn['attributes']['agentrt.streamed'] is streamed
    # An operator finds a turn's trace by its conversation: logfire's scrubber replaced any attribute whose name
    # holds `session` ("[Scrubbed due to 'session']"), so the id is under the name pydantic-ai's spans use.
    assert turn['attributes']['gen_ai.conversation.id'] == 'traced', turn['attributes']
    assert turn['attributes']['agentrt.account'] == 'acme-health'
    # The agent the turn ran: the account's default one when the caller named none (it was '', QA).
    assert turn['attributes']['agentrt.agent_instance'] == 'provider-finder', turn['attributes']
    trace_id = turn['context']['trace_id']
    [run] = [s for s in spans if s['name'] == 'invoke_agent simple_chat']
    assert run['context']['trace_id'] == trace_id
    searches = [s for s in spans if s['name'] == 'execute_tool search_directory']
    assert len(searches) >= 3
    assert {s['context']['trace_id'] for s in searches} == {trace_id}
    # All of them started before the first one ended: they ran at the same time.
    assert max(s['start_time'] for s in searches) < min(s['end_time'] for s in searches)
    pids = []
    for search in searches:
        [connect] = [s for s in _children(spans, search) if s['name'] == 'connect']
        assert connect['attributes']['db.system'] == 'postgresql'
        pids.append(connect['attributes'][BACKEND_PID_ATTRIBUTE])
        assert any(s['name'] == 'SELECT' for s in _children(spans, search))
    assert len(set(pids)) == len(pids), 'two tools running at once shared a connection'
    # The turn's own database work is in the same trace, under the turn: the tenant (SELECT), the claim with the
    # history, and the save (both WITH; statements on the driver connection, seen through SQLAlchemy's events).
    own = [s['name'] for s in _children(spans, turn)]
    assert 'SELECT' in own and own.count('WITH') >= 2, own
    # No message content in any span: not the question, not a tool's arguments.
    assert not [s['name'] for s in spans if 'Boston' in str(s['attributes'])]
    # The ledger rows name the trace.
    async with get_db_session(account=Unscoped.ADMIN) as session:
        traces = (await session.execute(select(LLMRequestRow.trace_id))).scalars().all()
    assert traces and set(traces) == {f'{trace_id:032x}'}


async def test_a_failed_statement_on_the_driver_connection_ends_its_span_with_an_error_as_in_a_session(
    two_accounts: tuple[int, int], instrumented: CaptureLogfire
) -> None:
    alpha, _ = two_accounts
    timeout = TransactionSetup(statement_timeout_ms=20)
    # Each failure twice, through a session and on the driver connection (the comment tells their spans apart).
    failures = [('SELECT 1 / :zero', {'zero': 0}, None), ('SELECT pg_sleep(:s)', {'s': 5}, timeout)]
    raised: dict[str, BaseException] = {}
    for sql, params, setup in failures:
        # A statement timeout reaches the caller as DatabaseUnavailableError, from the driver's error.
        with pytest.raises((DBAPIError, DatabaseUnavailableError)):
            async with get_db_session(account=alpha, setup=setup) as session:
                await session.execute(text(sql + ' -- session'), params)
        with pytest.raises((asyncpg.DivisionByZeroError, DatabaseUnavailableError)) as failed:
            async with driver_transaction(account=alpha, setup=setup) as transaction:
                await transaction.fetch(DriverStatement.of(text(sql + ' -- driver')), params)
        error = failed.value
        raised[sql] = error.__cause__ if isinstance(error, DatabaseUnavailableError) and error.__cause__ else error
    async with driver_transaction(account=alpha) as transaction:
        await transaction.fetch(DriverStatement.of(text('SELECT 1 -- fine')), {})

    started = asyncio.Event()

    async def cancelled() -> None:
        async with driver_transaction(account=alpha) as transaction:
            started.set()  # this task next yields inside the statement, its span started
            await transaction.fetch(DriverStatement.of(text('SELECT pg_sleep(30) -- cancelled')), {})

    task = asyncio.create_task(cancelled())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    spans = {
        span.attributes['db.statement']: span
        for span in instrumented.exporter.exported_spans
        if span.attributes and span.attributes.get('logfire.span_type') == 'span' and 'db.statement' in span.attributes
    }
    for sql, params, _ in failures:
        sent = sql.replace(f':{next(iter(params))}', '$1')  # as the statement was sent (its span's db.statement)
        driver, session = spans[f'{sent} -- driver'], spans[f'{sent} -- session']
        assert driver.status.status_code is StatusCode.ERROR
        assert driver.status.description == str(raised[sql])  # the statement's error: division by zero, timeout
        assert driver.attributes is not None and driver.attributes['logfire.level_num'] == 17  # an error to Logfire
        # As the same failure's span through a session: status, message, events (the instrumentation adds none).
        assert (driver.status.status_code, driver.status.description, driver.events) == (
            session.status.status_code,
            session.status.description,
            session.events,
        )
    assert spans['SELECT 1 -- fine'].status.status_code is StatusCode.UNSET
    assert spans['SELECT pg_sleep(30) -- cancelled'].status.status_code is StatusCode.ERROR  # ended, as in a session


@pytest.mark.parametrize(
    ('environ', 'console', 'expected'),
    [
        ({}, None, 'off'),
        ({'LOGFIRE_CONSOLE': 'true'}, None, 'console (stderr)'),
        ({'LOGFIRE_CONSOLE': 'false'}, True, 'console (stderr)'),
        ({'LOGFIRE_CONSOLE': '1'}, False, 'off'),
        ({'LOGFIRE_TOKEN': 'pylf_v1_x'}, None, 'Logfire'),
        ({'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://c:4318'}, None, 'OTLP http://c:4318'),
        ({'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://c:4318', 'OTEL_TRACES_EXPORTER': 'none'}, None, 'off'),
        # OpenTelemetry's switch for its whole SDK: nothing was exported, and `db status` said OTLP (QA).
        ({'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://c:4318', 'OTEL_SDK_DISABLED': 'TRUE'}, None, 'off'),
        (
            {
                'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://c:4318',
                'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT': 'http://t/v1/traces',
            },
            None,
            'OTLP http://t/v1/traces',
        ),
        ({'OTEL_EXPORTER_OTLP_HEADERS': 'a=b'}, None, 'off'),
        # `agentrt db status` prints it: a password in the endpoint is masked as DATABASE_URL's is, a key redacted.
        ({'OTEL_EXPORTER_OTLP_ENDPOINT': 'https://u:s3cretOtlpPw@c:4318/x'}, None, 'OTLP https://u:***@c:4318/x'),
        (
            {'OTEL_EXPORTER_OTLP_ENDPOINT': 'https://c/v1?api_key=aB3dE5fG7hJ9kL1mN3pQ5'},
            None,
            'OTLP https://c/v1?api_key=[REDACTED]',
        ),
    ],
)
def test_where_spans_go(environ: dict[str, str], console: bool | None, expected: str) -> None:
    export = trace_export(console=console, environ=environ)
    assert export.describe() == expected
    assert export.enabled is (expected != 'off')


ENDPOINT = {'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://c:4318'}


@pytest.mark.parametrize(
    ('environ', 'expected'),
    [
        # logfire speaks OTLP/HTTP only: gRPC was sent HTTP requests (the one warning line showed an HTTP error).
        (
            {**ENDPOINT, 'OTEL_EXPORTER_OTLP_PROTOCOL': 'grpc'},
            r"^OTEL_EXPORTER_OTLP_PROTOCOL='grpc' is not supported.*",
        ),
        ({**ENDPOINT, 'OTEL_EXPORTER_OTLP_TRACES_PROTOCOL': 'GRPC'}, r'^OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=.*4318'),
        # Any other exporter turned tracing off without a word.
        ({**ENDPOINT, 'OTEL_TRACES_EXPORTER': 'zipkin'}, r"^OTEL_TRACES_EXPORTER='zipkin' is not supported.*'otlp'"),
        ({'OTEL_TRACES_EXPORTER': 'console'}, r'LOGFIRE_CONSOLE=true'),
        ({**ENDPOINT, 'OTEL_TRACES_EXPORTER': 'otlp,console'}, r'^OTEL_TRACES_EXPORTER='),
        # Taken and ignored: the metrics or logs went nowhere (QA).
        ({**ENDPOINT, 'OTEL_METRICS_EXPORTER': 'prometheus'}, r"^OTEL_METRICS_EXPORTER='prometheus' is not supported"),
        ({**ENDPOINT, 'OTEL_LOGS_EXPORTER': 'console'}, r"^OTEL_LOGS_EXPORTER='console' is not supported.*'none'"),
        # A malformed header was dropped with a warning that used up the one line about export failures; its value
        # (a token) is not quoted.
        (
            {**ENDPOINT, 'OTEL_EXPORTER_OTLP_HEADERS': 'x-team=a,authorization: Bearer s3cretT0ken'},
            r"^OTEL_EXPORTER_OTLP_HEADERS: the header 'authorization' is malformed[^3]*$",
        ),
        (
            {**ENDPOINT, 'OTEL_EXPORTER_OTLP_TRACES_HEADERS': 'a="quoted"'},
            r"^OTEL_EXPORTER_OTLP_TRACES_HEADERS: the .*'a'",
        ),
        ({**ENDPOINT, 'OTEL_EXPORTER_OTLP_HEADERS': 'justatoken'}, r'entry 1 of 1 is malformed'),
        ({**ENDPOINT, 'OTEL_EXPORTER_OTLP_METRICS_PROTOCOL': 'grpc'}, r'^OTEL_EXPORTER_OTLP_METRICS_PROTOCOL='),
        # The SDK's own values it cannot read: a warning that took the one export-failure line, or a traceback.
        ({'OTEL_EXPORTER_OTLP_ENDPOINT': 'collector:4318'}, r"^OTEL_EXPORTER_OTLP_ENDPOINT='collector:4318' is not an"),
        ({**ENDPOINT, 'OTEL_EXPORTER_OTLP_LOGS_ENDPOINT': 'ftp://u:pw@c/'}, r"LOGS_ENDPOINT='ftp://\*\*\*@c/' is not"),
        ({'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT': 'http://[::1/v1/traces'}, r'^OTEL_EXPORTER_OTLP_TRACES_ENDPOINT='),
        ({**ENDPOINT, 'OTEL_EXPORTER_OTLP_TIMEOUT': 'ten'}, r"^OTEL_EXPORTER_OTLP_TIMEOUT='ten' is not a timeout"),
        ({**ENDPOINT, 'OTEL_EXPORTER_OTLP_TIMEOUT': '-5'}, r'^OTEL_EXPORTER_OTLP_TIMEOUT='),  # every export failed
        # The specification's milliseconds, read as seconds: a command's end waited hours for a silent collector.
        ({**ENDPOINT, 'OTEL_EXPORTER_OTLP_TRACES_TIMEOUT': '10000'}, r'seconds, not milliseconds'),
        ({**ENDPOINT, 'OTEL_EXPORTER_OTLP_COMPRESSION': 'zstd'}, r"^OTEL_EXPORTER_OTLP_COMPRESSION='zstd' .*gzip"),
        ({**ENDPOINT, 'OTEL_BSP_MAX_QUEUE_SIZE': '0'}, r"^OTEL_BSP_MAX_QUEUE_SIZE='0' is not a whole number"),
        ({'LOGFIRE_CONSOLE': 'true', 'OTEL_BSP_SCHEDULE_DELAY': '5s'}, r'^OTEL_BSP_SCHEDULE_DELAY='),
        ({**ENDPOINT, 'OTEL_BLRP_MAX_QUEUE_SIZE': '100'}, r'^OTEL_BLRP_MAX_EXPORT_BATCH_SIZE \(512\) is larger'),
        ({**ENDPOINT, 'OTEL_METRIC_EXPORT_INTERVAL': 'abc'}, r'^OTEL_METRIC_EXPORT_INTERVAL='),
        ({**ENDPOINT, 'OTEL_TRACES_SAMPLER': 'ratio'}, r"^OTEL_TRACES_SAMPLER='ratio' is not a sampler.*traceidratio"),
        (
            {**ENDPOINT, 'OTEL_TRACES_SAMPLER': 'traceidratio', 'OTEL_TRACES_SAMPLER_ARG': '10%'},
            r'^OTEL_TRACES_SAMPLER_ARG=',
        ),
        # logfire reads it as its sample rate, whatever the sampler and tracing on or off: "logfire refused a LOGFIRE_*
        # variable: Expected trace_sample_rate to be a number" (QA); -1 was the SDK's ValueError, an internal error.
        ({'OTEL_TRACES_SAMPLER_ARG': 'abc'}, r"^OTEL_TRACES_SAMPLER_ARG='abc' is not a sampling ratio: .* from 0 to 1"),
        ({'LOGFIRE_CONSOLE': 'true', 'OTEL_TRACES_SAMPLER_ARG': '-1'}, r"^OTEL_TRACES_SAMPLER_ARG='-1' is not a"),
        ({'LOGFIRE_TRACE_SAMPLE_RATE': 'x', 'OTEL_TRACES_SAMPLER_ARG': '0.5'}, r"^LOGFIRE_TRACE_SAMPLE_RATE='x' is"),
        # A malformed entry (a comma too many included) made every command hang when the SDK warned of it.
        ({**ENDPOINT, 'OTEL_RESOURCE_ATTRIBUTES': 'team=search,'}, r'entry 2 of 2 is empty'),
        ({'LOGFIRE_TOKEN': 'pylf_v1_x', 'OTEL_RESOURCE_ATTRIBUTES': 'prod'}, r'entry 1 of 1 is not key=value'),
        # Read when OpenTelemetry's propagation is imported, tracing on or off: an internal error with a traceback.
        ({'OTEL_PROPAGATORS': 'tracecontext,jaegr'}, r"^OTEL_PROPAGATORS: 'jaegr' is not a propagator.*tracecontext"),
        ({'OTEL_PROPAGATORS': 'tracecontext,'}, r'an empty name'),
        # The span and log record limits: the SDK's ValueError was an internal error (exit 70) asking for a report.
        ({**ENDPOINT, 'OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT': 'abc'}, r"^OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT='abc' is not"),
        ({**ENDPOINT, 'OTEL_SPAN_LINK_COUNT_LIMIT': '1.5'}, r'^OTEL_SPAN_LINK_COUNT_LIMIT=.*at least 0'),
        ({'LOGFIRE_CONSOLE': 'true', 'OTEL_LOGRECORD_ATTRIBUTE_COUNT_LIMIT': '-1'}, r'^OTEL_LOGRECORD_ATTRIBUTE_COUNT'),
        # Read as opentelemetry.sdk.trace is imported (pydantic-ai imports it), tracing on or off.
        ({'OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT': '-3'}, r"^OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT='-3' is not a limit"),
    ],
)
def test_an_otel_value_tracing_cannot_honour_is_a_configuration_error(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        trace_export(environ=environ)


@pytest.mark.parametrize(
    'environ',
    [
        {**ENDPOINT, 'OTEL_EXPORTER_OTLP_PROTOCOL': 'http/protobuf', 'OTEL_TRACES_EXPORTER': 'OTLP'},
        {**ENDPOINT, 'OTEL_EXPORTER_OTLP_PROTOCOL': 'http/json'},  # a receiver of OTLP/HTTP takes protobuf as well
        {**ENDPOINT, 'OTEL_EXPORTER_OTLP_HEADERS': 'authorization=Bearer abc%20d, x-team = a,'},
        # Nothing exported over OTLP: the protocol and headers are not used.
        {'OTEL_EXPORTER_OTLP_PROTOCOL': 'grpc', 'OTEL_EXPORTER_OTLP_HEADERS': 'bad'},
        {**ENDPOINT, 'OTEL_TRACES_EXPORTER': 'none', 'OTEL_EXPORTER_OTLP_PROTOCOL': 'grpc'},
        {**ENDPOINT, 'OTEL_METRICS_EXPORTER': 'none', 'OTEL_EXPORTER_OTLP_METRICS_PROTOCOL': 'grpc'},
        {
            'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT': 'https://u:p@c.example:4318/v1/traces',
            'OTEL_EXPORTER_OTLP_TIMEOUT': '2.5',
            'OTEL_EXPORTER_OTLP_COMPRESSION': 'GZIP',
            'OTEL_BSP_MAX_QUEUE_SIZE': '4096',
            'OTEL_BSP_MAX_EXPORT_BATCH_SIZE': '1024',
            'OTEL_BSP_EXPORT_TIMEOUT': '0',
            'OTEL_TRACES_SAMPLER': 'parentbased_traceidratio',
            'OTEL_TRACES_SAMPLER_ARG': '0.25',
            'OTEL_RESOURCE_ATTRIBUTES': 'deployment.environment=prod, team = search%2Cads',
            'OTEL_PROPAGATORS': 'tracecontext, baggage',
            'OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT': ' 4096 ',
            'OTEL_SPAN_EVENT_COUNT_LIMIT': '0',
            'OTEL_LINK_ATTRIBUTE_COUNT_LIMIT': '',  # empty: no limit, as the SDK reads it
        },
        {'OTEL_PROPAGATORS': 'none,unknown'},  # `none` ends the list, as OpenTelemetry reads it
        {'OTEL_TRACES_SAMPLER_ARG': ' 1 ', 'LOGFIRE_TRACE_SAMPLE_RATE': ''},  # empty: unset, as logfire reads it
        # Spans made nowhere: the SDK's batching, sampler, resource and limits are not used.
        {
            'OTEL_RESOURCE_ATTRIBUTES': 'a,',
            'OTEL_BSP_MAX_QUEUE_SIZE': '0',
            'OTEL_TRACES_SAMPLER': 'x',
            'OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT': 'abc',
        },
    ],
)
def test_otel_values_tracing_honours_pass(environ: dict[str, str]) -> None:
    trace_export(environ=environ)


async def test_a_command_refuses_an_otel_value_it_cannot_honour_with_one_line(database_url: str) -> None:
    env = _clean_env(DATABASE_URL=database_url, OTEL_EXPORTER_OTLP_ENDPOINT='http://127.0.0.1:4317', COLUMNS='400')
    runs = [
        ({**env, 'OTEL_EXPORTER_OTLP_PROTOCOL': 'grpc'}, "error: OTEL_EXPORTER_OTLP_PROTOCOL='grpc' is not supported"),
        # Never ended: the SDK warned of the entry from a thread while being imported (pydantic's logfire plugin
        # imported it), and the CLI's log filter waited for an import lock the main thread held.
        ({**env, 'OTEL_RESOURCE_ATTRIBUTES': 'team=search,'}, 'error: OTEL_RESOURCE_ATTRIBUTES: entry 2 of 2'),
        # Tracing off: an internal error (exit 70) with a ValueError, as OpenTelemetry's propagation was imported.
        (_clean_env(DATABASE_URL=database_url, OTEL_PROPAGATORS='b3'), "error: OTEL_PROPAGATORS: 'b3' is not"),
        # An internal error (exit 70) asking for a report, from the SDK's ValueError.
        ({**env, 'OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT': 'abc'}, "error: OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT='abc' is"),
    ]
    results = await asyncio.gather(*(_cli(environ, 'db', 'status', seconds=60) for environ, _ in runs))
    for done, (_, expected) in zip(results, runs, strict=True):
        assert done.returncode == 2, done.stderr  # ConfigError's code: fix the configuration
        assert done.stderr.startswith(expected), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == '', done.stderr


async def test_a_malformed_resource_attribute_with_tracing_off_neither_hangs_a_chat_nor_shows_a_line(
    demo_data: None, database_url: str
) -> None:
    # The SDK reads OTEL_RESOURCE_ATTRIBUTES when it is imported (pydantic-ai imports it), tracing on or off, and
    # warns from a thread of its own: the CLI's log filter, importing its redaction from that thread while the main
    # thread held an import lock it needed, hung the command for good. Unused with tracing off: no line either.
    env = _clean_env(DATABASE_URL=database_url, OTEL_RESOURCE_ATTRIBUTES='k8s.pod.name=web-1,', COLUMNS='200')
    done = await _cli(env, 'chat', 'cardiologists in Boston', '-s', 'resource-comma', '--delay', '0', seconds=60)
    assert done.returncode == 0 and 'I found' in done.stdout, done.stderr
    assert done.stderr == ''


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(('LOGFIRE_', 'OTEL_'))}
    return {**env, **extra}


async def _cli(env: dict[str, str], *args: str, seconds: float = 120) -> subprocess.CompletedProcess[str]:
    """`agentrt ARGS...` run by a new interpreter with exactly `env` (`_clean_env`), no standard input."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, '-m', 'agentrt.agents.cli', *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=seconds,
        stdin=subprocess.DEVNULL,
        check=False,
    )


async def _python(script: str, database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`script` run by a new interpreter on the test database, without the environment's tracing settings."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, '-c', script],
        capture_output=True,
        text=True,
        env=_clean_env(DATABASE_URL=database_url, **env),
        timeout=120,
        check=False,
    )


async def test_turns_on_new_event_loops_after_ones_that_ended_without_shutdown(
    demo_data: None, database_url: str
) -> None:
    """`asyncio.run(simple_chat(...))` again and again without `shutdown_runtime()`: the second once failed with
    asyncpg's raw "got Future attached to a different loop" (the pool's connections belonged to the ended loop);
    now the database starts afresh on the new loop, the ended loop's connections dropped without a traceback."""
    script = textwrap.dedent(
        """
        import asyncio
        from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
        from agentrt.agents.runtime import shutdown_runtime

        async def turn(i):
            await simple_chat('cardiologists in Boston', session_id=f'loops-{i}', account='acme-health')
            async with simple_chat_stream('and Seattle?', session_id=f'loops-{i}', account='acme-health') as stream:
                async for _ in stream:
                    pass
            print(i, stream.result is not None)

        for i in range(3):
            asyncio.run(turn(i))

        async def last():
            await turn(3)
            await shutdown_runtime()

        asyncio.run(last())
        """
    )
    done = await _python(script, database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['0 True', '1 True', '2 True', '3 True']
    assert 'Traceback' not in done.stderr and 'different loop' not in done.stderr, done.stderr
    async with get_db_session(account=Unscoped.ADMIN) as session:
        saved = await session.execute(text("SELECT count(*) FROM conversations WHERE conversation_id LIKE 'loops-%'"))
        assert saved.scalar_one() == 4


def _backends_script(database_url: str, application: str, loops: str) -> tuple[str, str]:
    """A program that defines `backends()` (how many connections named `application` the server has open) and then
    runs `loops`, its warnings shown; and the URL to run it with, which names its connections `application`."""
    script = textwrap.dedent(
        """
        import asyncio
        import asyncpg
        import warnings
        warnings.simplefilter('default')  # a connection left unclosed says so
        from agentrt.agents.simple_chat import simple_chat

        async def backends():
            connection = await asyncpg.connect(DSN)
            try:
                # A closed connection's backend leaves pg_stat_activity as its process exits, a moment after the
                # client closed it (CI, loaded, counted one): read again for up to a second while any is listed.
                for _ in range(20):
                    count = await connection.fetchval(
                        'SELECT count(*) FROM pg_stat_activity WHERE application_name = $1', APPLICATION
                    )
                    if not count:
                        break
                    await asyncio.sleep(0.05)
                return count
            finally:
                await connection.close()

        """
    )
    dsn = make_url(database_url).set(drivername='postgresql').render_as_string(hide_password=False)
    script = script.replace('DSN', repr(dsn)).replace('APPLICATION', repr(application)) + textwrap.dedent(loops)
    url = make_url(database_url).update_query_dict({'application_name': application})
    return script, url.render_as_string(hide_password=False)


async def test_each_ended_event_loop_closes_its_pools_connections(demo_data: None, database_url: str) -> None:
    """The pool of a loop that ended without `shutdown_runtime()` kept its connections open until the garbage
    collector found them (about 3 server backends more each `asyncio.run`, 60 idle in one script; with
    `-W default`, a ResourceWarning for each): each loop's end closes them now (QA)."""
    loops = """
        for i in range(6):
            asyncio.run(simple_chat('cardiologists in Boston', session_id=f'closed-{i}', account='acme-health'))
            print(asyncio.run(backends()))
        """
    script, url = _backends_script(database_url, 'loops-closed', loops)
    done = await _python(script, url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ['0'] * 6, done.stdout
    assert 'ResourceWarning' not in done.stderr and 'Traceback' not in done.stderr, done.stderr


async def test_loops_closed_with_tasks_pending_leave_no_connection_open(demo_data: None, database_url: str) -> None:
    """A sync wrapper's pattern, a new loop per call closed without cancelling its tasks: the pending ones (the usage
    roll-up) kept their sessions' connections, and the closed loop's supervisor kept them alive, about 3 server
    backends a call until the server refused every client (QA). The closed loop's connections are closed as the
    next loop takes the runtime over."""
    loops = """
        for i in range(12):
            loop = asyncio.new_event_loop()
            turn = simple_chat('cardiologists in Boston', session_id=f'pending-{i}', account='acme-health')
            loop.run_until_complete(turn)
            loop.close()
        print(asyncio.run(backends()))
        """
    script, url = _backends_script(database_url, 'loops-pending', loops)
    done = await _python(script, url)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) <= 4, done.stdout  # the last loop's, at most: not 3 a call
    assert 'ResourceWarning' not in done.stderr and 'Traceback' not in done.stderr, done.stderr


async def test_a_loop_left_idle_for_another_runs_its_own_tasks_again_quietly(
    demo_data: None, database_url: str
) -> None:
    """Two loops used in turn, then the first run again: the runtime had closed the first loop's connections under its
    pending post-turn work, which then failed with pool tracebacks and never-awaited coroutines (QA). An idle loop's
    connections are left to it."""
    loops = """
        first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
        first.run_until_complete(simple_chat('cardiologists in Boston', session_id='idle-a', account='acme-health'))
        second.run_until_complete(simple_chat('cardiologists in Boston', session_id='idle-b', account='acme-health'))
        first.run_until_complete(asyncio.sleep(0.5))
        first.close()
        second.close()
        print('done')
        """
    script, url = _backends_script(database_url, 'loops-idle', loops)
    done = await _python(script, url)
    assert done.returncode == 0 and done.stdout.split() == ['done'], done.stderr
    assert 'Traceback' not in done.stderr and 'never awaited' not in done.stderr, done.stderr


async def test_a_loops_end_does_not_wait_on_a_server_that_does_not_answer(demo_data: None, database_url: str) -> None:
    """The loop's end closed its pool gracefully, without a bound: with the server frozen (its backends stopped, as
    a network that drops packets looks), `asyncio.run` returned after 72 s instead of 2 (QA). Bounded now, the
    connections left aborted."""
    url = make_url(database_url).update_query_dict({'application_name': 'loops-frozen'})
    script = textwrap.dedent(
        """
        import asyncio, os, signal, time
        import asyncpg
        from agentrt.agents.simple_chat import simple_chat

        stopped = []

        async def turn_then_freeze():
            await simple_chat('cardiologists in Boston', session_id='frozen-end', account='acme-health')
            connection = await asyncpg.connect(DSN)
            try:
                rows = await connection.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'loops-frozen' AND state = 'idle'"
                )
            finally:
                await connection.close()
            for row in rows:
                os.kill(row['pid'], signal.SIGSTOP)
                stopped.append(row['pid'])

        started = time.monotonic()
        try:
            asyncio.run(turn_then_freeze())
        finally:
            ended = time.monotonic() - started
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        print(len(stopped), round(ended, 1))
        """
    ).replace('DSN', repr(make_url(database_url).set(drivername='postgresql').render_as_string(hide_password=False)))
    done = await _python(script, url.render_as_string(hide_password=False))
    assert done.returncode == 0, done.stderr
    frozen, seconds = done.stdout.split()
    assert int(frozen) >= 1 and float(seconds) < 15, done.stdout
    assert 'Exception closing connection' not in done.stderr, done.stderr  # SQLAlchemy's traceback of a cut close


def test_the_console_spans_show_control_characters_written_out() -> None:
    # `agentrt --trace chat --model 'openai-chat:gpt<ESC>]0;T<BEL>'`: the span `chat <model>` reached the terminal with
    # the name's escapes as they were (a new title, a cleared screen, U+202E). The exporter's own colours stay.
    shown = io.StringIO()
    written = ShownText(shown).write('\x1b[1mchat\x1b[0m gpt\x1b]0;T\x07\x1b[2J\x1b[31m\u202eX\x9b\tY\n')
    assert shown.getvalue() == '\x1b[1mchat\x1b[0m gpt\\x1b]0;T\\x07\\x1b[2J\x1b[31m\\u202eX\\x9b\tY\n'
    assert written == 37  # the characters given, as a stream says


async def test_an_otlp_collector_and_the_console_get_agent_model_tool_and_database_spans_without_a_logfire_token(
    demo_data: None, database_url: str, receiver: OtlpReceiver
) -> None:
    env = _clean_env(
        DATABASE_URL=database_url,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        OTEL_SERVICE_NAME='directory-chat',  # the deployment's name, over logfire's own (`service_name`)
        COLUMNS='200',
    )
    # --delay 0: the demo model's pause between words (0.02 s by default, for a terminal) only made this wait 3 s.
    chat = ['chat', QUESTION, '-a', 'acme-health', '-s', 'otlp', '--delay', '0']
    done = await _cli(env, '--trace', *chat)
    assert done.returncode == 0, done.stderr
    assert 'observability' not in done.stderr and 'Warning' not in done.stderr
    # --trace: the same spans on stderr, none on stdout (the answer)
    assert 'chat turn' in done.stderr and 'running tool: search_directory' in done.stderr
    assert 'chat turn' not in done.stdout and 'I found' in done.stdout
    names = receiver.span_names()
    assert 'chat turn' in names and 'invoke_agent simple_chat' in names
    assert (
        'chat demo' in names
        and 'execute_tool search_directory' in names
        and 'execute_tool get_directory_entry' in names
    )
    # Spans are named by the statement's first word: the tools' reads, the turn's start and save (statements on the
    # driver connection, seen through SQLAlchemy's events) and the ledger's write begin with WITH.
    assert {'connect', 'SELECT', 'WITH'} <= names
    assert receiver.service_names() == {'directory-chat'}
    assert all(path in ('/v1/traces', '/v1/metrics', '/v1/logs') for path in receiver.paths)
    # The ledger rows of the turn name the trace the collector received.
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = (
            await session.execute(select(LLMRequestRow.trace_id).where(LLMRequestRow.chat_session_id == 'otlp'))
        ).scalars()
        traces = set(rows.all())
    assert traces and traces <= receiver.trace_ids()


async def test_trace_with_stderr_closed_prints_no_span_among_the_answers(demo_data: None, database_url: str) -> None:
    # `agentrt --trace chat ... 2>&-`: with no stderr, logfire's console printed the spans on stdout, into the answer.
    env = _clean_env(DATABASE_URL=database_url, COLUMNS='200')
    command = [
        sys.executable,
        '-m',
        'agentrt.agents.cli',
        '--trace',
        'chat',
        QUESTION,
        '-s',
        'no-stderr',
        '--delay',
        '0',
    ]
    done = await asyncio.to_thread(
        subprocess.run,
        ['bash', '-c', 'exec "$@" 2>&-', 'bash', *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stdout
    spans = [line for line in done.stdout.splitlines() if re.match(r'\d\d:\d\d:\d\d\.\d{3} ', line)]
    assert 'I found' in done.stdout and spans == [], spans[:5]


async def test_the_python_api_without_set_up_prints_no_warning_and_records_no_span(
    demo_data: None, database_url: str
) -> None:
    script = textwrap.dedent(
        """
        import asyncio, warnings
        warnings.simplefilter('error')
        warnings.filterwarnings('ignore', module='platformdirs')
        from agentrt.agents.simple_chat import simple_chat
        from agentrt.agents.runtime import shutdown_runtime
        from agentrt.agents.observability import tracing_active

        async def main():
            for _ in range(2):
                await simple_chat('cardiologists in Boston', session_id='plain', account='acme-health')
            await shutdown_runtime()

        asyncio.run(main())
        print(tracing_active())
        """
    )
    done = await _python(script, database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ['False']  # no tracer provider: the runtime's spans are no-ops
    assert done.stderr == ''
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = (
            await session.execute(select(LLMRequestRow.trace_id).where(LLMRequestRow.chat_session_id == 'plain'))
        ).scalars()
        assert set(rows.all()) == {None}  # no trace was recorded, so none is named


SPAN_SECRET = 'sk-proj-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7'
CLIENT_TRACE = '4bf92f3577b34da6a3ce929d0e0e4736'


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
async def test_a_failed_turns_span_carries_its_error_redacted(
    demo_data: None, instrumented: CaptureLogfire, streamed: bool
) -> None:
    # The provider's body (a key it echoes, a prompt it quotes) is chained under the documented error: the turn's
    # span recorded the whole traceback, raw, in its `exception` event, for every trace backend to keep.
    from pydantic_ai.exceptions import ModelHTTPError
    from pydantic_ai.models.function import FunctionModel

    from agentrt.agents.errors import ModelProviderError

    def fail(*_: object) -> Any:
        # A lone surrogate, as a `"\ud800"` escape in a provider's JSON decodes: in the span's status, it failed the
        # OTLP exporter's encoding of the whole batch (every span in it lost).
        message = f'Incorrect API key: {SPAN_SECRET}, in \ud800 request'
        raise ModelHTTPError(401, 'gpt-4o-mini', body={'error': {'message': message}})

    async def fail_streaming(*_: object) -> Any:
        fail()
        yield ''

    model = FunctionModel(fail, stream_function=fail_streaming, model_name='gpt-4o-mini')
    with pytest.raises(ModelProviderError):
        if streamed:
            async with simple_chat_stream('hi', session_id='span-secret', account='acme-health', model=model) as s:
                async for _ in s:
                    pass
        else:
            await simple_chat('hi', session_id='span-secret', account='acme-health', model=model)
    spans = instrumented.exporter.exported_spans  # pending spans included: they are exported too
    [turn] = [span for span in spans if span.name == 'chat turn' and span.end_time is not None and span.events]
    assert turn.status.status_code is StatusCode.ERROR and 'ModelProviderError' in (turn.status.description or '')
    [event] = [event for event in turn.events if event.name == 'exception']
    assert event.attributes is not None
    assert 'ModelHTTPError' in str(event.attributes['exception.stacktrace'])  # the story is still there
    assert 'ModelProviderError' in str(event.attributes['exception.type'])
    # The model request that failed is marked so too, streamed or not (pydantic-ai marked only the plain one: a
    # streamed request the provider refused showed as a success in the trace, with an empty answer).
    [request] = [
        span
        for span in spans
        if span.name == 'chat gpt-4o-mini' and (span.attributes or {}).get('logfire.span_type') == 'span'
    ]
    assert request.status.status_code is StatusCode.ERROR
    assert [e.attributes['exception.type'] for e in request.events if e.name == 'exception' and e.attributes] == [
        'pydantic_ai.exceptions.ModelHTTPError'
    ]
    everything = repr(
        [(span.name, span.attributes, span.status, [e.attributes for e in span.events]) for span in spans]
    )
    assert 'aB3dE5fG7hJ9' not in everything
    assert '\ufffd' in (turn.status.description or '')
    encode_spans(spans)  # as the OTLP exporter does, before it sends a batch


@pytest.mark.parametrize(
    ('api', 'fault'),
    [('chat', 'drop'), ('responses', 'drop'), ('chat', 'stall'), ('chat', 'corrupt'), ('chat', None)],
    ids=['cut-chat', 'cut-responses', 'stall', 'corrupt-chunk', 'consumer-left'],
)
async def test_a_stream_the_provider_breaks_off_marks_its_request_span_failed_and_one_the_consumer_leaves_does_not(
    demo_data: None, instrumented: CaptureLogfire, api: str, fault: str | None
) -> None:
    # The request's span of a stream cut, stalled or corrupted after its first chunks ended with an unset status and
    # no exception (pydantic-ai cancels the request's task when the stream's reader stops): a trace showed a request
    # that succeeded with a short answer, where the plain request's span says ERROR.
    from openai import AsyncOpenAI
    from pydantic_ai.models import override_allow_model_requests
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    from agentrt.agents.errors import ModelProviderError
    from tests.fake_openai import FakeOpenAI, Reply

    reply = Reply(text='Nobody in Seattle matches at all.', chunks=6, chunk_delay=0 if fault else 0.05)
    reply.fault, reply.fault_after = fault, 5  # type: ignore[assignment]
    with FakeOpenAI(lambda body: reply).running() as fake, override_allow_model_requests(True):
        async with AsyncOpenAI(base_url=fake.base_url, api_key='sk-test', max_retries=0, timeout=0.5) as client:
            provider = OpenAIProvider(openai_client=client)
            model = (OpenAIChatModel if api == 'chat' else OpenAIResponsesModel)('gpt-4o-mini', provider=provider)
            stream = simple_chat_stream('hi', session_id='broken-off', account='acme-health', model=model)
            if fault is None:  # the consumer takes a delta and leaves: a cancellation, no failure of the provider's
                async with stream:
                    async for _ in stream:
                        break
            else:
                with pytest.raises(ModelProviderError):
                    async with stream:
                        async for _ in stream:
                            pass
    spans = instrumented.exporter.exported_spans
    [request] = [
        span
        for span in spans
        if span.name == 'chat gpt-4o-mini'
        and span.end_time is not None
        and (span.attributes or {}).get('logfire.span_type') == 'span'
    ]
    failures = [e.attributes['exception.type'] for e in request.events if e.name == 'exception' and e.attributes]
    if fault is None:
        assert request.status.status_code is not StatusCode.ERROR and failures == []
        return
    assert request.status.status_code is StatusCode.ERROR
    expected = {'drop': 'ModelConnectionError', 'stall': 'ModelTimeoutError', 'corrupt': 'ModelAPIError'}[fault]
    assert failures == [f'pydantic_ai.exceptions.{expected}']


async def test_a_collector_down_or_not_answering_costs_a_command_seconds_and_one_line(
    demo_data: None, database_url: str
) -> None:
    # The OTLP exporter retries each export for 10 s (OTEL_EXPORTER_OTLP_TIMEOUT's default) at the end of a command,
    # once for the spans and twice for the metrics: `agentrt db status` took 13 s with the collector down, 17 s with
    # one that never answers, and printed up to 12 warnings of retries. A chat turn is answered as without tracing.
    silent = SilentCollector()
    chat = ('chat', QUESTION, '-s', 'collector-down', '--delay', '0')
    try:
        with socket.socket() as closed:
            closed.bind(('127.0.0.1', 0))  # bound, not listening: connections are refused
            runs = [(silent.port, ('db', 'status')), (closed.getsockname()[1], ('db', 'status'))]
            runs.append((closed.getsockname()[1], chat))
            results = await asyncio.gather(
                *(
                    _cli(
                        _clean_env(
                            DATABASE_URL=database_url,
                            OTEL_EXPORTER_OTLP_ENDPOINT=f'http://127.0.0.1:{port}',
                            # The spans exported at the command's end only: on a loaded machine a chat outlasted
                            # the batch's 5 s delay, and its line was a mid-run export's retry, not the give-up.
                            OTEL_BSP_SCHEDULE_DELAY='600000',
                            COLUMNS='400',
                        ),
                        *args,
                    )
                    for port, args in runs
                )
            )
    finally:
        silent.close()
    for done, (port, args), cause in zip(
        results, runs, ('timed out', 'Connection refused', 'Connection refused'), strict=True
    ):
        assert done.returncode == 0, done.stderr
        assert ('tracing' if args[0] == 'db' else 'I found') in done.stdout
        export_lines = [line for line in done.stderr.splitlines() if 'export' in line.lower()]
        assert len(export_lines) <= 1, done.stderr
        # The line names the cause, and the endpoint when the export was given up on (a chat's spans, at its end):
        # the SDK's words named neither ("Failed to export spans batch due to timeout, max retries or shutdown.").
        assert all(cause in line for line in export_lines), done.stderr
        if args[0] == 'chat':
            [line] = export_lines
            assert f'to http://127.0.0.1:{port}/v1/traces due to' in line, line
        assert 'Traceback' not in done.stderr and 'error:' not in done.stderr, done.stderr
    # Each export gave up after its 2 s (a loaded machine adds a little), not the SDK's 10 s.
    assert silent.waits and max(silent.waits) < 6, silent.waits
    # The turn was saved and billed as without tracing.
    assert [row['status'] for row in await ledger_rows(chat_session_id='collector-down')] == ['complete'] * 3


@pytest.mark.parametrize('how', ['task cancelled', 'stream closed early'])
async def test_a_cancelled_turns_span_says_it_was_cancelled(
    demo_data: None, instrumented: CaptureLogfire, how: str
) -> None:
    # A turn cancelled (a client hung up, a Ctrl-C) ended its span with the status "CancelledError: " (the
    # exception's text is empty); a stream its caller closed early ended it with no status at all.
    from pydantic_ai.models.function import FunctionModel

    started = asyncio.Event()

    def respond(*_: object) -> Any:
        raise AssertionError('streamed only')

    async def hold(*_: object) -> AsyncIterator[str]:
        yield 'one'
        started.set()
        await asyncio.sleep(30)  # until cancelled
        yield 'never'

    model = FunctionModel(respond, stream_function=hold, model_name='held')
    stream = simple_chat_stream('hi', session_id='span-cancelled', account='acme-health', model=model)
    if how == 'task cancelled':

        async def consume() -> None:
            async for _ in stream:
                pass

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        async with stream:
            async for _ in stream:
                break
    spans = instrumented.exporter.exported_spans
    [turn] = [s for s in spans if s.name == 'chat turn' and (s.attributes or {}).get('logfire.span_type') == 'span']
    assert turn.status.status_code is StatusCode.ERROR
    assert turn.status.description == 'cancelled: the turn was stopped before its end; nothing of it was saved'
    assert (turn.attributes or {}).get('agentrt.cancelled') is True


async def test_a_servers_exported_errors_are_redacted_and_a_clients_traceparent_is_honoured_quietly(
    database_url: str, receiver: OtlpReceiver
) -> None:
    # FastAPI's telemetry recorded an exception no handler mapped (a 500) as a log record with its message and whole
    # traceback, which reached the collector raw while the server's own log line showed them redacted. And logfire,
    # honouring a client's `traceparent`, exported a warning span ("Found propagated trace context") for it.
    script = textwrap.dedent(
        f"""
        import asyncio, httpx2
        from agentrt.agents.runtime import agentrt_runtime
        from agentrt.api.app import create_app

        async def main():
            async with agentrt_runtime():
                app = create_app(manage_runtime=False)

                @app.get('/boom')
                async def boom():
                    try:
                        raise ConnectionError('upstream said: invalid key {SPAN_SECRET}')
                    except ConnectionError as exc:
                        raise RuntimeError('token={SPAN_SECRET}') from exc

                transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
                async with httpx2.AsyncClient(transport=transport, base_url='http://agentrt') as client:
                    headers = {{'traceparent': '00-{CLIENT_TRACE}-00f067aa0ba902b7-01'}}
                    print((await client.get('/boom', headers=headers)).status_code)

        asyncio.run(main())
        """
    )
    done = await run_program('-c', script, database_url=database_url, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url)
    assert done.stdout.split() == ['500'], done.stderr[-3000:]
    [request] = [span for _, span in receiver.spans() if span.name == 'GET /boom']
    assert request.trace_id.hex() == CLIENT_TRACE and request.parent_span_id.hex() == '00f067aa0ba902b7'
    assert not [name for name in receiver.span_names() if 'propagated' in name.lower()]
    # The route's error is answered (500) and logged by the runtime, once (`CutOffAnswer`), not raised on to FastAPI's
    # telemetry: on the request's span, redacted, and in no exported log record raw.
    [event] = [event for event in request.events if event.name == 'exception']
    text = repr(event) + repr(request.status)
    assert 'RuntimeError' in text and 'ConnectionError' in text and '[REDACTED]' in text  # the story, redacted
    assert 'aB3dE5fG7hJ9' not in text and 'aB3dE5fG7hJ9' not in repr(receiver.log_records())


SECRET_VALUE = 'sk-proj-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7'


@pytest.mark.parametrize(
    'sql',
    [
        'SELECT CAST(CAST(:value AS text) AS integer)',  # PostgreSQL's error: invalid input syntax ...: "sk-proj-..."
        'SELECT CAST(:value AS integer)',  # asyncpg's, before sending: invalid input for query argument $1: 'sk-...'
    ],
    ids=['server', 'driver'],
)
async def test_a_failed_statements_span_carries_its_error_redacted(
    two_accounts: tuple[int, int], instrumented: CaptureLogfire, sql: str
) -> None:
    # The error of a failed statement quotes the value it refused; the SQLAlchemy instrumentation put it on the
    # statement's span status as it was, where every other error on a span is redacted (`record_redacted`).
    alpha, _ = two_accounts
    with pytest.raises(DBAPIError):
        async with get_db_session(account=alpha) as session:
            await session.execute(text(sql + ' -- session'), {'value': SECRET_VALUE})
    with pytest.raises((asyncpg.PostgresError, asyncpg.DataError)):
        async with driver_transaction(account=alpha) as transaction:
            await transaction.fetch(DriverStatement.of(text(sql + ' -- driver')), {'value': SECRET_VALUE})
    spans = {
        span.attributes['db.statement']: span
        for span in instrumented.exporter.exported_spans
        if span.attributes and span.attributes.get('logfire.span_type') == 'span' and 'db.statement' in span.attributes
    }
    sent = sql.replace(':value', '$1')
    for how in ('session', 'driver'):
        span = spans[f'{sent} -- {how}']
        assert span.status.status_code is StatusCode.ERROR
        description = span.status.description or ''
        assert 'aB3dE5fG7hJ9' not in description and '[REDACTED]' in description, description
        assert 'aB3dE5fG7hJ9' not in repr(span.events) + repr(span.attributes), (span.events, span.attributes)
    assert spans[f'{sent} -- session'].status.description == spans[f'{sent} -- driver'].status.description


@pytest.mark.parametrize(
    ('variables', 'name'),
    [
        ({}, 'agentrt'),
        ({'OTEL_SERVICE_NAME': 'billing-chat'}, 'billing-chat'),
        ({'OTEL_RESOURCE_ATTRIBUTES': 'deployment.environment=prod,service.name=eu%20chat'}, 'eu chat'),
        ({'OTEL_SERVICE_NAME': 'first', 'OTEL_RESOURCE_ATTRIBUTES': 'service.name=second'}, 'first'),
        ({'OTEL_RESOURCE_ATTRIBUTES': 'service.name=one,service.name=two'}, 'two'),  # the SDK takes the last
        ({'LOGFIRE_SERVICE_NAME': 'from-logfire'}, 'from-logfire'),
    ],
)
def test_the_service_name_of_the_spans_is_the_one_opentelemetry_variables_give(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], name: str
) -> None:
    # logfire's own argument, always `agentrt`, was put over OTEL_SERVICE_NAME: every deployment exported as one (QA).
    for variable in ('OTEL_SERVICE_NAME', 'OTEL_RESOURCE_ATTRIBUTES', 'LOGFIRE_SERVICE_NAME'):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)
    assert service_name() == name


@pytest.mark.parametrize(
    'given',
    [
        {'OTEL_TRACES_SAMPLER_ARG': ''},
        {'LOGFIRE_TRACE_SAMPLE_RATE': ''},
        {},
        {'OTEL_TRACES_SAMPLER': 'parentbased_traceidratio', 'OTEL_TRACES_SAMPLER_ARG': ''},
    ],
    ids=['empty', 'logfire-empty', 'unset', 'parent-based'],
)
async def test_a_ratio_sampler_given_no_ratio_keeps_every_trace_without_the_sdks_warning(
    database_url: str, receiver: OtlpReceiver, given: dict[str, str]
) -> None:
    # OTEL_TRACES_SAMPLER=traceidratio with an empty OTEL_TRACES_SAMPLER_ARG (or LOGFIRE_TRACE_SAMPLE_RATE, or none):
    # the SDK's "Could not convert TRACES_SAMPLER_ARG to float. Using default rate 1.0.", which `agentrt chat` showed
    # as an export failure (qa191). OpenTelemetry's default ratio, 1, without a word.
    script = textwrap.dedent(
        """
        from opentelemetry import trace
        from agentrt.agents.observability import configure_observability

        configure_observability()
        print(trace.get_tracer_provider().provider.sampler.get_description())
        """
    )
    env = {'OTEL_TRACES_SAMPLER': 'traceidratio', 'OTEL_EXPORTER_OTLP_ENDPOINT': receiver.url, **given}
    done = await _python(script, database_url, **env)
    assert done.returncode == 0, done.stderr
    assert 'TraceIdRatioBased{1.0}' in done.stdout, done.stdout
    assert 'Could not convert' not in done.stderr, done.stderr
