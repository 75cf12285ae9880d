"""Database errors that are the set-up's, not an outage: a login PostgreSQL (or PgBouncer) refused, a privilege the
login role or the runtime's roles lack, a pooler in front that the runtime was not told of. Each is a `ConfigError`
saying what to fix; no wait or retry changes it (exit code 2; HTTP 500 `configuration_error`).

A server setting it refused as the connection started (`options=-c name=value` in the URL) is one too.

Split from `agentrt.db.failures`, which recognises outages (a lost connection, a server that is not there) and whose
helpers these use.
"""

from __future__ import annotations

import re

from agentrt.db.errors import ConfigError
from agentrt.db.failures import at_server, causes, class_names, first_line, refused_startup_parameter, sqlstate_of
from agentrt.db.flags import shown_value
from agentrt.db.pg_environment import setting_variable

_LOGIN_REFUSED = {
    '28P01': 'check the user name and password in {setting}',  # invalid_password
    '28000': 'check the user name and password in {setting}, and pg_hba.conf',  # invalid_authorization_specification
    '3D000': 'check the database name in {setting}, or create that database',  # invalid_catalog_name
}
"""What PostgreSQL refuses a login for that no retry changes: a wrong password, an unknown role (or one pg_hba.conf
does not let in), a database that does not exist; `{setting}` is the variable that holds the URL."""


_POOLER_LOGIN_REFUSED = {
    'password authentication failed': _LOGIN_REFUSED['28P01'],
    'no such database: ': _LOGIN_REFUSED['3D000'],
}
"""PgBouncer's words for the same refusals (1.18 sends them as SQLSTATE 08P01, a protocol violation), for a wrong
password or user and a database its `[databases]` does not list."""


_LIBPQ_FATAL = re.compile(r'\bFATAL:\s+(.+)')
_LIBPQ_LOGIN_REFUSED = (
    (re.compile(r'password authentication failed for user '), '28P01'),
    (re.compile(r'role ".*" (does not exist|is not permitted to log in)'), '28000'),
    (re.compile(r'(no pg_hba\.conf entry|pg_hba\.conf rejects connection) for '), '28000'),
    (re.compile(r'database ".*" does not exist'), '3D000'),
    (re.compile(r'no such database: '), '3D000'),  # PgBouncer's
)
"""The server's words for the same refusals, as libpq (psycopg: the job queue's connections) reports a failed
connection: its "FATAL:" line, without the SQLSTATE, which libpq keeps only for a statement's error."""


def login_error(exc: BaseException, where: str | None = None, setting: str = 'DATABASE_URL') -> ConfigError | None:
    """A login PostgreSQL (or PgBouncer) refused (`login_refused`) as a `ConfigError` naming the server (`where`, the
    runtime's own by default), or None: at the start, or when a pooled connection is opened later (the password
    rotated, the role made NOLOGIN or dropped, the database dropped), where it was a raw `DBAPIError`. Configuration,
    not an outage: no wait changes it (exit code 2; HTTP 500 `configuration_error`). `setting` names the variable
    the URL came from (`DATABASE_MIGRATION_URL` for the migration's own connection)."""
    refused = login_refused(exc, setting)
    if refused is None:
        return None
    return ConfigError(f'PostgreSQL{f" at {where}" if where else at_server()} refused the login: {refused}')


def login_refused(exc: BaseException, setting: str = 'DATABASE_URL') -> str | None:
    """Why PostgreSQL (or PgBouncer in front of it) refused the login, on one line with what to fix in `setting`
    (the variable that holds the URL), when it refused a password, a role or a database (`_LOGIN_REFUSED`); None for
    any other failure. The server's text names the user or the database, never the password."""
    for error in causes(exc):
        sqlstate = sqlstate_of(error)
        advice = _LOGIN_REFUSED.get(sqlstate)
        if advice is None and sqlstate == '08P01':
            line = first_line(error)
            advice = next((then for words, then in _POOLER_LOGIN_REFUSED.items() if line.startswith(words)), None)
        if advice is not None:
            return f'{first_line(error)}: {advice.format(setting=setting)}'
        if not sqlstate and (refused := _libpq_login_refused(str(error))) is not None:
            said, sqlstate = refused
            return f'{said}: {_LOGIN_REFUSED[sqlstate].format(setting=setting)}'
    return None


def _libpq_login_refused(message: str) -> tuple[str, str] | None:
    """The server's reason and its SQLSTATE (`_LOGIN_REFUSED`) when libpq's `message` of a failed connection says the
    login was refused (`_LIBPQ_LOGIN_REFUSED`), else None."""
    for fatal in _LIBPQ_FATAL.finditer(message):
        said = fatal.group(1).strip()
        for words, sqlstate in _LIBPQ_LOGIN_REFUSED:
            if words.match(said):
                return said, sqlstate
    return None


