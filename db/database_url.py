"""`DATABASE_URL`: checked, and its libpq parameters (`?sslmode=require&...`) turned into asyncpg connect arguments.

Hosted PostgreSQL services hand out libpq URLs. SQLAlchemy passes every query parameter to `asyncpg.connect()` as a
keyword, which fails on libpq's names (`sslmode` is a `TypeError` there), so the parameters are mapped here, each
checked when the settings are read, and anything asyncpg cannot honour is refused with its name.
"""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlencode

from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from agentrt.db.errors import ConfigError
from agentrt.db.pg_environment import (
    GSS_LIBS,
    SSL_MODES,
    SSL_NEGOTIATIONS,
    TARGET_SESSION_ATTRS,
    TLS_VERSIONS,
    check_asyncpg_environment,
    check_libpq_environment,
)

_POSTGRES_DRIVERS = {'postgresql', 'postgres', 'postgresql+asyncpg'}
# Placeholders in angle brackets: `user:pass@` reads as a password in a URL, and every error line shown is redacted.
_EXAMPLE = 'expected postgresql://<user>:<password>@<host>:5432/<database>'

# libpq parameters asyncpg reads from a DSN of its own (the SSL files are checked to exist).
_DSN_PARAMETERS = {
    'sslmode': SSL_MODES,
    'sslrootcert': None,
    'sslcert': None,
    'sslkey': None,
    'sslcrl': None,
    'sslpassword': None,
    'sslnegotiation': SSL_NEGOTIATIONS,
    'ssl_min_protocol_version': TLS_VERSIONS,
    'ssl_max_protocol_version': TLS_VERSIONS,
    'passfile': None,
    'krbsrvname': None,
    'gsslib': GSS_LIBS,
}
_FILES = ('sslrootcert', 'sslcert', 'sslkey', 'sslcrl', 'passfile')
# Sent to the server as startup parameters, as libpq does.
_SERVER_SETTINGS = ('application_name', 'options')
# Kept in the URL for SQLAlchemy and its asyncpg dialect.
_URL_PARAMETERS = ('host', 'port', 'prepared_statement_cache_size')
# The most statements a connection keeps prepared (SQLAlchemy's default: 100): each holds memory on the server.
_MAX_CACHE_SIZE = 1_000_000
# Refused with advice: what they would do in libpq is not something asyncpg can do.
_REFUSED = {
    'pgbouncer': 'behind PgBouncer set DB_POOLER=pgbouncer instead',
    'channel_binding': 'asyncpg does not support channel binding; remove it (SCRAM authentication still works)',
    'gssencmode': 'asyncpg does not support GSSAPI encryption; remove it and use sslmode',
    'keepalives': 'asyncpg has no TCP keepalive settings; remove it',
    'keepalives_idle': 'asyncpg has no TCP keepalive settings; remove it',
    'keepalives_interval': 'asyncpg has no TCP keepalive settings; remove it',
    'keepalives_count': 'asyncpg has no TCP keepalive settings; remove it',
    'user': 'put the user name in the URL: postgresql://<user>:<password>@<host>/<database>',
    'password': 'put the password in the URL: postgresql://<user>:<password>@<host>/<database>',
    'dbname': 'put the database name in the URL path: postgresql://<user>:<password>@<host>/<database>',
}
# Parameters holding a secret, shown as `***` with the password: the client key's password (`password=` is refused
# by `asyncpg_connect_args`, but a URL shown may not have been parsed).
_SECRET_PARAMETERS = ('sslpassword', 'password')
SUPPORTED_PARAMETERS = (*_DSN_PARAMETERS, 'ssl', 'connect_timeout', 'target_session_attrs', *_SERVER_SETTINGS)


