"""The standard `OTEL_*` variables the runtime's tracing reads, checked: what logfire cannot do is refused at start.

logfire (the runtime's OpenTelemetry set-up) exports over OTLP/HTTP only, and only when `OTEL_TRACES_EXPORTER` is
unset or `otlp`. A value it cannot honour was silently ignored: `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` sent HTTP to a gRPC
port (the one warning line then showed an HTTP error), `OTEL_TRACES_EXPORTER=zipkin` turned tracing off, a malformed
`OTEL_EXPORTER_OTLP_HEADERS` entry was dropped with a warning that took the place of the one export-failure line. Each
is a `ConfigError` now, as an invalid `AGENTRT_*` setting is: one line naming the variable and what is supported.

The SDK's own variables are checked too, for the same reason: a value it cannot read was a warning that took the place
of the one export-failure line (an endpoint without `http://`, a timeout that is not a number, an unknown sampler or
compression), an internal error with a traceback (`OTEL_BSP_MAX_QUEUE_SIZE=0`, `OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT=abc`,
an unknown `OTEL_PROPAGATORS` name: read when OpenTelemetry's propagation is imported, which FastAPI and pydantic-ai do
whether tracing is on or not, and `OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT` too, read as the SDK's tracing is imported), or a
command that never ended (a malformed `OTEL_RESOURCE_ATTRIBUTES` entry, a trailing comma included: the SDK warned from
a thread while the main thread held the import lock the CLI's log filter waited for).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from agentrt.db.errors import ConfigError
from agentrt.db.flags import shown_value as _shown

SUPPORTED_EXPORTERS = ('otlp', 'none')
"""`OTEL_TRACES_EXPORTER` values: `otlp` (the default, when an endpoint is set) or `none` (no export)."""
HTTP_PROTOCOLS = ('http/protobuf', 'http/json')
"""OTLP/HTTP: logfire sends protobuf, which every OTLP/HTTP receiver takes (the specification requires both)."""
SIGNALS = ('', 'TRACES_', 'METRICS_', 'LOGS_')
"""logfire exports spans, metrics and logs to the OTLP endpoint: each signal's own variable, then the general one."""
COMPRESSIONS = ('gzip', 'deflate', 'none')
MAX_EXPORT_TIMEOUT = 300.0
"""The longest `OTEL_EXPORTER_OTLP_TIMEOUT` taken, in seconds: the Python SDK reads seconds where the specification
says milliseconds, so `10000` (meant as 10 s) let a command's end wait almost three hours for a collector."""
SAMPLERS = (
    'always_on',
    'always_off',
    'traceidratio',
    'parentbased_always_on',
    'parentbased_always_off',
    'parentbased_traceidratio',
)
SAMPLE_RATE_VARIABLES = ('LOGFIRE_TRACE_SAMPLE_RATE', 'OTEL_TRACES_SAMPLER_ARG')
"""Where logfire reads its sampling ratio (its `trace_sample_rate`): the first of them set, whatever the sampler and
whether spans are made or not; a value it cannot read as a number ended the command with its own words about a
`LOGFIRE_*` variable, even for `OTEL_TRACES_SAMPLER_ARG=abc` (QA), and one below 0 an internal error when spans are
made (the SDK's ValueError). The OpenTelemetry specification takes a number from 0 to 1."""
BATCH_VARIABLES = ('OTEL_BSP_', 'OTEL_BLRP_')
"""The span and log record batch processors' variables (`SCHEDULE_DELAY`, `MAX_QUEUE_SIZE`, ... as integers)."""
_BATCH_DEFAULTS = {
    'SCHEDULE_DELAY': 5000,
    'EXPORT_TIMEOUT': 30000,
    'MAX_QUEUE_SIZE': 2048,
    'MAX_EXPORT_BATCH_SIZE': 512,
}
IMPORT_LIMIT = 'OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT'
"""The one limit read as `opentelemetry.sdk.trace` is imported (which pydantic-ai does through logfire), tracing on or
off: a value it cannot read failed that import."""
LIMIT_VARIABLES = (
    'OTEL_ATTRIBUTE_COUNT_LIMIT',
    'OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT',
    'OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT',
    'OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT',
    'OTEL_SPAN_EVENT_COUNT_LIMIT',
    'OTEL_SPAN_LINK_COUNT_LIMIT',
    'OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT',
    'OTEL_LINK_ATTRIBUTE_COUNT_LIMIT',
    'OTEL_LOGRECORD_ATTRIBUTE_COUNT_LIMIT',
    'OTEL_LOGRECORD_ATTRIBUTE_VALUE_LENGTH_LIMIT',
)
"""The span and log record limits the SDK reads when its providers are made (`SpanLimits`, `LogRecordLimits`): a
whole number of at least 0, or empty for no limit; anything else was a ValueError, an internal error (QA)."""

