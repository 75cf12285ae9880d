"""Tracing: where spans go (nowhere unless asked), the runtime's instrumentation, and the span of a chat turn.

Spans are exported only when the environment asks (`trace_export()`):

- `LOGFIRE_TOKEN`: to Logfire;
- `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (unless `OTEL_TRACES_EXPORTER` names another
  exporter): to any OpenTelemetry backend over OTLP/HTTP, with the standard `OTEL_*` variables (headers, protocol;
  a value logfire cannot honour, such as `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`, is a `ConfigError`: `otlp_settings`);
- `LOGFIRE_CONSOLE=true` (or `agentrt --trace`): printed on stderr.

Then `configure_observability()` sets up logfire (its OpenTelemetry SDK) and `instrument_runtime()` adds pydantic-ai's
spans (agent run, model request, tool call; no message content), SQLAlchemy's (connection checkout and each
statement, with the PostgreSQL backend pid of the connection) and a span around each chat turn. Asked for nothing,
it installs nothing: logfire is not configured, no tracer provider is set (the runtime's own spans are
OpenTelemetry's no-op ones, and the turn span is not even made), no warning is printed, and nothing leaves the
machine.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TextIO, cast

from opentelemetry import trace

from agentrt.agents.otlp_failures import name_export_failures, shown_endpoint
from agentrt.agents.otlp_settings import check_otlp_settings, check_sdk_settings
from agentrt.agents.otlp_stop import bound_exports_at_exit, stopping_exports
from agentrt.db.flags import LOGFIRE_OFF, LOGFIRE_ON, env_flag
from agentrt.services.span_errors import exported_text, record_redacted

SERVICE_NAME = 'agentrt'
BACKEND_PID_ATTRIBUTE = 'db.postgresql.backend_pid'

_tracer = trace.get_tracer('agentrt')


# The colours rich writes for logfire's console lines (Select Graphic Rendition): the only escapes left as they are.
_COLOURS = re.compile(r'(\x1b\[[0-9;]*m)')


class ShownText:
    """A text stream (stderr) for logfire's console exporter, which writes each character of a span's name and
    attributes to the terminal as it is: what it is given is written with its control characters, bidirectional
    controls and line separators written out (`visible`: `\\x1b`, `\\u202e`), all but newlines and tabs and the
    colours of its own lines. Everything else is the stream's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        from agentrt.agents.cli.transcript import visible  # here: tracing off never loads rich's modules

        pieces = _COLOURS.split(text)  # the colours at odd indexes
        self._stream.write(''.join(piece if i % 2 else visible(piece) for i, piece in enumerate(pieces)))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@dataclass(frozen=True)
class TraceExport:
    """Where spans go, as the environment (and `agentrt --trace`) asked."""

    logfire: bool
    """`LOGFIRE_TOKEN` is set: spans go to Logfire."""
    otlp_endpoint: str | None
    """The OTLP endpoint spans go to (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`)."""
    console: bool
    """Spans are printed on stderr."""

    @property
    def enabled(self) -> bool:
        """Whether spans go anywhere at all."""
        return self.logfire or self.otlp_endpoint is not None or self.console

    def describe(self) -> str:
        """Where spans go, in a few words (`agentrt db status`, logs)."""
        places = [
            *(['Logfire'] if self.logfire else []),
            *([f'OTLP {shown_endpoint(self.otlp_endpoint)}'] if self.otlp_endpoint else []),
            *(['console (stderr)'] if self.console else []),
        ]
        return ', '.join(places) or 'off'