def parse_database_url(value: str) -> URL:
    """Parse and check a PostgreSQL URL (with its query parameters), returning it with the asyncpg driver.

    Raises:
        ConfigError: naming `DATABASE_URL`, and the parameter, when something is wrong with it.
    """
    if ',' in _netloc(value.strip()):  # libpq's `postgresql://h1:5432,h2:5432/db`: one URL host of a list
        raise ConfigError(_HOST_LIST)
    for escaped in set(re.findall(r'(?:%[0-9A-Fa-f]{2})+', value)):
        try:
            unquote_to_bytes(escaped).decode('utf-8')
        except UnicodeDecodeError:
            # Decoded with U+FFFD in its place: a database `post\ufffdgres` that does not exist, a server option
            # refused as "invalid command-line argument" (QA).
            # Not shown: they may be a password's.
            raise ConfigError(
                'DATABASE_URL: a percent-escape in it stands for bytes that are not UTF-8 (such as %FF); '
                'escape the UTF-8 bytes of the text meant'
            ) from None
    try:
        url = make_url(value.strip())
    except (ArgumentError, ValueError) as exc:
        if '@' in str(exc):  # the port's `int()` of `app:p@ss:w0rd@db`: `w0rd@db`, the password's tail
            raise ConfigError(f'DATABASE_URL: its port is not a number (not shown); {_ENCODE}') from None
        raise ConfigError(f'DATABASE_URL is not a valid URL ({exc}); {_EXAMPLE}') from exc
    _check_sendable(url)
    if url.drivername not in _POSTGRES_DRIVERS:
        raise ConfigError(
            f'DATABASE_URL must use the postgresql:// (or postgresql+asyncpg://) scheme, got {url.drivername!r}'
        )
    if not url.database:
        raise ConfigError(f'DATABASE_URL names no database; {_EXAMPLE}')
    if '@' in url.database and value.split('?', 1)[0].count('@') > 1:
        # `app:p@ss/w0rd@db/agents`: the host `ss` and the database `w0rd@db/agents`, the password's tail, printed
        # with the host that could not be reached (qa170). A database name's own @ is written %40.
        raise ConfigError(
            'DATABASE_URL: its database name holds an @ that is not percent-encoded (the name is not shown: it may '
            f'hold part of the password); {_ENCODE}, and an @ in the database name as %40'
        )
    if not url.host and 'host' not in url.query:
        raise ConfigError(f'DATABASE_URL names no host; {_EXAMPLE}')
    _check_host(url.host)
    for host in _values(url.query.get('host')):
        if host.startswith('[') and ']:' in host:  # asyncpg took `[::1]:5432` for a host name: a DNS error
            raise ConfigError(
                f'DATABASE_URL: host parameter {host!r}: an IPv6 address with a port is not read there; give the '
                'address alone (host=::1) and the port as the port parameter'
            )
        if host.startswith('['):  # `[::1]` alone: asyncpg looked the brackets up as a name, the queue (libpq) did not
            raise ConfigError(
                f'DATABASE_URL: host parameter {host!r}: an IPv6 address goes there without brackets (host=::1)'
            )
        if host.count(':') == 1:  # `host=db1:5432`: SQLAlchemy's host and port
            # Never checked: port 0 was 5432, 84737 wrapped round to 19201 (another server's), silently (QA).
            port, what = host.rsplit(':', 1)[1], f'the port of host parameter {host!r}'
            if not (port.isascii() and port.isdigit()):  # ` 19239` and `+19239` became a DNS error (QA)
                raise ConfigError(f'DATABASE_URL: {what} must be a whole number from 1 to 65535')
            _check_port(int(port), what)
            if url.query.get('port'):
                raise ConfigError(
                    f'DATABASE_URL: host parameter {host!r} has a port, and so does the port parameter: give one'
                )
    for hosts in _values(url.query.get('host')):  # after the checks above, which say more of a port or brackets
        for host in hosts.split(','):  # libpq's list of hosts to try
            _check_host(host.strip(), parameter=True)
    _check_port(url.port, 'the port')
    for port in _values(url.query.get('port')):
        if ',' in port:  # libpq's list of ports, one a host
            raise ConfigError(_HOST_LIST)
        _check_port(_integer(port, 'port'), 'the port parameter')
    _check_cache_size(url)
    stripped, _ = asyncpg_connect_args(url)  # every parameter checked now, not at the first connection
    # The job queue's libpq reads variables asyncpg does not (never for the embedded server's URLs, which are not
    # parsed here and name each setting: `agentrt.db.pg_environment`).
    check_libpq_environment(_named(url))
    _check_host_list(stripped.set(drivername='postgresql+asyncpg'))
    return url.set(drivername='postgresql+asyncpg')


