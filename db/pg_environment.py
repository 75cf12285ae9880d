"""The `PG*` environment variables asyncpg (the runtime's connections) and libpq (the job queue's) read for each
setting a URL does not name: ignored by the embedded server's connections, checked at start for an external URL.

The embedded server is reached on a Unix socket of its own, so a `PGSSLNEGOTIATION=direct`, `PGGSSENCMODE=require`
or `PGTARGETSESSIONATTRS=standby` in the environment is meant for another server; its URLs name each such setting
(`EMBEDDED_PARAMETERS` for asyncpg, `embedded_libpq_parameters` for libpq), so neither driver reads the variable. For
an external `DATABASE_URL` the variables apply, as they do to psql: a value either driver would refuse at the first
connection, or one asyncpg cannot honour while the queue's libpq would, is refused at start naming the variable (as
the URL's parameter is), not "cannot connect" (exit 3).

Not covered: `PGSERVICE` (libpq reads it whatever the URL names) and `PGTZ`, `PGDATESTYLE` and `PGGEQO` (sent by
libpq as server settings; PostgreSQL judges them). The two settings psycopg needs are set on each of the queue's
connections when the server reports another (`services/jobs/_app.py`'s `QueueConnection`: `DateStyle` ISO,
`client_encoding` UTF8).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection

from agentrt.db.errors import ConfigError

SSL_MODES = ('disable', 'allow', 'prefer', 'require', 'verify-ca', 'verify-full')
TARGET_SESSION_ATTRS = ('any', 'primary', 'standby', 'prefer-standby', 'read-write', 'read-only')
TLS_VERSIONS = ('TLSv1', 'TLSv1.1', 'TLSv1.2', 'TLSv1.3')
SSL_NEGOTIATIONS = ('postgres', 'direct')
GSS_LIBS = ('gssapi', 'sspi')

# The embedded server's asyncpg URL (`EmbeddedServer.url`): every setting asyncpg reads from the environment that
# can stop a connection to its socket (the certificate files are read only with TLS). The TLS versions are unused
# without TLS, named so that `check_asyncpg_environment` leaves their variables alone.
EMBEDDED_PARAMETERS = {
    'sslmode': 'disable',  # a PGSSLMODE=verify-full looked for a root certificate (qa174)
    'sslnegotiation': 'postgres',  # PGSSLNEGOTIATION=direct: "direct TLS requires sslmode=require..." (QA)
    'target_session_attrs': 'any',  # PGTARGETSESSIONATTRS=standby: "none of its hosts is what ... asks for" (QA)
    'gsslib': 'gssapi',  # asyncpg refuses a PGGSSLIB other than gssapi or sspi before connecting
    'ssl_min_protocol_version': 'TLSv1.2',
    'ssl_max_protocol_version': 'TLSv1.3',
}

# The job queue's libpq on the embedded server: each setting libpq reads from the environment that can stop a
# connection to its socket, with its value here and the libpq version that has it (an older libpq refuses the
# parameter as unknown, and reads no such variable). An empty value is the setting off, the variable unread.
_EMBEDDED_LIBPQ: tuple[tuple[str, str, int], ...] = (
    ('sslmode', 'disable', 0),
    ('sslrootcert', '', 0),  # PGSSLROOTCERT=system refused every mode but verify-full (QA)
    ('gssencmode', 'disable', 0),  # PGGSSENCMODE=require: "not supported over a local socket" (QA)
    ('channel_binding', 'disable', 0),  # PGCHANNELBINDING=require: the socket's trust login has none (QA)
    ('target_session_attrs', 'any', 0),
    ('ssl_min_protocol_version', 'TLSv1.2', 0),  # checked even without TLS: PGSSLMINPROTOCOLVERSION=TLSv9 (QA)
    ('ssl_max_protocol_version', '', 0),
    ('hostaddr', '', 0),  # PGHOSTADDR is used instead of the socket
    ('requirepeer', '', 0),  # PGREQUIREPEER names another user than the server's
    ('options', '', 0),  # PGOPTIONS: server settings meant for another server
    ('client_encoding', 'UTF8', 0),  # PGCLIENTENCODING: one PostgreSQL may refuse
    ('sslnegotiation', 'postgres', 170000),
    ('require_auth', '', 160000),  # PGREQUIREAUTH=scram-sha-256: the socket's trust login has none
    ('sslcertmode', 'disable', 160000),
    ('load_balance_hosts', 'disable', 160000),
    ('min_protocol_version', '3.0', 180000),
    ('max_protocol_version', '3.0', 180000),
)


# The server settings libpq (the job queue's) sends from these variables, whatever the URL names (no parameter stands
# for them): a value the server refuses is the variable's to correct, not the URL's `options` (`setting_variable`).
# asyncpg reads none of them.
LIBPQ_SERVER_SETTINGS = {'PGTZ': 'TimeZone', 'PGDATESTYLE': 'DateStyle', 'PGGEQO': 'geqo'}


# What the embedded server's own programs (initdb, pg_ctl and the postgres they start) must not read from the
# environment: PostgreSQL takes PGPORT, PGDATESTYLE and PGCLIENTENCODING as its own settings at start (its defaults
# for sessions, meant here for a client of another server), so PGDATESTYLE=Bogus failed initdb and the server's start
# ("invalid value for parameter \"DateStyle\"", exit 4: start afresh in another directory, though nothing was wrong
# with it); the others are libpq's session settings, for any libpq client the start runs. The runtime's connections
# to the embedded server ignore them or check them as they connect (`setting_variable`).
SERVER_START_UNSET = ('PGPORT', 'PGDATESTYLE', 'PGCLIENTENCODING', 'PGTZ', 'PGGEQO', 'PGOPTIONS')


def server_start_environment() -> dict[str, str]:
    """The environment the embedded server's programs run with: this process's, without `SERVER_START_UNSET`."""
    return {name: value for name, value in os.environ.items() if name not in SERVER_START_UNSET}


def setting_variable(parameter: str) -> tuple[str, str] | None:
    """The variable libpq sent the server setting `parameter` from, and its value, when it is set (libpq sends none
    that is unset or `default`, but one that is empty: `PGTZ=` was blamed on the URL's options parameter); else None.

    Args:
        parameter: the server setting's name, as PostgreSQL's message spells it (in any case).
    """
    for variable, setting in LIBPQ_SERVER_SETTINGS.items():
        value = os.environ.get(variable)
        if setting.lower() == parameter.lower() and value is not None and value.lower() != 'default':
            return variable, value
    return None


def embedded_libpq_parameters(libpq_version: int, connect_timeout: float) -> dict[str, str]:
    """The parameters of the job queue's URL to the embedded server, for a libpq of `libpq_version` (as
    `psycopg.pq.version()` gives it): every setting libpq would otherwise take from the environment, and the
    `connect_timeout` of `DB_CONNECT_TIMEOUT` (`PGCONNECT_TIMEOUT=abc` failed every connection: QA)."""
    parameters = {name: value for name, value, since in _EMBEDDED_LIBPQ if libpq_version >= since}
    parameters['connect_timeout'] = str(max(2, math.ceil(connect_timeout)))  # libpq's least: 2 seconds
    return parameters


# What asyncpg reads from the environment when the URL names no such parameter, and the values it takes (libpq, the
# queue's, refuses the others too).
_ASYNCPG_READS = {
    'PGSSLNEGOTIATION': ('sslnegotiation', SSL_NEGOTIATIONS),
    'PGTARGETSESSIONATTRS': ('target_session_attrs', TARGET_SESSION_ATTRS),
    'PGSSLMINPROTOCOLVERSION': ('ssl_min_protocol_version', ('', *TLS_VERSIONS)),
    'PGSSLMAXPROTOCOLVERSION': ('ssl_max_protocol_version', ('', *TLS_VERSIONS)),
    'PGGSSLIB': ('gsslib', GSS_LIBS),
}


def check_asyncpg_environment(named: Collection[str], ssl_mode: str | None) -> None:
    """Refuse at start a value asyncpg (or libpq) would refuse at the first connection, of a variable read because
    the URL names no such parameter (`named`: the URL's parameters).

    Args:
        named: the parameters the URL names (its `ssl` counts as `sslmode`).
        ssl_mode: the SSL mode the connections use (the URL's or `PGSSLMODE`), None for the drivers' default.

    Raises:
        ConfigError: naming the variable and the values it takes.
    """
    for variable, (parameter, allowed) in _ASYNCPG_READS.items():
        value = os.environ.get(variable)
        if value is None or parameter in named:
            continue
        if value not in allowed:
            shown = ', '.join(a for a in allowed if a) + (' or empty' if '' in allowed else '')
            raise ConfigError(
                f'{variable} (read for the {parameter} the database URL does not name) must be one of {shown}; '
                f'got {value!r}'
            )
    if (
        'sslnegotiation' not in named
        and os.environ.get('PGSSLNEGOTIATION') == 'direct'
        and ssl_mode not in ('require', 'verify-ca', 'verify-full')
    ):
        raise ConfigError(
            f'PGSSLNEGOTIATION=direct needs sslmode=require, verify-ca or verify-full (asyncpg and libpq refuse it '
            f'without); got sslmode={ssl_mode or "prefer"}'
        )


# What libpq (the job queue's) reads from the environment and asyncpg does not: a value libpq refuses, or one it
# would honour where the runtime's connections cannot (as the URL's parameter is refused: README).
_LIBPQ_READS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    # variable: (parameter, the values libpq takes, those refused as asyncpg cannot honour them)
    'PGGSSENCMODE': ('gssencmode', ('disable', 'prefer', 'require'), ('require',)),
    'PGCHANNELBINDING': ('channel_binding', ('disable', 'prefer', 'require'), ('require',)),
    'PGSSLCERTMODE': ('sslcertmode', ('disable', 'allow', 'require'), ()),
    'PGLOADBALANCEHOSTS': ('load_balance_hosts', ('disable', 'random'), ()),
}
# Set at all, they restrict how the queue's libpq may log in, which the runtime's asyncpg does not do.
_LIBPQ_ONLY = {
    'PGREQUIREAUTH': 'require_auth',
    'PGREQUIREPEER': 'requirepeer',
}


def check_libpq_environment(named: Collection[str]) -> None:
    """Refuse at start a variable the job queue's libpq reads (the URL naming no such parameter) with a value libpq
    refuses at its first connection, or one that the runtime's asyncpg would ignore while libpq honours it
    (`PGGSSENCMODE=require`, `PGCHANNELBINDING=require`, `PGREQUIREAUTH`: the two drivers would not connect alike,
    the queue's failing alone, post-turn jobs dropped).

    Args:
        named: the parameters the URL names.

    Raises:
        ConfigError: naming the variable.
    """
    for variable, (parameter, allowed, refused) in _LIBPQ_READS.items():
        value = os.environ.get(variable)
        if value is None or parameter in named:
            continue
        if value not in allowed:
            raise ConfigError(f'{variable} must be one of {", ".join(allowed)}; got {value!r}')
        if value in refused:
            raise ConfigError(
                f"{variable}={value} is not supported: the runtime's connections (asyncpg) cannot honour it, only "
                f"the job queue's (libpq) would; unset it (as the URL's {parameter} parameter is refused)"
            )
    for variable, parameter in _LIBPQ_ONLY.items():
        if os.environ.get(variable) and parameter not in named:
            raise ConfigError(
                f"{variable} is not supported: the runtime's connections (asyncpg) cannot honour it, only the job "
                "queue's (libpq) would; unset it"
            )
    timeout = os.environ.get('PGCONNECT_TIMEOUT')
    if timeout is not None and 'connect_timeout' not in named and not _is_integer(timeout):
        raise ConfigError(
            f"PGCONNECT_TIMEOUT must be a whole number of seconds (libpq, the job queue's, refuses {timeout!r}); "
            'or give connect_timeout in the URL'
        )


def _is_integer(value: str) -> bool:
    try:
        int(value.strip())
    except ValueError:
        return False
    return True