_REFUSED_SETTING_STATES = frozenset({'22023', '42704', '55P02', '42501'})
"""What PostgreSQL refuses a server setting sent as the connection starts (`options=-c name=value`) with: a value
invalid or out of range, a parameter it does not know, one that only a restart changes, one the login role may not
set."""
_PARAMETER_NAMED = re.compile(r'parameter "([^"]+)"')
_REFUSED_VALUE = re.compile(r'parameter "[^"]+": "(.*)"$')
"""The value refused, where the server's message quotes it (`invalid value for parameter "TimeZone": "Mars/Base"`)."""


def setting_error(
    exc: BaseException, where: str, setting: str = 'DATABASE_URL', *, libpq: bool = False
) -> ConfigError | None:
    """A server setting PostgreSQL refused as a connection started, as a `ConfigError` naming it in PostgreSQL's own
    words (and its hint: the values it takes), else None. Only the start's connection check asks (`check_connection`):
    its one statement sets nothing, so a refused parameter is one of the startup's, from `setting`'s `options` (the
    runtime's own, `statement_timeout` and `lock_timeout`, are checked as settings), or, for a connection of libpq's
    (`libpq`: the job queue's), from the variable libpq sends it from (`PGTZ`...: `setting_variable`). It was "cannot
    connect to PostgreSQL" (exit 3), though no wait changes it."""
    for error in causes(exc):
        sqlstate = sqlstate_of(error)
        if sqlstate in _REFUSED_SETTING_STATES:
            message = first_line(error)
        elif not sqlstate and (said := _libpq_setting_refused(str(error))) is not None:
            message = said  # libpq's (the job queue's connections): the server's FATAL line, without its SQLSTATE
        else:
            continue
        named = _PARAMETER_NAMED.search(message)
        if named is None:
            continue
        # asyncpg's own error carries the hint; SQLAlchemy's adapted one in front of it only the SQLSTATE.
        hint = next((' '.join(str(hint).split()) for e in causes(exc) if (hint := getattr(e, 'hint', None))), '')
        sent = setting_variable(named.group(1)) if libpq else None
        refused_value = _REFUSED_VALUE.search(message)
        if sent is not None and (refused_value is None or refused_value.group(1) == sent[1]):
            # PGTZ=Mars/Base was blamed on the URL's options parameter, which held none (QA).
            variable, value = sent
            return ConfigError(
                f"PostgreSQL at {where} refused the server setting {named.group(1)} that libpq (the job queue's "
                f'connections) sends from {variable}={shown_value(value)} ({message}{f"; {hint}" if hint else ""}): '
                f'correct {variable} or unset it'
            )
        return ConfigError(
            f'PostgreSQL at {where} refused the server setting {named.group(1)} of {setting} ({message}'
            f'{f"; {hint}" if hint else ""}): correct it or remove it from its options parameter '
            '(options=-c name=value)'
        )
    return None


_LIBPQ_SETTING_REFUSED = re.compile(
    r'invalid value for parameter |unrecognized configuration parameter |permission denied to set parameter '
    r'|parameter "[^"]+" (cannot be changed|requires a )|\S+ is outside the valid range for parameter '
)
"""The server's words for `_REFUSED_SETTING_STATES`, as libpq reports a failed connection (see `_LIBPQ_FATAL`)."""


def _libpq_setting_refused(message: str) -> str | None:
    """The server's FATAL line when libpq's `message` of a failed connection says it refused a server setting."""
    for fatal in _LIBPQ_FATAL.finditer(message):
        said = fatal.group(1).strip()
        if _LIBPQ_SETTING_REFUSED.match(said):
            return said
    return None


def pooler_error(exc: BaseException) -> ConfigError | None:
    """A prepared statement lost behind a pooler in transaction mode (PgBouncer...), or a startup parameter the
    pooler refused: a configuration error that the pooler mode (`DB_POOLER=pgbouncer`) fixes. asyncpg's own hint is
    kept."""
    for error in causes(exc):
        if class_names(error) & {'InvalidSQLStatementNameError', 'DuplicatePreparedStatementError'}:
            hint = ' '.join(str(getattr(error, 'hint', '') or '').split())
            return ConfigError(
                f'PostgreSQL lost a prepared statement ({first_line(error)}): a connection pooler in transaction '
                'mode (PgBouncer, a managed pooler) is between the runtime and the server; set DB_POOLER=pgbouncer '
                '(statement caches off, timeouts per transaction)' + (f'. asyncpg: {hint}' if hint else '')
            )
        if (parameter := refused_startup_parameter(error)) is not None:
            return ConfigError(
                f'the server refused the startup parameter {parameter} (PgBouncer does): a connection pooler is '
                'between the runtime and PostgreSQL; set DB_POOLER=pgbouncer (or auto), which sets the timeouts '
                'per transaction instead'
            )
    return None