# A password (or user name) with these characters reads as another URL: SQLAlchemy ends the password at its first `@`.
_ENCODE = (
    'a password or user name holding @, :, /, ?, #, % or a space must be percent-encoded in the URL '
    '(@ as %40, : as %3A, / as %2F, ? as %3F, # as %23, % as %25, a space as %20)'
)
_HOST_LIST = (
    'DATABASE_URL: a list of hosts goes in host parameters, each with its port: '
    "postgresql://user:password@/database?host=db1:5432&host=db2:5432 (libpq's host1,host2 form is not read)"
)


def _check_sendable(url: URL) -> None:
    """Refuse a user, password, database name or parameter the connection cannot send: one holding a NUL (`%00`),
    or bytes that are not UTF-8 (a shell's `$'\\xff'`, read by Python as a lone surrogate). The first was refused by
    PostgreSQL as a malformed startup packet and the second failed in asyncpg's protocol, both reported as "cannot
    connect" (exit 3) with a raw asyncio error: a network problem to look for, where the URL was wrong (QA)."""
    parts = [('the user name', url.username), ('the password', url.password), ('the database name', url.database)]
    parts += [(f'parameter {name!r}', value) for name, raw in url.query.items() for value in _values(raw)]
    for what, value in parts:
        if not value:
            continue
        if '\x00' in value:
            raise ConfigError(f'DATABASE_URL: {what} holds a NUL character (%00)')
        try:
            value.encode('utf-8')
        except UnicodeEncodeError:
            raise ConfigError(f'DATABASE_URL: {what} holds bytes that are not UTF-8') from None


def _netloc(value: str) -> str:
    """The part of a URL between `//` and the path: its user, password, hosts and ports."""
    rest = value.split('://', 1)[1] if '://' in value else ''
    return rest.split('/', 1)[0].split('?', 1)[0].rsplit('@', 1)[-1]


def _check_host_list(url: URL) -> None:
    """Refuse now a list of hosts SQLAlchemy's asyncpg dialect cannot connect to (libpq's `host=a,b` with one port, or
    ports missing): its `ArgumentError` came at the first connection, an internal error (QA)."""
    try:
        PGDialect_asyncpg().create_connect_args(url)  # type: ignore[no-untyped-call]  # SQLAlchemy dialects are untyped
    except ArgumentError as exc:
        raise ConfigError(f'{_HOST_LIST}; as given: {exc}') from None
    except ValueError:  # SQLAlchemy's split of `::1` at its colons: "too many values to unpack" (qa127)
        raise ConfigError(f'{_HOST_LIST}; an IPv6 address cannot be one of several hosts there') from None


def _check_cache_size(url: URL) -> None:
    """Refuse a `prepared_statement_cache_size` the dialect cannot take: its `int()` failed in `_check_host_list`,
    reported as a wrong list of hosts, and given twice, an internal error. Out of range it is worse: SQLAlchemy's
    LRU cache with a negative size empties itself for ever on the event loop (every command hung at 100 % CPU, deaf
    to SIGTERM and Ctrl-C), and one past a float's range fails at the first statement (qa170)."""
    raw = url.query.get('prepared_statement_cache_size')
    if raw is None:
        return
    value = _single('prepared_statement_cache_size', raw)
    if not (value.isascii() and value.isdigit()) or len(value) > 12 or int(value) > _MAX_CACHE_SIZE:
        raise ConfigError(
            'DATABASE_URL parameter prepared_statement_cache_size must be a whole number from 0 (the cache off) to '
            f'{_MAX_CACHE_SIZE:,}, got {value!r}'
        )


