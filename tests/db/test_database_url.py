"""`DATABASE_URL` as hosted PostgreSQL services hand it out: libpq parameters mapped to asyncpg or refused by name,
and SSL against a server with a certificate made for the test."""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qsl, quote

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine

from agentrt.db.database_url import asyncpg_connect_args, libpq_uri, mask_url, parse_database_url
from agentrt.db.embedded import EmbeddedServer
from agentrt.db.engine import build_engine, check_connection, describe_server
from agentrt.db.errors import ConfigError, DatabaseUnavailableError
from agentrt.db.settings import Settings, read_settings
from tests.agents.cli.helpers import invoke, run_cli
from tests.private_database import PrivateDatabase

URL = 'postgresql://app:s3cret@db.example.com:5432/app'


def test_libpq_parameters_become_asyncpg_arguments(tmp_path: Path) -> None:
    ca = tmp_path / 'ca.crt'
    ca.write_text('-----BEGIN CERTIFICATE-----\n')
    url = parse_database_url(
        f'{URL}?sslmode=verify-full&sslrootcert={ca}&connect_timeout=7&application_name=billing'
        '&options=-c%20search_path%3Dapp&target_session_attrs=read-write'
    )
    assert url.drivername == 'postgresql+asyncpg'
    stripped, args = asyncpg_connect_args(url)
    assert dict(stripped.query) == {}
    assert args['dsn'] == f'postgresql://?sslmode=verify-full&sslrootcert={str(ca).replace("/", "%2F")}'
    assert args['timeout'] == 7.0 and args['target_session_attrs'] == 'read-write'
    assert args['server_settings'] == {'application_name': 'billing', 'options': '-c search_path=app'}
    # SQLAlchemy's own spelling, and the socket form, stay as they were.
    assert asyncpg_connect_args(parse_database_url(f'{URL}?ssl=true'))[1] == {'ssl': 'require'}
    socket_url = parse_database_url('postgresql://u@/db?host=/run/postgresql&port=5433')
    assert dict(asyncpg_connect_args(socket_url)[0].query) == {'host': '/run/postgresql', 'port': '5433'}


@pytest.mark.parametrize(
    'url', ['postgresql://app:s3cret@h1,h2/app', 'postgresql://app:s3cret@localhost:5432,localhost:5433/app']
)
def test_libpqs_host_list_in_the_url_says_the_form_that_works(url: str) -> None:
    # "Name or service not known" at the first connection, or "not a valid URL (invalid literal for int() ...)" (QA).
    with pytest.raises(ConfigError, match=r'\?host=db1:5432&host=db2:5432') as raised:
        parse_database_url(url)
    assert 's3cret' not in str(raised.value)


@pytest.mark.parametrize(
    ('url', 'words'),
    [
        ('postgresql://post%00gres@/postgres?host=/tmp', 'the user name holds a NUL character'),
        ('postgresql://post\udcffgres@/postgres?host=/tmp', 'the user name holds bytes that are not UTF-8'),
        ('postgresql://u:p%00w@/postgres?host=/tmp', 'the password holds a NUL character'),
        ('postgresql://u@/post%00gres?host=/tmp', 'the database name holds a NUL character'),
        ('postgresql://u@/post\udcffgres?host=/tmp', 'the database name holds bytes that are not UTF-8'),
        ('postgresql://u@/db?host=/tmp&application_name=a\udcffb', "parameter 'application_name' holds bytes"),
    ],
)
def test_a_part_the_connection_cannot_send_is_a_configuration_error(url: str, words: str) -> None:
    # A NUL was refused by PostgreSQL as a malformed startup packet, and bytes that are not UTF-8 (a shell's $'\xff',
    # read by Python as a lone surrogate) failed in asyncpg's protocol: both "cannot connect" (exit 3) (QA).
    with pytest.raises(ConfigError, match='DATABASE_URL') as raised:
        parse_database_url(url)
    assert words in str(raised.value) and 'p%00w' not in str(raised.value)