_RUNTIME_ROLES = 'agentrt_app, agentrt_auth, agentrt_ledger, agentrt_jobs, agentrt_admin'


def privilege_error(
    exc: BaseException, *, as_login_role: bool, login: str | None = None, role: str | None = None
) -> ConfigError | None:
    """A privilege the login role of `DATABASE_URL` lacks (SQLSTATE 42501), when that can only be how the database
    was set up, as a `ConfigError` saying what to grant; None otherwise.

    Two cases are configuration for certain: the login role is not a member of one of the runtime's roles (every
    transaction switches to one on its BEGIN: "permission denied to set role"), and a transaction that runs as the
    login role itself (`Unscoped.OWNER`: `agentrt db status`, start-up checks) is refused a table: the login role
    must own the tables or be a member of the roles. A transaction that runs as one of the runtime's roles and is
    refused one of the runtime's tables is left alone: the migrations grant those roles what their code needs, so that
    is a bug in the runtime (code using the wrong role) or a grant revoked by hand, and is reported as an internal
    error. Refused a table, view, sequence or schema of the program's own (a tool's `get_db_session(account=...)`
    runs as `agentrt_app`), it is the program's set-up: the error names the `GRANT` to run.

    Args:
        exc: what a database operation raised.
        as_login_role: the transaction ran as the login role (no `SET ROLE`).
        login: the login role's name, for the message.
        role: the runtime's role the transaction ran as (`SET ROLE`), if any.
    """
    who = f'the login role of DATABASE_URL ({login})' if login else 'the login role of DATABASE_URL'
    for error in causes(exc):
        if sqlstate_of(error) != '42501':
            continue
        message = first_line(error)
        if message.startswith('permission denied to set role'):
            return ConfigError(
                f"{who} may not act as the runtime's roles ({message}): an administrator grants them, once per "
                f'server: GRANT {_RUNTIME_ROLES} TO {login or "<login role>"} (README "Tenant isolation"; '
                '`agentrt db upgrade` does it for a role that may)'
            )
        if as_login_role and message.startswith('permission denied for'):
            return ConfigError(
                f'{who} was refused a table ({message}): it must own the tables (run `agentrt db upgrade` as it) or '
                f"be a member of the runtime's roles: GRANT {_RUNTIME_ROLES} TO {login or '<login role>'} "
                '(README "Tenant isolation")'
            )
        if role and (refused := _program_object(message)) is not None:
            kind, name = refused
            return ConfigError(
                f"the runtime's role {role} was refused the {kind} {name} ({message}): sessions of "
                f'get_db_session(account=...) run as {role}, so a {kind} of your own needs a grant to it: '
                f'{_grant(kind, name, role)} (README "Tables of your own")'
            )
    return None


_REFUSED_OBJECT = re.compile(r'permission denied for (table|view|materialized view|sequence|schema) "?([^"\s]+)"?$')


def _program_object(message: str) -> tuple[str, str] | None:
    """The kind and name of what a "permission denied for ..." message names, when it is not the runtime's own."""
    matched = _REFUSED_OBJECT.fullmatch(message)
    if matched is None:
        return None
    kind, name = matched.group(1), matched.group(2)
    if kind == 'schema':
        return None if name == 'public' else (kind, name)
    from agentrt.db.models import Base  # on this error path only: the ORM models are not needed to connect

    bare = name.rsplit('.', 1)[-1]
    if bare.startswith('procrastinate_') or bare == 'alembic_version':
        return None
    if kind == 'sequence':
        own = {f'{table.name}_{column.name}_seq' for table in Base.metadata.tables.values() for column in table.c}
    else:
        own = set(Base.metadata.tables)
    return None if bare in own else (kind, name)


def _grant(kind: str, name: str, role: str) -> str:
    if kind == 'sequence':
        return f'GRANT USAGE ON SEQUENCE {name} TO {role}'
    if kind == 'schema':
        return f'GRANT USAGE ON SCHEMA {name} TO {role}'
    return f'GRANT SELECT, INSERT, UPDATE, DELETE ON {name} TO {role} (and USAGE on the sequences of its columns)'