def _check_host(host: str | None, *, parameter: bool = False) -> None:
    """A host name the resolver can take: one it cannot encode (a label over 63 characters) failed in the connect
    itself, as an `idna` `UnicodeError` no error class knows. A socket directory (`/...`) or an address is no name.

    A host holding a character no host name or address has is refused, the URL's own (not a `parameter`'s) without
    being shown: SQLAlchemy ends the password at its first `@`, so `app:p@ssw0rd@db` has the host `ssw0rd@db`, which
    was printed in "cannot connect to PostgreSQL at ssw0rd@db:5432/..." (a DNS failure, exit 3): the password's tail
    on the terminal and in the log (qa170).
    """
    if not host or host.startswith('/'):
        return
    if host[:3].upper() == '%2F' and not parameter:
        # libpq's socket directory in the URL's host (`postgresql://%2Frun%2Fpostgresql/db`), which SQLAlchemy does
        # not decode: it was refused with advice to encode the password (qa174).
        raise ConfigError(
            "DATABASE_URL: a Unix socket directory (%2F...) is not read as the URL's host; give it as a host "
            'parameter, postgresql://<user>:<password>@/<database>?host=/run/postgresql'
        )
    # ASCII letters, digits, `.`, `-` and `_` (a container's name); an IPv6 address's `:` and its zone's `%`. Other
    # characters, as an IDN's, are for the `idna` encoding below to judge.
    allowed = '.-_:%' if ':' in host else '.-_'
    odd = '@' if '@' in host else next((c for c in host if c.isascii() and not (c.isalnum() or c in allowed)), None)
    if odd is not None and parameter:
        raise ConfigError(f'DATABASE_URL: host parameter {host!r} holds {odd!r}, which no host name has')
    if odd is not None:
        raise ConfigError(
            f'DATABASE_URL: its host holds {odd!r}, which no host name has (the host is not shown: it may hold part '
            f'of the password); {_ENCODE}'
        )
    if '%' in host and not parameter:
        # An IPv6 zone (`[fe80::1%25eth0]`, or `%eth0`): SQLAlchemy does not decode the URL's host, so asyncpg looked
        # `fe80::1%25eth0` up as a name and libpq (the job queue) refused `%eth0`; a host parameter is decoded (qa174).
        raise ConfigError(
            "DATABASE_URL: an IPv6 address with a zone (%) is not read as the URL's host; give it as a host "
            'parameter, postgresql://<user>:<password>@/<database>?host=fe80::1%25eth0&port=5432'
        )
    if ':' in host:
        return
    try:
        host.encode('idna')
    except UnicodeError as exc:
        shown = host if len(host) <= 80 else f'{host[:60]}... ({len(host):,} characters)'
        raise ConfigError(f'DATABASE_URL: the host {shown!r} is not a valid host name ({exc}); {_EXAMPLE}') from None