@pytest.mark.parametrize(
    ('query', 'words'),
    [
        ('sslmode=sometimes', 'sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full'),
        ('sslrootcert=/no/such/ca.crt', "sslrootcert: no readable file '/no/such/ca.crt'"),
        ('connect_timeout=soon', 'connect_timeout must be a whole number'),
        ('connect_timeout=0', 'connect_timeout must be 1 to 600 seconds'),
        ('target_session_attrs=primary-ish', 'target_session_attrs must be one of'),
        ('pgbouncer=true', 'DB_POOLER=pgbouncer'),
        ('channel_binding=require', 'channel binding'),
        ('keepalives=1', 'keepalive'),
        ('sslmode=require&sslmode=disable', "'sslmode' is given 2 times"),
        ('frobnicate=1', "parameter 'frobnicate' is not supported; supported: sslmode"),
        ('port=70000&host=/tmp', 'port parameter must be 1 to 65535'),
        # libpq's comma lists, which the dialect cannot connect to: its ArgumentError came at the first connection, an
        # internal error; and a NUL, which the server refused as a malformed startup packet ("unavailable") (QA).
        ('host=127.0.0.9,127.0.0.1&port=5432', 'a list of hosts goes in host parameters, each with its port'),
        ('host=127.0.0.1:5433,127.0.0.1:5432', 'All ports are required'),
        ('host=/run/a,/run/b&port=5432,5432', 'a list of hosts goes in host parameters'),
        ('application_name=%00x', "parameter 'application_name' holds a NUL character"),
    ],
)
def test_a_parameter_asyncpg_cannot_honour_is_refused_by_name(query: str, words: str) -> None:
    with pytest.raises(ConfigError, match='DATABASE_URL') as raised:
        parse_database_url(f'{URL}?{query}')
    assert words in str(raised.value)
    if 'supported: ' in words:  # the list names every parameter taken, those kept in the URL too
        assert all(f'{name}' in str(raised.value) for name in ('host', 'port', 'prepared_statement_cache_size'))
    assert 's3cret' not in str(raised.value)