def trace_export(*, console: bool | None = None, environ: Mapping[str, str] | None = None) -> TraceExport:
    """Where spans would go, from the environment.

    Args:
        console: print spans on stderr (`agentrt --trace`); `None` leaves it to `LOGFIRE_CONSOLE`.
        environ: the environment to read; `os.environ` when omitted.

    Raises:
        ConfigError: `LOGFIRE_CONSOLE` set to something that is not on or off (`env_flag`), or an `OTEL_*` value the
            runtime cannot honour (`check_otlp_settings`): an exporter other than
            `otlp` or `none`, a protocol other than OTLP/HTTP, a malformed headers entry or endpoint, a timeout or
            compression the exporter cannot use, an unknown propagator; or, when spans are made, one of the SDK's own
            variables it cannot read (`check_sdk_settings`: batching, sampler, resource attributes, limits).
    """
    env = os.environ if environ is None else environ
    check_otlp_settings(env)  # a value logfire would ignore or misread: a ConfigError, as an invalid setting is
    otlp: str | None = None
    # OpenTelemetry's switch for its whole SDK: nothing is exported then, and `agentrt db status` said OTLP (QA).
    sdk_off = env.get('OTEL_SDK_DISABLED', '').strip().lower() == 'true'
    if env.get('OTEL_TRACES_EXPORTER', '').strip().lower() in ('', 'otlp') and not sdk_off:
        # As logfire (and the OpenTelemetry SDK) read them: the signal's own endpoint first.
        otlp = env.get('OTEL_EXPORTER_OTLP_TRACES_ENDPOINT') or env.get('OTEL_EXPORTER_OTLP_ENDPOINT') or None
    if console is None:
        console = env_flag('LOGFIRE_CONSOLE', env, on=LOGFIRE_ON, off=LOGFIRE_OFF)  # as logfire reads it
    export = TraceExport(logfire=bool(env.get('LOGFIRE_TOKEN')), otlp_endpoint=otlp, console=console)
    if export.enabled:  # the SDK is set up and reads its own variables (batching, sampler, resource)
        check_sdk_settings(env)
    return export


_configured: TraceExport | None = None


def configure_observability(*, console: bool | None = None) -> TraceExport:
    """Set up tracing once per process, as `trace_export()` reads the environment; later calls change nothing.

    With somewhere to send spans, logfire is configured (`send_to_logfire='if-token-present'`: Logfire only with a
    token; OTLP and the console as asked) and `instrument_runtime()` is called. With nowhere, nothing is installed.
    Either way pydantic-ai's first-run banner is turned off: the README says how to turn tracing on.

    Args:
        console: print spans on stderr (`agentrt --trace`); `None` leaves it to `LOGFIRE_CONSOLE`.

    Returns:
        Where spans go.

    Raises:
        ConfigError: `LOGFIRE_CONSOLE` set to something that is not on or off (`env_flag`), or an `OTEL_*` value the
            runtime cannot honour (see `trace_export`).
    """
    global _configured
    if _configured is not None:
        return _configured
    if 'pydantic_ai' in sys.modules:
        import pydantic_ai

        pydantic_ai.BANNER_ENABLED = False
    else:
        # Not imported yet (a command that runs no agent, such as `agentrt db status`): importing it only to set
        # its flag cost about 0.7 s of each such command's start; pydantic-ai reads this variable as it reads the flag.
        os.environ.setdefault('PYDANTIC_AI_NO_BANNER', '1')
    export = trace_export(console=console)
    if export.enabled:
        _default_sampler_ratio()
        import logfire

        from agentrt import __version__
        from agentrt.agents.span_redaction import LogRedaction, UrlRedaction

        logfire.configure(
            send_to_logfire='if-token-present',
            # Never on stdout: with stderr closed (`2>&-`, sys.stderr None) logfire printed the spans among the answers.
            # Its control characters written out: a span's name holds the operator's model name (`chat <model>`),
            # whose ESC and U+202E reached the terminal as they were (qa140).
            console=logfire.ConsoleOptions(output=cast(TextIO, ShownText(sys.stderr)))
            if export.console and sys.stderr is not None
            else False,
            service_name=service_name(),
            service_version=__version__,
            # First: a request's URL redacted before any exporter sees the span (a key in `?api_key=`).
            additional_span_processors=[UrlRedaction()],
            # First too: an exception's message and traceback redacted before a log record is exported.
            advanced=logfire.AdvancedOptions(log_record_processors=[LogRedaction()]),
            # A client's `traceparent` is honoured on purpose (an HTTP request joins its caller's trace): said, so
            # logfire does not export a warning span ("Found propagated trace context") from each server process.
            distributed_tracing=True,
        )
        instrument_runtime()
        if export.otlp_endpoint is not None:
            import atexit

            name_export_failures()  # an export given up on says why (the SDK's line does not)
            # After logfire's providers registered their shutdowns: atexit runs the last registered first.
            atexit.register(bound_exports_at_exit)
    _configured = export
    return export