def asyncpg_connect_args(url: URL) -> tuple[URL, dict[str, Any]]:
    """Split the URL's libpq parameters off into `asyncpg.connect()` arguments.

    Returns:
        The URL without them, and the connect arguments: `dsn` (asyncpg reads the SSL parameters, `passfile` and the
        Kerberos ones from a DSN of its own; host, user and database still come from the URL), `ssl`, `timeout`
        (from `connect_timeout`), `target_session_attrs` and `server_settings` (`application_name`, `options`).

    Raises:
        ConfigError: a parameter is unknown, refused, or has an invalid value; it is named.
    """
    args: dict[str, Any] = {}
    dsn: dict[str, str] = {}
    server_settings: dict[str, str] = {}
    for name, raw in url.query.items():
        if name in _URL_PARAMETERS:
            continue
        value = _single(name, raw)
        if '\x00' in value:  # asyncpg sent it in the startup packet, which PostgreSQL refused as malformed
            raise ConfigError(f'DATABASE_URL parameter {name!r} holds a NUL character (%00)')
        if name in _REFUSED:
            raise ConfigError(f'DATABASE_URL parameter {name!r} is not supported: {_REFUSED[name]}')
        if name in _DSN_PARAMETERS:
            dsn[name] = _checked(name, value, _DSN_PARAMETERS[name])
        elif name == 'ssl':  # SQLAlchemy's documented spelling for asyncpg: ?ssl=require
            args['ssl'] = _checked(name, {'true': 'require', 'false': 'disable'}.get(value.lower(), value), SSL_MODES)
        elif name == 'connect_timeout':
            timeout = _integer(value, name)
            if not 0 < timeout <= 600:
                raise ConfigError(f'DATABASE_URL parameter connect_timeout must be 1 to 600 seconds, got {value!r}')
            args['timeout'] = float(timeout)
        elif name == 'target_session_attrs':
            args['target_session_attrs'] = _checked(name, value, TARGET_SESSION_ATTRS)
        elif name in _SERVER_SETTINGS:
            server_settings[name] = value
        else:
            raise ConfigError(
                f'DATABASE_URL parameter {name!r} is not supported; supported: '
                f'{", ".join((*SUPPORTED_PARAMETERS, *_URL_PARAMETERS))}'
            )
    if 'ssl' in args and 'sslmode' in dsn:
        # asyncpg takes `ssl` over `sslmode`, where the start-up check read `sslmode`: `sslmode=verify-full&ssl=disable`
        # connected without TLS (QA); one spelling only.
        raise ConfigError("DATABASE_URL gives both sslmode and ssl (SQLAlchemy's spelling of it): give one")
    setting, mode = _ssl_mode(dsn, args)
    check_asyncpg_environment(_named(url), mode)
    _check_root_certificate(setting, mode, dsn)
    if dsn:
        args['dsn'] = 'postgresql://?' + urlencode(dsn)
    if server_settings:
        args['server_settings'] = server_settings
    kept = {name: raw for name, raw in url.query.items() if name in _URL_PARAMETERS}
    return url.set(query=kept), args


def _named(url: URL) -> set[str]:
    """The parameters `url` names (SQLAlchemy's `ssl` as libpq's `sslmode`), whose variables the drivers leave."""
    return {'sslmode' if name == 'ssl' else name for name in url.query}


def libpq_uri(url: URL, *, hide_password: bool = False) -> str:
    """`url` as libpq reads a URI (the job queue's psycopg connections): every part percent-encoded. SQLAlchemy's
    rendering writes a space in the query as `+` (a form's encoding), which libpq does not decode
    (`options=-c%20search_path%3Dapp` reached PostgreSQL as the parameter `+search_path`: the queue never connected),
    and one in the user, password or database as a space, which libpq refuses ("unexpected spaces found")."""
    where = URL.create('postgresql', host=url.host, port=url.port)  # (`URL.set` keeps a part given None)
    scheme, host_and_port = where.render_as_string(hide_password=False).split('://', 1)
    user = ''
    if url.username is not None:
        user = quote(url.username, safe='')
        if url.password is not None:
            user += ':' + ('***' if hide_password else quote(str(url.password), safe=''))
        user += '@'
    database = f'/{quote(url.database, safe="")}' if url.database else ''
    pairs = [
        _libpq_pair(key, '***' if hide_password and key in _SECRET_PARAMETERS else value)
        for key, values in url.query.items()
        if key not in ('prepared_statement_cache_size', 'host', 'port')
        for value in _values(values)
    ]
    pairs += _libpq_hosts(url)
    query = f'?{urlencode(pairs, quote_via=quote)}' if pairs else ''
    return _masks_unquoted(f'{scheme}://{user}{host_and_port}{database}{query}')


def _libpq_pair(key: str, value: str) -> tuple[str, str]:
    """A URL parameter as libpq reads it: SQLAlchemy's `ssl` (README's `ssl=true`) is libpq's `sslmode`, which it
    refused as an invalid URI parameter: the job queue never connected, and a turn's post-turn jobs were dropped as
    "database unavailable" (QA)."""
    if key == 'ssl':
        return 'sslmode', {'true': 'require', 'false': 'disable'}.get(value.lower(), value)
    return key, value