@pytest.mark.parametrize(
    ('value', 'words'),
    [
        ('abc', "prepared_statement_cache_size must be a whole number from 0 (the cache off) to 1,000,000, got 'abc'"),
        ('1.5', "prepared_statement_cache_size must be a whole number from 0 (the cache off) to 1,000,000, got '1.5'"),
        ('1&prepared_statement_cache_size=2', "'prepared_statement_cache_size' is given 2 times"),
    ],
)
@pytest.mark.parametrize('variable', ['DATABASE_URL', 'AGENTRT_QUEUE_DATABASE_URL'])
def test_a_statement_cache_size_that_is_no_number_is_named(
    value: str, words: str, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its int() failed in the dialect and was reported as a wrong list of hosts ("an IPv6 address cannot be one of
    # several hosts there"), and a value given twice was an internal error (qa170).
    monkeypatch.setenv('DATABASE_URL', URL)
    monkeypatch.setenv(variable, f'{URL}?prepared_statement_cache_size={value}')
    with pytest.raises(ConfigError) as raised:
        read_settings()
    message = str(raised.value)
    assert f'{variable} parameter' in message and words in message, message
    assert 'list of hosts' not in message and 's3cret' not in message


@pytest.mark.parametrize('value', ['-5', '-1', '1000001', '1' * 400, '5e3'])
def test_a_statement_cache_size_out_of_range_is_refused(value: str) -> None:
    # A negative size made SQLAlchemy's LRU cache empty itself for ever, and one past a float's range failed at the
    # first statement (qa170).
    with pytest.raises(ConfigError) as raised:
        parse_database_url(f'{URL}?prepared_statement_cache_size={value}')
    assert str(raised.value) == (
        'DATABASE_URL parameter prepared_statement_cache_size must be a whole number from 0 (the cache off) to '
        f'1,000,000, got {value!r}'
    )
    for fine in ('0', '100', '1000000'):
        parse_database_url(f'{URL}?prepared_statement_cache_size={fine}')


def test_a_negative_statement_cache_size_stops_the_command_at_once(database_url: str) -> None:
    # Every command hung at 100 % CPU on its first prepared statement, deaf to SIGTERM and Ctrl-C: only SIGKILL
    # ended it (qa170). A process of its own, which the timeout can kill.
    url = make_url(database_url).update_query_dict({'prepared_statement_cache_size': '-5'})
    result = run_cli('db', 'status', env={'DATABASE_URL': url.render_as_string(hide_password=False)}, timeout=60)
    assert result.returncode == 2, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith('error:')] == [
        'error: invalid configuration: DATABASE_URL parameter prepared_statement_cache_size must be a whole number '
        "from 0 (the cache off) to 1,000,000, got '-5'"
    ]


@pytest.mark.parametrize('query', ['sslmode=verify-full', 'sslmode=verify-ca', 'ssl=verify-full'])
def test_a_verifying_sslmode_without_a_ca_certificate_is_a_configuration_error(
    query: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncpg looked for ~/.postgresql/root.crt at the first connection: "cannot connect ... root certificate file
    # ... does not exist", exit 3 (a server to wait for), where the URL lacked its sslrootcert (qa170).
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.delenv('PGSSLROOTCERT', raising=False)
    monkeypatch.setenv('DATABASE_URL', f'{URL}?{query}')
    default = tmp_path / '.postgresql' / 'root.crt'
    with pytest.raises(ConfigError) as raised:
        read_settings()
    assert str(raised.value) == (
        f'invalid configuration: DATABASE_URL parameter {query} checks the server against a CA certificate, but none '
        f"is given, and '{default}', read then, is no readable file: give the CA as sslrootcert=/path/ca.crt (or "
        "with verify-full sslrootcert=system, the system's trusted roots)"
    )
    monkeypatch.setenv('PGSSLROOTCERT', str(tmp_path / 'ca.crt'))
    with pytest.raises(ConfigError, match=f"but PGSSLROOTCERT '{tmp_path}/ca.crt' is no readable file"):
        read_settings()
    (tmp_path / 'ca.crt').write_text('-----BEGIN CERTIFICATE-----\n')
    read_settings()
    monkeypatch.delenv('PGSSLROOTCERT')
    default.parent.mkdir()
    default.write_text('-----BEGIN CERTIFICATE-----\n')
    read_settings()  # what asyncpg reads when the URL names none


def test_sslrootcert_system_is_the_systems_ca_file_for_asyncpg(monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncpg has no `system`: it loaded a file of that name, a FileNotFoundError said as "no server is listening on
    # its Unix socket" (exit 3), for a TCP host (qa174). libpq (the job queue's) keeps its own `system`.
    monkeypatch.delenv('PGSSLROOTCERT', raising=False)
    system = ssl.get_default_verify_paths().cafile
    if system is None:  # the CA bundle of the ca-certificates package (OpenSSL's default file)
        pytest.skip('this machine has no system file of trusted CA certificates')
    url = parse_database_url(f'{URL}?sslmode=verify-full&sslrootcert=system')
    assert (
        asyncpg_connect_args(url)[1]['dsn'] == f'postgresql://?sslmode=verify-full&sslrootcert={quote(system, safe="")}'
    )
    assert 'sslrootcert=system' in libpq_uri(url)
    monkeypatch.setenv('PGSSLROOTCERT', 'system')
    dsn = asyncpg_connect_args(parse_database_url(f'{URL}?ssl=verify-full'))[1]['dsn']
    assert dsn == f'postgresql://?sslrootcert={quote(system, safe="")}'
    for query in ('sslmode=require&sslrootcert=system', 'ssl=verify-ca&sslrootcert=system'):
        with pytest.raises(ConfigError, match=r'sslrootcert=system needs sslmode=verify-full \(libpq refuses a weaker'):
            parse_database_url(f'{URL}?{query}')
    with pytest.raises(ConfigError, match='PGSSLROOTCERT=system needs sslmode=verify-full'):
        parse_database_url(f'{URL}?sslmode=require')
    # With no mode, verify-full, as libpq 16 makes it (the job queue's connections): asyncpg's default, prefer,
    # checked no certificate where the queue refused an untrusted one (QA).
    expected = {'sslmode': 'verify-full', 'sslrootcert': system}
    assert dict(parse_qsl(asyncpg_connect_args(parse_database_url(URL))[1]['dsn'].split('?', 1)[1])) == expected
    monkeypatch.delenv('PGSSLROOTCERT')
    dsn = asyncpg_connect_args(parse_database_url(f'{URL}?sslrootcert=system'))[1]['dsn']
    assert dict(parse_qsl(dsn.split('?', 1)[1])) == expected
    monkeypatch.setenv('PGSSLMODE', 'prefer')
    with pytest.raises(ConfigError, match='got PGSSLMODE=prefer'):
        parse_database_url(f'{URL}?sslrootcert=system')


@pytest.mark.parametrize('name', ['sslrootcert', 'sslcert', 'sslkey', 'sslcrl', 'passfile'])
def test_a_path_starting_with_a_tilde_is_refused(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Checked expanded, then given to asyncpg as it was, which opens `~/ca.crt` in the working directory (qa174).
    monkeypatch.setenv('HOME', str(tmp_path))
    (tmp_path / 'ca.crt').write_text('-----BEGIN CERTIFICATE-----\n')
    with pytest.raises(ConfigError, match=f"parameter {name}: a path starting with ~ is not expanded .* '~/ca.crt'"):
        parse_database_url(f'{URL}?sslmode=require&{name}=~/ca.crt')
    monkeypatch.setenv('PGSSLROOTCERT', '~/ca.crt')
    with pytest.raises(ConfigError, match=r"PGSSLROOTCERT '~/ca.crt': a path starting with ~ is not expanded"):
        parse_database_url(f'{URL}?sslmode=verify-full')
    parse_database_url(f'{URL}?sslmode=disable')  # asyncpg reads it from require up


async def test_sslrootcert_system_and_a_missing_file_are_not_said_as_a_unix_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = 'postgresql://app:s3cret@127.0.0.1:19661/app'
    result = await invoke('db', 'status', env={'DATABASE_URL': f'{url}?sslmode=require&sslrootcert=system'})
    assert result.exit_code == 2
    [line] = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert 'sslrootcert=system needs sslmode=verify-full' in line and 's3cret' not in result.stdout + result.stderr
    # A file asyncpg loads before it connects, named by a variable the start-up check does not read.
    monkeypatch.setenv('PGSSLCERT', '/nonexistent/client.crt')
    result = await invoke('db', 'status', env={'DATABASE_URL': f'{url}?sslmode=require', 'DB_CONNECT_TIMEOUT': '3'})
    assert result.exit_code == 3
    [line] = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert 'a certificate or key file it was to read does not exist' in line, line
    assert 'Unix socket' not in line and 's3cret' not in result.stdout + result.stderr


def test_a_parameter_holding_a_secret_is_masked_where_a_url_is_shown() -> None:
    # The client key's password was printed in clear by `agentrt db status` and the worker's log (qa174).
    url = parse_database_url(f'{URL}?sslmode=disable&sslpassword=KEY%26SEKRET&application_name=a%2A%2A%2A')
    assert mask_url(url) == (
        'postgresql+asyncpg://app:***@db.example.com:5432/app?application_name=a%2A%2A%2A&sslmode=disable'
        '&sslpassword=***'
    )
    assert libpq_uri(url, hide_password=True) == (
        'postgresql://app:***@db.example.com:5432/app?sslmode=disable&sslpassword=***&application_name=a%2A%2A%2A'
    )
    assert 'sslpassword=KEY%26SEKRET' in libpq_uri(url)  # what the queue connects with
    assert mask_url('postgresql://u@h/d?password=SEKRET') == 'postgresql://u@h/d?password=***'


def test_pgsslmode_is_checked_as_the_urls_sslmode_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncpg reads PGSSLMODE when the URL names no mode: verify-full without a CA was "cannot connect" (exit 3; qa174).
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.delenv('PGSSLROOTCERT', raising=False)
    monkeypatch.setenv('PGSSLMODE', 'verify-full')
    with pytest.raises(ConfigError, match=r'^PGSSLMODE=verify-full checks the server against a CA certificate, but'):
        parse_database_url(URL)
    parse_database_url(f'{URL}?sslmode=require')  # the URL's own mode is the one asyncpg uses
    monkeypatch.setenv('PGSSLMODE', 'sometimes')
    with pytest.raises(ConfigError, match=r"PGSSLMODE must be one of disable, .*; got 'sometimes'"):
        parse_database_url(URL)


async def test_pgsslmode_leaves_the_embedded_servers_socket_alone(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PGSSLMODE meant for another server failed every start of the embedded one: asyncpg looked for
    # ~/.postgresql/root.crt before connecting to its Unix socket, which has no TLS (qa174).
    suite = make_url(database_url)
    if 'host' not in suite.query:
        pytest.skip('the run is on a DATABASE_URL server, not the embedded one')
    server = EmbeddedServer(tmp_path, Path(suite.query['host']), int(suite.query['port']))
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.setenv('PGSSLMODE', 'verify-full')
    url = server.url(suite.database or 'postgres').set(username=suite.username)
    async with _engine(url.render_as_string(hide_password=False)) as engine, engine.connect() as conn:
        assert (await conn.execute(text('SELECT 1'))).scalar_one() == 1


@pytest.mark.parametrize(
    ('url', 'words'),
    [
        ('postgresql://app:s3cret@db.example.com:5432', 'names no database; expected postgresql://'),
        (f'{URL}?user=app', 'put the user name in the URL: postgresql://'),
    ],
)
async def test_the_url_a_refusal_shows_as_the_example_is_not_redacted(url: str, words: str) -> None:
    # The example read `postgresql://user:pass@host:5432/db`, and the CLI's error line, redacted, showed
    # `user:[REDACTED]@host`: a hint with a hole where the password goes.
    result = await invoke('db', 'status', env={'DATABASE_URL': url})
    assert result.exit_code == 2
    [line] = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert words in line and '<user>:<password>@<host>' in line and '[REDACTED]' not in line
    assert 's3cret' not in result.stderr


@pytest.mark.parametrize(
    ('url', 'words'),
    [
        ('postgresql://app:p@XQw0rdTAIL@localhost/agents', "its host holds '@'"),
        ('postgresql://app:p@XQ#w0rdTAIL@localhost:19921/db', "its host holds '@'"),
        ('postgresql://app:p@XQ:w0rdTAIL@localhost/db', 'its port is not a number (not shown)'),
        ('postgresql://app:p@XQ/w0rdTAIL@localhost/db', 'its database name holds an @ that is not percent-encoded'),
        ('postgresql://app:pw@XQTAIL$x/db', "its host holds '$', which no host name has"),
    ],
)
def test_a_password_with_an_unencoded_at_sign_is_refused_without_showing_it(url: str, words: str) -> None:
    # SQLAlchemy ends the password at its first @: the rest became the host, printed in "cannot connect to PostgreSQL
    # at ssw0rd@localhost:5432/agents: Name or service not known" (exit 3) and in serve's log (qa170).
    with pytest.raises(ConfigError, match='DATABASE_URL') as raised:
        parse_database_url(url)
    message = str(raised.value)
    assert words in message and 'must be percent-encoded in the URL (@ as %40' in message, message
    assert 'TAIL' not in message and 'XQ' not in message, message


@pytest.mark.parametrize('host', ['db#1', 'db?x', 'a%40b', 'db%20x'])
def test_a_host_parameter_holding_what_no_host_name_has_is_refused(host: str) -> None:
    with pytest.raises(ConfigError, match=r"DATABASE_URL: host parameter '.*' holds '[#?@ ]', which no host name has"):
        parse_database_url(f'postgresql://u:p@/db?host={host}')
    for fine in ('my_db', 'bücher.example', '[::1]', '10.0.0.1'):  # a container's name, an IDN
        parse_database_url(f'postgresql://u:p@{fine}/db')


@pytest.mark.parametrize('host', ['[fe80::1%25eth0]', '[fe80::1%eth0]', '[fe80::1%25eth0]:6432'])
def test_an_ipv6_zone_in_the_urls_host_says_the_host_parameter_form(host: str) -> None:
    # Neither spelling worked: `%25eth0` was looked up as a name ("Name or service not known", exit 3), `%eth0` was
    # refused by libpq, the job queue retrying until "cannot connect" (exit 3), while the check passed both (qa174).
    with pytest.raises(ConfigError, match=r'an IPv6 address with a zone \(%\) is not read as the URL') as raised:
        parse_database_url(f'postgresql://u:s3cret@{host}/db')
    assert '?host=fe80::1%25eth0&port=5432' in str(raised.value) and 's3cret' not in str(raised.value)
    url = parse_database_url('postgresql://u:s3cret@/db?host=fe80::1%25eth0&port=6432')  # the form that works
    assert url.query['host'] == 'fe80::1%eth0'
    assert 'host=fe80%3A%3A1%25eth0&port=6432' in libpq_uri(url)


@pytest.mark.parametrize('host', ['%2Ftmp%2Fsock:5432', '%2frun%2fpostgresql'])
def test_a_socket_directory_in_the_urls_host_says_the_host_parameter_form(host: str) -> None:
    # libpq's `postgresql://%2Fvar%2Flib%2Fpostgresql/dbname` was refused with advice to percent-encode the password
    # (qa174).
    with pytest.raises(ConfigError) as raised:
        parse_database_url(f'postgresql://app:s3cret@{host}/db')
    message = str(raised.value)
    assert "a Unix socket directory (%2F...) is not read as the URL's host" in message, message
    assert '?host=/run/postgresql' in message and 'percent-encoded' not in message and 's3cret' not in message


async def test_a_password_with_an_unencoded_at_sign_is_not_printed_by_a_command() -> None:
    result = await invoke('db', 'status', env={'DATABASE_URL': 'postgresql://app:p@ssw0rdTAIL@localhost/agents'})
    assert result.exit_code == 2
    assert [line for line in result.stderr.splitlines() if line.startswith('error:')] == [
        "error: invalid configuration: DATABASE_URL: its host holds '@', which no host name has (the host is not "
        'shown: it may hold part of the password); a password or user name holding @, :, /, ?, #, % or a space must '
        'be percent-encoded in the URL (@ as %40, : as %3A, / as %2F, ? as %3F, # as %23, % as %25, a space as %20)'
    ]
    assert 'w0rdTAIL' not in result.stdout + result.stderr


@pytest.mark.parametrize('port', ['99999', '0', '65536'])
def test_an_out_of_range_port_is_a_configuration_error(port: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('DATABASE_URL', f'postgresql://u:p@localhost:{port}/db')
    with pytest.raises(ConfigError, match=f'DATABASE_URL: the port must be 1 to 65535, got {int(port)}'):
        read_settings()


@pytest.mark.parametrize(
    ('host', 'words'),
    [
        ('localhost:84737', "the port of host parameter 'localhost:84737' must be 1 to 65535, got 84737"),
        ('localhost:0', 'must be 1 to 65535, got 0'),  # was 5432: maybe another server
        ('localhost:x', "the port of host parameter 'localhost:x' must be a whole number from 1 to 65535"),
        ('localhost:%2019239', 'must be a whole number from 1 to 65535'),  # a DNS error for "localhost: 19239"
        ('localhost:+19239', 'must be a whole number from 1 to 65535'),
        ('[::1]:19239', 'an IPv6 address with a port is not read there'),
        ('[::1]&port=19239', 'an IPv6 address goes there without brackets (host=::1)'),  # a DNS error (qa127)
        ('::1&host=::2', 'an IPv6 address cannot be one of several hosts there'),  # "too many values to unpack"
        ('localhost:19239&port=19238', 'has a port, and so does the port parameter'),
    ],
)
def test_a_host_parameters_port_out_of_range_is_a_configuration_error(
    host: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never checked: 84737 wrapped round to 19201, another server's port, and 0 meant 5432 (QA).
    monkeypatch.setenv('DATABASE_URL', f'postgresql://u:p@/db?host={host}')
    with pytest.raises(ConfigError, match=re.escape(words)):
        read_settings()
    for fine in ('db1:5432', '::1', '/var/run/postgresql'):
        parse_database_url(f'postgresql://u:p@/db?host={fine}')


@asynccontextmanager
async def _engine(url: str) -> AsyncIterator[AsyncEngine]:
    settings = Settings(database_url=url, pool_size=1, max_overflow=0, connect_timeout=5)
    parsed = parse_database_url(url)
    engine = build_engine(parsed, settings)
    try:
        await check_connection(engine, parsed, settings.connect_timeout)
        yield engine
    finally:
        await engine.dispose()


async def test_parameters_reach_the_server(private_database: PrivateDatabase) -> None:
    url = private_database.server.url(
        sslmode='disable', application_name='billing', options='-c%20search_path%3Dbilling', connect_timeout='3'
    )
    async with _engine(url) as engine, engine.connect() as conn:
        assert (await conn.execute(text('SHOW application_name'))).scalar_one() == 'billing'
        assert (await conn.execute(text('SHOW search_path'))).scalar_one() == 'billing'
        assert (await conn.execute(text('SHOW statement_timeout'))).scalar_one() == '30s'  # ours kept too


async def test_sslmode_require_connects_over_ssl(private_database: PrivateDatabase) -> None:
    server = private_database.server
    if not server.ssl:
        pytest.skip("Debian's PostgreSQL 15 (with SSL) is not installed; the embedded one has no SSL")
    query = 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()'
    for url in (server.url(sslmode='require'), server.url(sslmode='verify-full', sslrootcert=str(server.ca_cert))):
        async with _engine(url) as engine, engine.connect() as conn:
            assert (await conn.execute(text(query))).scalar_one() is True


async def test_verify_full_with_the_wrong_root_certificate_says_so(private_database: PrivateDatabase) -> None:
    server = private_database.server
    if not server.ssl:
        pytest.skip("Debian's PostgreSQL 15 (with SSL) is not installed; the embedded one has no SSL")
    url = server.url(sslmode='verify-full', sslrootcert=str(server.other_ca_cert))
    with pytest.raises(DatabaseUnavailableError) as raised:
        async with _engine(url):
            pass
    message = str(raised.value)
    assert f'127.0.0.1:{server.port}' in message and "server's certificate is not trusted" in message
    assert 'sslrootcert' in message and '\n' not in message
    result = await invoke('db', 'status', env={'DATABASE_URL': url, 'DB_CONNECT_TIMEOUT': '5'})
    assert result.exit_code == 3
    assert [line for line in result.stderr.splitlines() if line.startswith('error:')] == [f'error: {message}']


@pytest.mark.parametrize(
    ('url', 'described'),
    [
        ('postgresql://u:p@/db?host=h1:5432&host=h2:5433', 'h1:5432,h2:5433/db'),
        ('postgresql://u:p@/db?host=/tmp&port=5433', '/tmp:5433/db'),
        ('postgresql://u:p@db.internal:6432/agents', 'db.internal:6432/agents'),
        ('postgresql://u:p@/agents?host=db.internal:6432', 'db.internal:6432/agents'),
        # The socket the dialect connects to, not the URL's address ("no server is listening on its Unix socket"; qa170)
        ('postgresql://u:p@127.0.0.1:19940/agents?host=/nonexistent', '/nonexistent:19940/agents'),
        ('postgresql://u:p@127.0.0.1:19940/agents?host=/run/pg&port=5433', '/run/pg:5433/agents'),
    ],
)
def test_a_server_is_described_in_messages_as_a_person_reads_it(url: str, described: str) -> None:
    # A list of hosts was printed as a Python tuple with a made-up port: "at ('h1:5432', 'h2:5432'):5432/db" (QA).
    assert describe_server(make_url(url)) == described


@pytest.mark.parametrize(
    'url',
    [
        'postgresql://postgres@/post%FFgres?host=/tmp',
        'postgresql://u:p@localhost/db?application_name=%FF%FE',
        'postgresql://u:p@localhost/db?options=%ED%A0%80',  # an escaped lone surrogate
        'postgresql://u:secret%FFpw@localhost/db',
    ],
)
def test_percent_escapes_that_are_not_utf8_are_a_configuration_error(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Decoded with U+FFFD in their place: `database "post\ufffdgres" does not exist`, an option refused by the
    # server as an invalid argument (QA). The escapes are not shown: they may be a password's.
    monkeypatch.setenv('DATABASE_URL', url)
    with pytest.raises(ConfigError, match='a percent-escape in it stands for bytes that are not UTF-8') as info:
        read_settings()
    assert 'secret' not in str(info.value) and '%FE' not in str(info.value)
    parse_database_url('postgresql://u:p%C3%A9%2F@localhost/caf%C3%A9')  # UTF-8 escapes are fine


@pytest.mark.parametrize(('given', 'libpq'), [('true', 'require'), ('false', 'disable'), ('prefer', 'prefer')])
def test_sqlalchemys_ssl_parameter_reaches_the_job_queue_as_sslmode(given: str, libpq: str) -> None:
    # README: `ssl=true` is `require`. libpq (the job queue's psycopg) refused `ssl` as an invalid URI parameter: the
    # queue never connected, and a turn's post-turn jobs were dropped as "database unavailable" (QA).
    url = parse_database_url(f'{URL}?ssl={given}')
    assert f'sslmode={libpq}' in libpq_uri(url) and 'ssl=' not in libpq_uri(url)


def test_sslmode_and_ssl_together_are_refused() -> None:
    # asyncpg takes `ssl` over `sslmode`, where the start-up check read `sslmode`: `sslmode=verify-full&ssl=disable`
    # connected without TLS (QA).
    with pytest.raises(ConfigError, match='both sslmode and ssl'):
        parse_database_url(f'{URL}?sslmode=verify-full&sslrootcert=system&ssl=disable')


def test_an_empty_pgsslmode_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Read as unset here, where asyncpg and libpq refuse "": "cannot connect" (exit 3) at the first connection (QA).
    monkeypatch.setenv('PGSSLMODE', '')
    with pytest.raises(ConfigError, match=r"PGSSLMODE must be one of .*; got ''"):
        parse_database_url(URL)
    parse_database_url(f'{URL}?sslmode=disable')  # the URL's own mode: the variable is not read


def test_pg_variables_asyncpg_reads_are_checked_at_start_naming_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncpg (and libpq, the queue's) read them when the URL names no such parameter, and refused a bad value only at
    # the first connection: "cannot connect" (exit 3), the message naming no variable (QA).
    monkeypatch.setenv('PGSSLNEGOTIATION', 'direct')
    with pytest.raises(ConfigError, match=r'^PGSSLNEGOTIATION=direct needs sslmode=require, .*; got sslmode=prefer'):
        parse_database_url(URL)
    parse_database_url(f'{URL}?sslmode=require')
    parse_database_url(f'{URL}?sslnegotiation=postgres')  # the URL's own: the variable is not read
    monkeypatch.setenv('PGSSLMODE', 'require')
    parse_database_url(URL)
    monkeypatch.delenv('PGSSLMODE')
    for variable, value in (
        ('PGSSLNEGOTIATION', 'sometimes'),
        ('PGTARGETSESSIONATTRS', 'replica'),
        ('PGSSLMINPROTOCOLVERSION', 'TLSv9'),
        ('PGSSLMAXPROTOCOLVERSION', 'TLSv9'),
        ('PGGSSLIB', 'kerberos'),
    ):
        monkeypatch.delenv('PGSSLNEGOTIATION', raising=False)
        monkeypatch.setenv(variable, value)
        with pytest.raises(ConfigError, match=rf"^{variable} \(read for the .*\) must be one of .*; got '{value}'"):
            parse_database_url(URL)
        monkeypatch.delenv(variable)
    monkeypatch.setenv('PGTARGETSESSIONATTRS', 'standby')  # for another server, a choice to honour
    assert asyncpg_connect_args(parse_database_url(URL))[1].get('target_session_attrs') is None


@pytest.mark.parametrize(
    ('variable', 'value', 'words'),
    [
        ('PGGSSENCMODE', 'require', r"^PGGSSENCMODE=require is not supported: .* \(as the URL's gssencmode parameter"),
        ('PGCHANNELBINDING', 'require', r'^PGCHANNELBINDING=require is not supported'),
        ('PGGSSENCMODE', 'always', r"^PGGSSENCMODE must be one of disable, prefer, require; got 'always'"),
        ('PGREQUIREAUTH', 'scram-sha-256', r'^PGREQUIREAUTH is not supported'),
        ('PGCONNECT_TIMEOUT', 'abc', r"^PGCONNECT_TIMEOUT must be a whole number of seconds .*'abc'"),
    ],
)
def test_pg_variables_only_libpq_reads_are_refused_when_bad_or_beyond_asyncpg(
    variable: str, value: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job queue's libpq honours them, the runtime's asyncpg does not: with an external server the queue failed
    # alone ("GSSAPI encryption required but no credential cache", exit 3) while `agentrt db status` worked (QA).
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=words):
        parse_database_url(URL)


def test_pg_variables_both_drivers_honour_alike_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, value in (('PGGSSENCMODE', 'prefer'), ('PGCHANNELBINDING', 'disable'), ('PGCONNECT_TIMEOUT', '5')):
        monkeypatch.setenv(variable, value)
    parse_database_url(URL)
    monkeypatch.setenv('PGCONNECT_TIMEOUT', 'abc')
    parse_database_url(f'{URL}?connect_timeout=5')  # the URL's own: the variable is not read


async def test_a_bad_pg_variable_with_an_external_url_is_a_configuration_error(database_url: str) -> None:
    result = await invoke('db', 'status', env={'DATABASE_URL': database_url, 'PGGSSENCMODE': 'require'})
    assert result.exit_code == 2, result.output
    assert 'PGGSSENCMODE=require is not supported' in result.stderr


@pytest.mark.parametrize(
    'variable',
    [
        'PGSSLNEGOTIATION=direct',
        'PGSSLNEGOTIATION=sometimes',
        'PGTARGETSESSIONATTRS=standby',
        'PGGSSLIB=kerberos',
        'PGSSLMINPROTOCOLVERSION=TLSv9',
        'PGGSSENCMODE=require',
        'PGCHANNELBINDING=require',
        'PGCONNECT_TIMEOUT=abc',
    ],
)
async def test_pg_variables_leave_the_embedded_servers_socket_alone(
    variable: str, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Meant for another server, they failed every start of the embedded one (`PGSSLNEGOTIATION=direct`: "direct TLS
    # requires sslmode=require...", exit 3; `PGTARGETSESSIONATTRS=standby`: "none of its hosts is what ... asks
    # for"), as PGSSLMODE did (QA). Its URL is built and connected as `agentrt.db.engine` does, not parsed.
    suite = make_url(database_url)
    if 'host' not in suite.query:
        pytest.skip('the run is on a DATABASE_URL server, not the embedded one')
    server = EmbeddedServer(tmp_path, Path(suite.query['host']), int(suite.query['port']))
    settings = Settings(pool_size=1, max_overflow=0, connect_timeout=5)  # read before: a DATABASE_URL is checked
    monkeypatch.setenv(*variable.split('=', 1))
    url = server.url(suite.database or 'postgres').set(username=suite.username)
    engine = build_engine(url, settings)
    try:
        await check_connection(engine, url, settings.connect_timeout)
        async with engine.connect() as conn:
            assert (await conn.execute(text('SELECT 1'))).scalar_one() == 1
    finally:
        await engine.dispose()