# What OpenTelemetry's parser accepts (opentelemetry.util.re, liberal mode): `name=value` pairs separated by commas,
# a value of printable ASCII without `"`, `,`, `;` or `\`; an entry that does not match is dropped with a warning.
_KEY = r'[\x21\x23-\x27\x2a\x2b\x2d\x2e\x30-\x39\x41-\x5a\x5e-\x7a\x7c\x7e]+'
_HEADER = re.compile(rf'[ \t]*{_KEY}[ \t]*=[ \t]*[\x20\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*[ \t]*')
_NAME = re.compile(rf'[ \t]*({_KEY})[ \t]*[=:]')
_DELIMITER = re.compile(r'[ \t]*,[ \t]*')


def check_otlp_settings(env: Mapping[str, str]) -> None:
    """Refuse the `OTEL_*` values the runtime's tracing cannot honour.

    Args:
        env: the environment the exporters will read.

    Raises:
        ConfigError: naming the variable, and what is supported.
    """
    _check_propagators(env.get('OTEL_PROPAGATORS', ''))
    _check_limit(IMPORT_LIMIT, env)
    check_sample_rate(env)
    exporter = env.get('OTEL_TRACES_EXPORTER', '').strip().lower()
    if exporter not in ('', *SUPPORTED_EXPORTERS):
        console = " (for spans on stderr: LOGFIRE_CONSOLE=true or 'agentrt --trace')" if 'console' in exporter else ''
        raise ConfigError(
            f'OTEL_TRACES_EXPORTER={_shown(exporter)} is not supported: agentrt exports spans over OTLP/HTTP only; '
            f"set it to 'otlp' (the default) or 'none' (no export){console}"
        )
    if exporter == 'none' or not (
        env.get('OTEL_EXPORTER_OTLP_ENDPOINT') or env.get('OTEL_EXPORTER_OTLP_TRACES_ENDPOINT')
    ):
        return
    for kind in ('METRICS', 'LOGS'):  # taken and ignored, their data going nowhere (QA)
        name = f'OTEL_{kind}_EXPORTER'
        value = env.get(name, '').strip().lower()
        if value not in ('', *SUPPORTED_EXPORTERS):
            raise ConfigError(
                f'{name}={_shown(value)} is not supported: agentrt exports {kind.lower()} over OTLP/HTTP beside its '
                "spans, or not at all; set it to 'otlp' (the default) or 'none'"
            )
    # A metrics or logs exporter turned off (`OTEL_METRICS_EXPORTER=none`) reads none of its own variables.
    signals = [signal for signal in SIGNALS if env.get(f'OTEL_{signal}EXPORTER', '').strip().lower() != 'none']
    for signal in signals:
        name = f'OTEL_EXPORTER_OTLP_{signal}PROTOCOL'
        protocol = env.get(name, '').strip().lower()
        if protocol and protocol not in HTTP_PROTOCOLS:
            raise ConfigError(
                f'{name}={_shown(protocol)} is not supported: agentrt exports over OTLP/HTTP only '
                f"('http/protobuf', to the collector's HTTP port, usually 4318); unset it or set 'http/protobuf'"
            )
    for signal in signals:
        _check_endpoint(f'OTEL_EXPORTER_OTLP_{signal}ENDPOINT', env.get(f'OTEL_EXPORTER_OTLP_{signal}ENDPOINT', ''))
        _check_timeout(f'OTEL_EXPORTER_OTLP_{signal}TIMEOUT', env.get(f'OTEL_EXPORTER_OTLP_{signal}TIMEOUT', ''))
        name = f'OTEL_EXPORTER_OTLP_{signal}COMPRESSION'
        compression = env.get(name, '').strip().lower()
        if compression and compression not in COMPRESSIONS:
            raise ConfigError(f'{name}={_shown(compression)} is not supported: use one of {", ".join(COMPRESSIONS)}')
    for signal in signals:
        name = f'OTEL_EXPORTER_OTLP_{signal}HEADERS'
        problem = _header_problem(env.get(name, ''))
        if problem:
            raise ConfigError(
                f'{name}: {problem}; give comma-separated name=value pairs, values URL-encoded '
                "(e.g. 'x-team=chat%20agents,x-region=eu'; a space is %20)"
            )