def _libpq_hosts(url: URL) -> list[tuple[str, str]]:
    """The `host` and `port` parameters of `url` as libpq reads them: README's (asyncpg's) `?host=db1:5432&host=
    db2:5432` became two `host` parameters, of which libpq kept the last and read `db2:5432` as a host name (the
    queue never connected: qa126); libpq's form is one `host` list and one `port` list, comma-separated."""
    hosts, ports = list(_values(url.query.get('host'))), list(_values(url.query.get('port')))
    if not hosts:
        return [('port', port) for port in ports]
    default = ports[0] if len(ports) == 1 else None
    names: list[str] = []
    numbers: list[str | None] = []
    for host in hosts:
        name, port = _split_port(host)
        names.append(name)
        numbers.append(port or default)
    if len(ports) > 1:  # libpq's own lists, given as they are
        return [('host', ','.join(names)), ('port', ','.join(ports))]
    if all(number is None for number in numbers):
        return [('host', ','.join(names))]
    return [('host', ','.join(names)), ('port', ','.join(number or '5432' for number in numbers))]


def _split_port(host: str) -> tuple[str, str | None]:
    """`db1:5432` as (`db1`, `5432`); a host without a port (`db1`, `::1`, a socket directory) as it is (a bracketed
    IPv6 address is refused by `parse_database_url`)."""
    name, colon, port = host.rpartition(':')
    if colon and port.isdigit() and ':' not in name:
        return name, port
    return host, None


def mask_url(url: URL | str) -> str:
    """Render a URL with any password replaced by `***`: the URL's, and a parameter's that holds one (`sslpassword`,
    the client key's, was printed in clear by `agentrt db status`: qa174)."""
    parsed = make_url(url) if isinstance(url, str) else url
    query = {name: ('***' if name in _SECRET_PARAMETERS else value) for name, value in parsed.query.items()}
    return _masks_unquoted(parsed.set(query=query).render_as_string(hide_password=True))


def _masks_unquoted(text: str) -> str:
    """`sslpassword=***` as it was masked, not percent-encoded (`%2A%2A%2A`) by the URL's rendering."""
    for name in _SECRET_PARAMETERS:
        text = re.sub(rf'([?&]{name}=)%2A%2A%2A(?=&|$)', r'\1***', text)
    return text


def _checked(name: str, value: str, allowed: tuple[str, ...] | None) -> str:
    if allowed is not None and value not in allowed:
        raise ConfigError(f'DATABASE_URL parameter {name} must be one of {", ".join(allowed)}; got {value!r}')
    if name in _FILES:
        _check_file(name, value)
    return value


def _ssl_mode(dsn: dict[str, str], args: dict[str, Any]) -> tuple[str, str | None]:
    """The SSL mode asyncpg connects with and the setting that gave it: the URL's `sslmode` (or SQLAlchemy's `ssl`),
    else `PGSSLMODE`, which asyncpg (and libpq, the job queue's) read then, to a Unix socket too. The embedded
    server's URL names `sslmode=disable` (`EmbeddedServer.url`): a `PGSSLMODE` there is someone else's."""
    if 'sslmode' in dsn:
        return 'DATABASE_URL parameter sslmode', dsn['sslmode']
    if 'ssl' in args:
        return 'DATABASE_URL parameter ssl', args['ssl']
    mode = os.environ.get('PGSSLMODE')  # set but empty is no mode to asyncpg or libpq either: refused below
    if mode is not None and mode not in SSL_MODES:  # asyncpg's ClientConfigurationError at the first connection
        raise ConfigError(f'PGSSLMODE must be one of {", ".join(SSL_MODES)}; got {mode!r}')
    return 'PGSSLMODE', mode