def _default_sampler_ratio() -> None:
    """A ratio sampler (`OTEL_TRACES_SAMPLER=traceidratio`) given no ratio, an empty or blank
    `OTEL_TRACES_SAMPLER_ARG`, or none, gets OpenTelemetry's default, 1, in the variable: logfire leaves the sampler
    to the SDK when its own ratio is 1, and the SDK warned that it "Could not convert TRACES_SAMPLER_ARG to float.
    Using default rate 1.0." (in the CLI as an export failure, naming a variable that may not be set: qa191). logfire
    reads the same variable as its ratio, after an empty `LOGFIRE_TRACE_SAMPLE_RATE`: 1 as well."""
    sampler = os.environ.get('OTEL_TRACES_SAMPLER', '').strip().lower()
    if sampler.endswith('traceidratio') and not os.environ.get('OTEL_TRACES_SAMPLER_ARG', '').strip():
        os.environ['OTEL_TRACES_SAMPLER_ARG'] = '1.0'


def service_name() -> str:
    """The service's name in its spans' resource: `OTEL_SERVICE_NAME`, else `service.name` in
    `OTEL_RESOURCE_ATTRIBUTES` (OpenTelemetry's order), else `LOGFIRE_SERVICE_NAME`, else `agentrt`. Given to logfire,
    which otherwise puts its own argument over them: two deployments could not be told apart (QA)."""
    named = os.environ.get('OTEL_SERVICE_NAME', '').strip()
    if named:
        return named
    resource = ''  # the last one given, as the SDK's own parser takes it
    for pair in os.environ.get('OTEL_RESOURCE_ATTRIBUTES', '').split(','):
        key, _, value = pair.partition('=')
        if key.strip() == 'service.name' and value.strip():
            resource = urllib.parse.unquote(value.strip())
    return resource or os.environ.get('LOGFIRE_SERVICE_NAME', '').strip() or SERVICE_NAME