def check_sdk_settings(env: Mapping[str, str]) -> None:
    """Refuse the values of the OpenTelemetry SDK's own variables it cannot read, when spans are made at all.

    Args:
        env: the environment the SDK will read.

    Raises:
        ConfigError: naming the variable, and what it takes.
    """
    for prefix in BATCH_VARIABLES:
        sizes = {}
        for setting, default in _BATCH_DEFAULTS.items():
            name = f'{prefix}{setting}'
            value = _integer(name, env.get(name, ''), default, least=0 if setting == 'EXPORT_TIMEOUT' else 1)
            sizes[setting] = value
        if sizes['MAX_EXPORT_BATCH_SIZE'] > sizes['MAX_QUEUE_SIZE']:
            raise ConfigError(
                f'{prefix}MAX_EXPORT_BATCH_SIZE ({sizes["MAX_EXPORT_BATCH_SIZE"]}) is larger than '
                f'{prefix}MAX_QUEUE_SIZE ({sizes["MAX_QUEUE_SIZE"]}): a batch is taken from the queue; '
                'make it at most that'
            )
    for name in ('OTEL_METRIC_EXPORT_INTERVAL', 'OTEL_METRIC_EXPORT_TIMEOUT'):
        _integer(name, env.get(name, ''), 0, least=1)
    for name in LIMIT_VARIABLES:
        _check_limit(name, env)
    sampler = env.get('OTEL_TRACES_SAMPLER', '').strip().lower()
    if sampler and sampler not in SAMPLERS:
        raise ConfigError(f'OTEL_TRACES_SAMPLER={_shown(sampler)} is not a sampler: use one of {", ".join(SAMPLERS)}')
    ratio = env.get('OTEL_TRACES_SAMPLER_ARG', '').strip()
    if sampler.endswith('traceidratio') and ratio and not (_number(ratio) is not None and 0 <= float(ratio) <= 1):
        raise ConfigError(f'OTEL_TRACES_SAMPLER_ARG={_shown(ratio)} is not a ratio: give a number from 0 to 1')
    attributes = env.get('OTEL_RESOURCE_ATTRIBUTES', '')
    if attributes:
        entries = attributes.split(',')
        for index, entry in enumerate(entries, start=1):
            if '=' not in entry or not entry.partition('=')[0].strip():
                what = 'empty (a comma too many)' if not entry.strip() else 'not key=value'
                raise ConfigError(
                    f'OTEL_RESOURCE_ATTRIBUTES: entry {index} of {len(entries)} is {what}; give comma-separated '
                    "key=value pairs, values URL-encoded (e.g. 'deployment.environment=prod,team=search')"
                )