def _check_root_certificate(setting: str, mode: str | None, dsn: dict[str, str]) -> None:
    """Refuse a verifying `sslmode` with no CA certificate to verify against: asyncpg (and libpq, the job queue's)
    read `PGSSLROOTCERT` or `~/.postgresql/root.crt` then, and without either file the first connection failed as
    "cannot connect" (exit 3, a server to wait for) where the URL lacked its `sslrootcert` (qa170). `setting` is
    what gave the `mode`: the URL's `sslmode`, SQLAlchemy's `ssl`, or `PGSSLMODE` (qa174).

    libpq's `sslrootcert=system` (or `PGSSLROOTCERT=system`) becomes the system's CA file in `dsn`: asyncpg has no
    such value and read `system` as a file name, a `FileNotFoundError` reported as "no server is listening on its
    Unix socket" (exit 3; qa174).
    """
    given = dsn.get('sslrootcert')
    if given is None and mode in (None, 'require', 'verify-ca', 'verify-full'):  # asyncpg reads it from require
        given = os.environ.get('PGSSLROOTCERT')
        if mode is None and given != 'system':  # asyncpg's default (prefer) reads no root certificate
            return
        if given is not None and given.startswith('~'):
            raise ConfigError(
                f'PGSSLROOTCERT {given!r}: a path starting with ~ is not expanded (by asyncpg or libpq); '
                'give it in full'
            )
        source = f'PGSSLROOTCERT={given}'
    else:
        source = f'DATABASE_URL parameter sslrootcert={given}'
    if given == 'system':
        if mode is None:
            # libpq 16 makes verify-full the default with it (the job queue's connections then), where asyncpg's
            # default, prefer, checked no certificate: one server, two checks (QA).
            dsn['sslmode'] = mode = 'verify-full'
        if mode != 'verify-full':  # libpq refuses a weaker one: the system's roots vouch for any name
            raise ConfigError(
                f'{source} needs sslmode=verify-full (libpq refuses a weaker mode with it); got {setting}={mode}'
            )
        dsn['sslrootcert'] = _system_roots(source)
        return
    if mode not in ('verify-ca', 'verify-full') or 'sslrootcert' in dsn:
        return
    try:
        path = Path(given) if given else Path.home() / '.postgresql' / 'root.crt'
    except (RuntimeError, KeyError):  # no home directory to look in
        path = None
    if path is not None and path.is_file() and os.access(path, os.R_OK):
        return
    if given:
        missing = f'PGSSLROOTCERT {given!r} is no readable file'
    elif path is not None:
        missing = f'none is given, and {str(path)!r}, read then, is no readable file'
    else:
        missing = 'none is given, and there is no home directory to find ~/.postgresql/root.crt in'
    raise ConfigError(
        f'{setting}={mode} checks the server against a CA certificate, but {missing}: give '
        "the CA as sslrootcert=/path/ca.crt (or with verify-full sslrootcert=system, the system's trusted roots)"
    )


def _system_roots(source: str) -> str:
    """The file of the system's trusted CA certificates (OpenSSL's default, `SSL_CERT_FILE` if set), which asyncpg
    loads as `sslrootcert=system` means: it takes a file, never OpenSSL's directory of hashed certificates."""
    cafile = ssl.get_default_verify_paths().cafile
    if cafile is None or not os.access(cafile, os.R_OK):
        raise ConfigError(
            f'{source}: this system has no file of trusted CA certificates for asyncpg to read (only a '
            'directory, which it cannot); give the CA as sslrootcert=/path/ca.crt'
        )
    return cafile


def _check_file(name: str, value: str) -> None:
    if name == 'sslrootcert' and value == 'system':  # libpq 16: the system's trusted roots (`_system_roots`)
        return
    if value.startswith('~'):  # checked expanded, then asyncpg opened `~/...` as it is: "cannot connect" (qa174)
        raise ConfigError(
            f'DATABASE_URL parameter {name}: a path starting with ~ is not expanded (by asyncpg or libpq); give it '
            f'in full, not {value!r}'
        )
    path = Path(value)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f'DATABASE_URL parameter {name}: no readable file {value!r}')


def _single(name: str, raw: str | tuple[str, ...]) -> str:
    values = _values(raw)
    if len(values) != 1:
        raise ConfigError(f'DATABASE_URL parameter {name!r} is given {len(values)} times')
    return values[0]


def _values(raw: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if raw is None:
        return ()
    return (raw,) if isinstance(raw, str) else tuple(raw)


def _integer(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f'DATABASE_URL parameter {name} must be a whole number, got {value!r}') from None


def _check_port(port: int | None, what: str) -> None:
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f'DATABASE_URL: {what} must be 1 to 65535, got {port}')
