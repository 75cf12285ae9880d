"""The standard `OTEL_*` variables the runtime's tracing reads, checked: what logfire cannot do is refused at start.

logfire (the runtime's OpenTelemetry set-up) exports over OTLP/HTTP only, and only when `OTEL_TRACES_EXPORTER` is
unset or `otlp`. A value it cannot honour was silently ignored: `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` sent HTTP to a gRPC
port (the one warning line then showed an HTTP error), `OTEL_TRACES_EXPORTER=zipkin` turned tracing off, a malformed
`OTEL_EXPORTER_OTLP_HEADERS` entry was dropped with a warning that took the place of the one export-failure line. Each
is a `ConfigError` now, as an invalid `AGENTRT_*` setting is: one line naming the variable and what is supported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from agentrt.db.errors import ConfigError

SUPPORTED_EXPORTERS = ('otlp', 'none')
"""`OTEL_TRACES_EXPORTER` values: `otlp` (the default, when an endpoint is set) or `none` (no export)."""
HTTP_PROTOCOLS = ('http/protobuf', 'http/json')
"""OTLP/HTTP: logfire sends protobuf, which every OTLP/HTTP receiver takes (the specification requires both)."""
SIGNALS = ('', 'TRACES_', 'METRICS_', 'LOGS_')
"""logfire exports spans, metrics and logs to the OTLP endpoint: each signal's own variable, then the general one."""

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
        name = f'OTEL_EXPORTER_OTLP_{signal}HEADERS'
        problem = _header_problem(env.get(name, ''))
        if problem:
            raise ConfigError(
                f'{name}: {problem}; give comma-separated name=value pairs, values URL-encoded '
                "(e.g. 'authorization=Bearer%20TOKEN,x-team=a')"
            )


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


def _shown(value: str) -> str:
    """A value as quoted in a message: short, on one line."""
    text = ' '.join(value.split())
    return repr(text if len(text) <= 40 else f'{text[:40]}...')