def check_sample_rate(env: Mapping[str, str]) -> None:
    """Refuse the sampling ratio logfire reads (`SAMPLE_RATE_VARIABLES`: as it does, an empty value is unset) unless it
    is a number from 0 to 1. Each CLI command checks it first (`agentrt`'s callback): logfire reads it as it is
    imported, which `agentrt serve` did before its tracing's own check, and said it in logfire's words.

    Args:
        env: the environment (`os.environ`).

    Raises:
        ConfigError: naming the variable.
    """
    name = next((name for name in SAMPLE_RATE_VARIABLES if env.get(name)), None)
    if name is None:
        return
    value = env[name]
    ratio = _number(value)
    if ratio is None or not 0 <= ratio <= 1:
        raise ConfigError(
            f'{name}={_shown(value)} is not a sampling ratio: give a number from 0 to 1 (the share of traces kept)'
        )


def _check_propagators(value: str) -> None:
    """An `OTEL_PROPAGATORS` name OpenTelemetry does not know fails its import (a ValueError, a traceback)."""
    if not value.strip():
        return
    from importlib.metadata import entry_points

    known = set(entry_points(group='opentelemetry_propagator').names)
    for name in (part.strip() for part in value.split(',')):
        if name.lower() == 'none':
            return  # as OpenTelemetry reads it: no propagation, whatever follows
        if name not in known:
            raise ConfigError(
                f'OTEL_PROPAGATORS: {_shown(name) if name else "an empty name (a comma too many)"} is not a propagator '
                f'installed here; use {", ".join(sorted(known))} or none (comma-separated), or install its package'
            )


def _check_endpoint(name: str, value: str) -> None:
    if not value:
        return
    try:
        parts = urlsplit(value.strip())
        usable = parts.scheme in ('http', 'https') and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # a port that is not a number, a bracket not closed
        usable = False
    if not usable:
        shown = re.sub(r'//[^/@]*@', '//***@', value)  # a password in it not quoted
        raise ConfigError(
            f'{name}={_shown(shown)} is not an http:// or https:// URL with a host '
            "(e.g. 'http://localhost:4318', the collector's OTLP/HTTP port)"
        )


def _check_timeout(name: str, value: str) -> None:
    if not value.strip():
        return
    seconds = _number(value)
    if seconds is None or not 0 < seconds <= MAX_EXPORT_TIMEOUT:
        raise ConfigError(
            f'{name}={_shown(value)} is not a timeout: give seconds, more than 0 and at most {MAX_EXPORT_TIMEOUT:g} '
            '(the Python SDK reads seconds, not milliseconds)'
        )


def _check_limit(name: str, env: Mapping[str, str]) -> None:
    """A limit as the SDK reads it (`SpanLimits._from_env_if_absent`): empty is none, else an `int()` of at least 0."""
    value = env.get(name, '').strip()
    if not value:
        return
    try:
        usable = int(value) >= 0
    except ValueError:
        usable = False
    if not usable:
        raise ConfigError(f'{name}={_shown(value)} is not a limit: give a whole number of at least 0 (empty: none)')


def _integer(name: str, value: str, default: int, *, least: int) -> int:
    if not value.strip():
        return default
    try:
        number = int(value.strip())
    except ValueError:
        number = least - 1
    if number < least:
        raise ConfigError(f'{name}={_shown(value)} is not a whole number of at least {least}')
    return number


def _number(value: str) -> float | None:
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _header_problem(value: str) -> str | None:
    """What makes `value` (a headers variable) lose an entry, never quoting a value (it is usually a secret)."""
    entries = [entry for entry in _DELIMITER.split(value) if entry]
    for index, entry in enumerate(entries, start=1):
        if _HEADER.fullmatch(entry.strip()):
            continue
        named = _NAME.match(entry)
        which = f'the header {named.group(1)!r}' if named else f'entry {index} of {len(entries)}'
        return (
            f'{which} is malformed and would be dropped, not sent: not name=value, or its value holds a character '
            'to URL-encode (a quote, comma, semicolon, backslash or non-ASCII character)'
        )
    return None