async def flush_spans(timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a bound on the exporters' work
    """Send the spans still buffered (a batch exporter sends every few seconds), when tracing was configured here.

    Sent to an OTLP collector, each batch gets one attempt of a few seconds (`stopping_exports`): a stop with the
    collector down or not answering is not held up by retries.
    """
    if _configured is None or not _configured.enabled:
        return
    # The spans only: the metrics go at the process's exit (the meter provider's own shutdown); flushing them here
    # too made a command's end wait for two exports to a collector that is down.
    force_flush = getattr(trace.get_tracer_provider(), 'force_flush', None)
    if force_flush is not None:
        with stopping_exports() if _configured.otlp_endpoint is not None else nullcontext():
            await asyncio.to_thread(force_flush, int(timeout * 1000))


def spans_exported() -> bool:
    """Whether this process sends spans anywhere (as configured, or as the environment asks if not configured yet).

    What costs CPU per request only to make spans (FastAPI's request telemetry) is on only then.
    """
    return (_configured or trace_export()).enabled


def tracing_active() -> bool:
    """Whether spans made now are recorded: a tracer provider is installed (by logfire, or by the host program)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def instrument_runtime() -> None:
    """Add the runtime's spans to logfire's tracer provider: pydantic-ai runs and SQLAlchemy statements.

    `configure_observability()` calls it; a program that configures logfire itself (`logfire.configure(...)`) calls
    it after that. pydantic-ai's spans carry no prompt, tool arguments or results, or model output
    (`include_content=False`): the ledger stores them, redacted. Engines made afterwards are instrumented too.
    """
    import logfire
    from sqlalchemy import Engine, event
    from sqlalchemy.pool import Pool

    from agentrt.db.engine import current_engine

    logfire.instrument_pydantic_ai(include_content=False)
    # The OpenTelemetry instrumentation declares SQLAlchemy < 2.1 (its range was not widened yet); the events it
    # uses are unchanged in 2.1 (tests/agents/test_observability.py checks the spans).
    logfire.instrument_sqlalchemy(engine=current_engine(), skip_dep_check=True)
    if not event.contains(Pool, 'checkout', _note_backend_pid):
        event.listen(Pool, 'checkout', _note_backend_pid)
    if not event.contains(Engine, 'handle_error', _redacted_statement_error):
        # First (class-level listeners run before an engine's own): the instrumentation's would set the raw text.
        event.listen(Engine, 'handle_error', _redacted_statement_error, insert=True)


def uninstrument_runtime() -> None:
    """Undo `instrument_runtime()`.

    For tests: the runtime never calls it (a program of your own that turns tracing off may)."""
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from pydantic_ai import Agent
    from sqlalchemy import Engine, event
    from sqlalchemy.pool import Pool

    Agent.instrument_all(False)
    SQLAlchemyInstrumentor().uninstrument()
    if event.contains(Pool, 'checkout', _note_backend_pid):
        event.remove(Pool, 'checkout', _note_backend_pid)
    if event.contains(Engine, 'handle_error', _redacted_statement_error):
        event.remove(Engine, 'handle_error', _redacted_statement_error)


def _note_backend_pid(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Name the server process on the span of a connection checkout, so separate sessions show as such."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    get_pid = getattr(getattr(dbapi_connection, 'driver_connection', None), 'get_server_pid', None)
    if get_pid is not None:
        span.set_attribute(BACKEND_PID_ATTRIBUTE, get_pid())


def _redacted_statement_error(context: Any) -> None:
    """End a failed statement's span with its error redacted, as every error on the runtime's spans is.

    The SQLAlchemy instrumentation sets the status to the driver's text as it is (`str(original_exception)`), which
    quotes the value a statement refused (`invalid input syntax for type integer: "sk-..."`, asyncpg's `invalid input
    for query argument $1: '...'`). Its span (`_otel_span` on the execution context, a session's or a driver
    statement's) is ended here and taken off the context, so the instrumentation's listener, after this one, finds
    none to write on.
    """
    execution = context.execution_context
    span = getattr(execution, '_otel_span', None)
    if span is None:
        return
    if span.is_recording():
        span.set_status(trace.Status(trace.StatusCode.ERROR, exported_text(str(context.original_exception))))
    span.end()
    execution._otel_span = None


@contextmanager
def turn_span(*, session_id: str, account: str, agent_instance: str | None, streamed: bool) -> Iterator[None]:
    """A span around one chat turn, so its database work before and after the agent run joins the run's trace.

    Without a tracer provider it is not even made (the span would be a no-op).
    """
    span = start_turn_span(session_id=session_id, account=account, agent_instance=agent_instance, streamed=streamed)
    try:
        with within_turn_span(span):
            yield
    finally:
        if span is not None:
            span.end()


def start_turn_span(*, session_id: str, account: str, agent_instance: str | None, streamed: bool) -> trace.Span | None:
    """Start a turn's span (`turn_span`) for a turn that runs in several parts (an HTTP turn: opened by the route,
    run by the response): enter each part `within_turn_span()`, then end it. None without a tracer provider."""
    if not tracing_active():
        return None
    attributes: dict[str, str | bool] = {
        # Not `agentrt.session_id`: logfire's scrubber replaces the value of any attribute whose name holds
        # `session` ("[Scrubbed due to 'session']"); this is the name pydantic-ai's spans of the run use too.
        'gen_ai.conversation.id': session_id,
        'agentrt.account': account,
        'agentrt.agent_instance': agent_instance or '',
        'agentrt.streamed': streamed,
    }
    return _tracer.start_span('chat turn', attributes=attributes, record_exception=False, set_status_on_exception=False)


def name_turn_agent(slug: str) -> None:
    """Set the current turn span's `agentrt.agent_instance` to the agent the turn resolved: the caller's argument is
    empty for the account's default agent, which the ledger's rows name (QA)."""
    span = trace.get_current_span()
    if span.is_recording() and getattr(span, 'name', None) == 'chat turn':
        span.set_attribute('agentrt.agent_instance', slug)


@contextmanager
def within_turn_span(span: trace.Span | None) -> Iterator[None]:
    """Run a block in `span` (current: what the block does joins it), recording an exception leaving the block,
    redacted: OpenTelemetry's own recording (`record_exception`) writes the whole traceback as it is, the provider's or
    driver's raw text chained under the documented error included. The span is not ended here."""
    if span is None:
        yield
        return
    with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            _record_cancelled(span)
            raise
        except BaseException as exc:
            record_redacted(span, exc)
            raise


CANCELLED_STATUS = 'cancelled: the turn was stopped before its end; nothing of it was saved'
"""A cancelled turn's span status: a hang-up, Ctrl-C or a task cancelled (`CancelledError`, whose text is empty: the
status read "CancelledError: "), or a stream its caller closed early (`GeneratorExit`: no status at all)."""


def _record_cancelled(span: trace.Span) -> None:
    # No `exception` event: where the cancellation reached the turn is no error of the code; the ledger's row of the
    # request it cut off says `cancelled` too.
    span.set_attribute('agentrt.cancelled', True)
    span.set_status(trace.Status(trace.StatusCode.ERROR, CANCELLED_STATUS))
