"""Configuration: environment variables, defaults and clear errors for bad values."""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest

from agentrt.db.errors import ConfigError
from agentrt.db.settings import (
    SPOOL_NAME_MAX_BYTES,
    Settings,
    default_data_dir,
    get_settings,
    mask_url,
    parse_database_url,
    read_settings,
)
from tests.mounts import immutable, read_only_bind


def test_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('DATABASE_URL', 'postgresql://app:s3cret@db.example:6543/agents')
    monkeypatch.setenv('DB_POOL_SIZE', '7')
    monkeypatch.setenv('DB_STATEMENT_TIMEOUT_MS', '1500')
    monkeypatch.setenv('AGENTRT_MODEL', 'openai-chat:gpt-4o-mini')
    settings = Settings()
    assert settings.pool_size == 7
    assert settings.statement_timeout_ms == 1500
    assert settings.model == 'openai-chat:gpt-4o-mini'
    assert not settings.uses_embedded


def test_only_the_documented_names_are_read_not_the_fields_own(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # `populate_by_name` made pydantic-settings read each field's own name too, in any case: a `MODEL` or `DATA_DIR`
    # set for another program changed the runtime's model and database.
    for name, value in {
        'MODEL': 'openai-chat:x',
        'DATA_DIR': str(tmp_path),
        'POOL_SIZE': '0',
        'background': 'queue',
    }.items():
        monkeypatch.setenv(name, value)
    dotenv = tmp_path / '.env'
    dotenv.write_text('MODEL=openai-chat:y\nstatement_timeout_ms=1\nAGENTRT_TURN_REQUEST_LIMIT=4\n')
    settings = Settings(_env_file=dotenv)
    defaults = Settings(_env_file=None)
    assert (settings.model, settings.data_dir, settings.pool_size) == ('demo', defaults.data_dir, 10)
    assert (settings.background, settings.statement_timeout_ms) == (defaults.background, 30_000)
    assert settings.turn_request_limit == 4  # the documented names are read from both
    monkeypatch.setenv('agentrt_model', 'openai-chat:z')  # a documented name, in any case, as before
    assert Settings(_env_file=None).model == 'openai-chat:z'
    assert Settings(_env_file=None, pool_size=3, model='m').pool_size == 3  # code still writes the field names


def test_a_pool_recycle_of_zero_is_refused_naming_what_it_would_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('DB_POOL_RECYCLE', '0')
    with pytest.raises(ConfigError, match=r'DB_POOL_RECYCLE: .*0 would replace the connection at every checkout'):
        read_settings()
    monkeypatch.setenv('DB_POOL_RECYCLE', '-1')
    assert read_settings().pool_recycle == -1


def test_no_database_url_means_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv('DATABASE_URL', raising=False)
    assert Settings(_env_file=None).uses_embedded


@pytest.mark.parametrize(
    ('url', 'problem'),
    [
        ('mysql://u:p@h/db', 'postgresql://'),
        ('postgresql://u:p@host', 'no database'),
        ('postgresql:///db', 'no host'),
        ('not a url at all', 'not a valid URL'),
    ],
)
def test_malformed_database_url_names_the_variable(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_database_url(url)
    assert 'DATABASE_URL' in str(info.value)
    assert problem in str(info.value)


def test_get_settings_reports_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    monkeypatch.setenv('DB_POOL_SIZE', 'lots')
    monkeypatch.setenv('DATABASE_URL', 'mysql://u:p@h/db')
    try:
        with pytest.raises(ConfigError) as info:
            get_settings()
    finally:
        get_settings.cache_clear()
    message = str(info.value)
    assert 'DB_POOL_SIZE' in message
    assert 'DATABASE_URL' in message


@pytest.mark.parametrize('variable', ['DATABASE_MIGRATION_URL', 'AGENTRT_QUEUE_DATABASE_URL'])
def test_a_malformed_second_url_names_its_own_variable(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    # The checks of DATABASE_URL run on these too, and their messages said DATABASE_URL was wrong.
    get_settings.cache_clear()
    monkeypatch.setenv(variable, 'postgresql://u:hunter2@h:99999/db')
    try:
        with pytest.raises(ConfigError) as info:
            get_settings()
    finally:
        get_settings.cache_clear()
    assert str(info.value) == f'invalid configuration: {variable}: the port must be 1 to 65535, got 99999'


def test_a_migration_url_needs_a_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    # DATABASE_MIGRATION_URL is for a DATABASE_URL at a pooler; without DATABASE_URL the embedded server is the
    # runtime's database, and `db upgrade` migrated the other one instead (QA).
    monkeypatch.setenv('DATABASE_URL', '')
    monkeypatch.setenv('DATABASE_MIGRATION_URL', 'postgresql://u:hunter2@db.internal:5432/agents')
    with pytest.raises(ConfigError) as info:
        read_settings()
    message = str(info.value)
    assert message.startswith('invalid configuration: DATABASE_MIGRATION_URL is set but DATABASE_URL is not: ')
    assert 'hunter2' not in message
    monkeypatch.setenv('DATABASE_URL', 'postgresql://u:p@pooler:6432/agents')
    assert read_settings().migration_database_url == 'postgresql://u:hunter2@db.internal:5432/agents'


def test_asyncpg_driver_and_masked_password() -> None:
    url = parse_database_url('postgres://app:s3cret@db.example:6543/agents')
    assert url.drivername == 'postgresql+asyncpg'
    assert 's3cret' not in mask_url(url)
    assert 'db.example:6543/agents' in mask_url(url)


def test_ledger_settings_come_from_the_same_class(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from agentrt.services.ledger import LedgerConfig

    monkeypatch.setenv('AGENTRT_LEDGER_SPOOL', str(tmp_path / 'spool.jsonl'))
    monkeypatch.setenv('AGENTRT_LEDGER_STORE_CONTENT', 'false')
    monkeypatch.setenv('AGENTRT_LEDGER_RETRY_ATTEMPTS', '3')
    monkeypatch.setenv('AGENTRT_LEDGER_COMMIT_DELAY_MS', '0')
    config = LedgerConfig.from_env()
    assert (config.spool_path, config.store_content, config.retry.attempts) == (tmp_path / 'spool.jsonl', False, 3)
    assert config.commit_delay_ms == 0
    assert LedgerConfig().commit_delay_ms == Settings.model_fields['ledger_commit_delay_ms'].default  # one default

    monkeypatch.setenv('AGENTRT_LEDGER_CONTENT_MAX_BYTES', '12')
    with pytest.raises(ConfigError, match='AGENTRT_LEDGER_CONTENT_MAX_BYTES'):
        LedgerConfig.from_env()
    monkeypatch.delenv('AGENTRT_LEDGER_CONTENT_MAX_BYTES')
    monkeypatch.setenv('AGENTRT_LEDGER_COMMIT_DELAY_MS', '-1')
    with pytest.raises(ConfigError, match='AGENTRT_LEDGER_COMMIT_DELAY_MS'):
        LedgerConfig.from_env()


def test_conversation_settings_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('AGENTRT_TURN_REQUEST_LIMIT', '5')
    monkeypatch.setenv('AGENTRT_TURN_TOOL_CALLS_LIMIT', '9')
    monkeypatch.setenv('AGENTRT_TURN_TOTAL_TOKENS_LIMIT', '1000')
    monkeypatch.setenv('AGENTRT_TURN_LEASE_SECONDS', '30')
    monkeypatch.setenv('AGENTRT_CONTEXT_MAX_TOKENS', '2000')
    monkeypatch.setenv('AGENTRT_MESSAGE_MAX_CHARS', '8000')
    settings = Settings(_env_file=None)
    assert (settings.turn_request_limit, settings.turn_tool_calls_limit, settings.turn_total_tokens_limit) == (
        5,
        9,
        1000,
    )
    assert (settings.turn_lease_seconds, settings.context_max_tokens, settings.message_max_chars) == (30, 2000, 8000)


@pytest.mark.parametrize(
    ('env', 'problem'),
    [
        ({'AGENTRT_TURN_REQUEST_LIMIT': '0'}, 'AGENTRT_TURN_REQUEST_LIMIT'),
        ({'AGENTRT_CONTEXT_MAX_TOKENS': '10'}, 'AGENTRT_CONTEXT_MAX_TOKENS'),
        ({'AGENTRT_TURN_LEASE_SECONDS': '1'}, 'AGENTRT_TURN_LEASE_SECONDS'),
        (
            {'AGENTRT_CONTEXT_MAX_TOKENS': '1000', 'AGENTRT_MESSAGE_MAX_CHARS': '4001'},
            'AGENTRT_MESSAGE_MAX_CHARS (4001) must fit in AGENTRT_CONTEXT_MAX_TOKENS (1000 tokens, 4 characters each)',
        ),
    ],
)
def test_bad_conversation_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], problem: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match=re.escape(problem)):
            get_settings()
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize('blank', ['', '  '])
def test_a_blank_data_dir_is_the_default_not_the_working_directory(monkeypatch: pytest.MonkeyPatch, blank: str) -> None:
    monkeypatch.setenv('AGENTRT_DATA_DIR', blank)
    assert Settings().data_dir == default_data_dir()


@pytest.mark.parametrize('blank', ['', '  '])
def test_a_blank_spool_is_the_default_spool(monkeypatch: pytest.MonkeyPatch, blank: str) -> None:
    # Was Path(''): refused as ". is not a file (a directory?)"; a blank of spaces, a file ' ' in the working directory.
    monkeypatch.setenv('AGENTRT_LEDGER_SPOOL', blank)
    assert read_settings().ledger_spool is None


@pytest.mark.parametrize('value', ['nan', 'NaN', 'inf', '-inf', '1e400'])
@pytest.mark.parametrize(
    'variable', ['DB_POOL_TIMEOUT', 'AGENTRT_TURN_LEASE_SECONDS', 'AGENTRT_LEDGER_COMMIT_DELAY_MS']
)
def test_a_number_that_is_not_finite_is_named_as_such(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    # NaN failed every bound and was reported as "less than or equal to 3600", infinity as out of range.
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        read_settings()
    assert str(raised.value) == f'invalid configuration: {variable}: Input should be a finite number'


def test_a_heartbeat_slower_than_the_stall_timeout_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Live workers would be taken for dead: their jobs run again by others, every time.
    monkeypatch.setenv('AGENTRT_JOBS_HEARTBEAT_SECONDS', '100')
    with pytest.raises(
        ValueError,
        match=r'AGENTRT_JOBS_HEARTBEAT_SECONDS \(100\) must be less than AGENTRT_JOBS_STALLED_SECONDS \(60\)',
    ):
        Settings()
    monkeypatch.setenv('AGENTRT_JOBS_STALLED_SECONDS', '101')
    assert Settings().jobs_heartbeat_seconds == 100


def test_a_budget_minimum_of_output_tokens_above_the_maximum_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # It was accepted, and admission then gave a request without max_tokens the maximum: the minimum meant nothing.
    monkeypatch.setenv('AGENTRT_BUDGET_MIN_OUTPUT_TOKENS', '20000')
    get_settings.cache_clear()
    try:
        with pytest.raises(
            ConfigError,
            match=r'invalid configuration: AGENTRT_BUDGET_MIN_OUTPUT_TOKENS \(20000\) must not exceed '
            r'AGENTRT_BUDGET_MAX_OUTPUT_TOKENS \(16384\)',
        ):
            get_settings()
    finally:
        get_settings.cache_clear()
    monkeypatch.setenv('AGENTRT_BUDGET_MAX_OUTPUT_TOKENS', '20000')  # equal: every request is given exactly that
    assert Settings().budget_min_output_tokens == 20000


@pytest.mark.parametrize(
    'url', ['u:s3cr3t-pw@db.example/x', 'postgres:/u:s3cr3t-pw@db.example/x', 'postgresql//u:s3cr3t-pw@h/x']
)
def test_a_database_url_too_malformed_to_mask_never_reaches_the_error_or_its_traceback(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    # `--debug` prints the whole chain; pydantic's ValidationError quoted the raw value (`input_value='...'`),
    # where the redaction rules cannot see a password (no scheme to recognise the URL by).
    monkeypatch.setenv('DATABASE_URL', url)
    with pytest.raises(ConfigError) as caught:
        read_settings()
    shown = ''.join(traceback.format_exception(caught.value))
    assert 'DATABASE_URL is not a valid URL' in shown
    assert 's3cr3t-pw' not in shown


def test_a_spool_in_a_directory_others_may_write_is_refused_at_start(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # The spool refused such a directory only when it first had to write, during an outage: the rows it was given
    # then were lost. A configured one is checked with the rest of the configuration, before anything runs.
    shared = tmp_path / 'shared'
    shared.mkdir()
    shared.chmod(0o777)
    get_settings.cache_clear()
    monkeypatch.setenv('AGENTRT_LEDGER_SPOOL', str(shared / 'spool.jsonl'))
    try:
        with pytest.raises(ConfigError) as info:
            get_settings()
        shared.chmod(0o700)
        get_settings.cache_clear()
        assert get_settings().ledger_spool == shared / 'spool.jsonl'
    finally:
        get_settings.cache_clear()
    message = str(info.value)
    assert message.startswith('invalid configuration: AGENTRT_LEDGER_SPOOL:') and 'writable by others' in message
    assert f'{shared}' in message and 'chmod 700' in message


@pytest.mark.parametrize('under', ['spool.jsonl', 'deeper/spool.jsonl'])
def test_a_spool_under_a_file_is_refused_at_start(monkeypatch: pytest.MonkeyPatch, tmp_path, under: str) -> None:
    # `AGENTRT_LEDGER_SPOOL=/etc/passwd/x` was accepted: the spool failed only when it first had to write, during an
    # outage, and the rows it was given then were lost. A spool whose directories do not exist yet is fine.
    (tmp_path / 'a-file').write_text('')
    get_settings.cache_clear()
    monkeypatch.setenv('AGENTRT_LEDGER_SPOOL', str(tmp_path / 'a-file' / under))
    try:
        with pytest.raises(ConfigError) as info:
            get_settings()
        monkeypatch.setenv('AGENTRT_LEDGER_SPOOL', str(tmp_path / 'not-yet' / under))
        get_settings.cache_clear()
        assert get_settings().ledger_spool == tmp_path / 'not-yet' / under
    finally:
        get_settings.cache_clear()
    assert f'{tmp_path / "a-file"} is a file, so the spool file cannot be made under it' in str(info.value)


def test_a_spool_whose_name_leaves_no_room_for_its_journals_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A 101-character spool name was accepted, and every journal a killed process left was then claimed under a name
    # holding the spool's name twice: past 255 bytes, each replay failed as an internal error (ENAMETOOLONG).
    longest = 'x' * (SPOOL_NAME_MAX_BYTES - len('.jsonl')) + '.jsonl'
    monkeypatch.setenv('AGENTRT_LEDGER_SPOOL', str(tmp_path / longest))
    assert read_settings().ledger_spool == tmp_path / longest
    for too_long in ('yy' + longest, 'é' * 76):  # bytes, not characters: 76 two-byte letters are 152
        monkeypatch.setenv('AGENTRT_LEDGER_SPOOL', str(tmp_path / too_long))
        with pytest.raises(ConfigError) as info:
            read_settings()
        message = str(info.value)
        assert message.startswith('invalid configuration: AGENTRT_LEDGER_SPOOL:') and '152 bytes long' in message
        assert f'at most {SPOOL_NAME_MAX_BYTES}' in message


@pytest.mark.parametrize('existing', [False, True], ids=['to-be-made', 'existing'])
def test_a_spool_on_a_read_only_mount_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, existing: bool
) -> None:
    # Accepted before: the spool failed only when an outage first needed it, and the rows it was given were then held
    # in the process's memory alone.
    directory = tmp_path / 'ro'
    directory.mkdir(mode=0o700)
    spool = directory / 'spool.jsonl' if existing else directory / 'deeper' / 'spool.jsonl'
    if existing:
        spool.write_text('')
    monkeypatch.setenv('AGENTRT_LEDGER_SPOOL', str(spool))
    with read_only_bind(directory) as mounted:
        if not mounted:
            pytest.skip('bind mounts are not allowed here')
        with pytest.raises(ConfigError) as raised:
            read_settings()
    assert str(raised.value) == (
        f'invalid configuration: AGENTRT_LEDGER_SPOOL: {directory} is on a read-only file system, so the spool file '
        'cannot be written there'
    )
    assert read_settings().ledger_spool == spool  # the same path, writable again


@pytest.mark.parametrize('locked', ['directory', 'file'])
def test_a_spool_this_process_cannot_write_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, locked: str
) -> None:
    # An immutable directory or file stands for one of another user's (a spool made once under `sudo`): root may
    # write anywhere else, but not there.
    directory = tmp_path / 'spool'
    directory.mkdir(mode=0o700)
    spool = directory / 'spool.jsonl'
    spool.write_text('')
    monkeypatch.setenv('AGENTRT_LEDGER_SPOOL', str(spool))
    with immutable(directory if locked == 'directory' else spool) as made:
        if not made:
            pytest.skip('chattr +i is not possible here')
        with pytest.raises(ConfigError) as raised:
            read_settings()
    problem = (
        f'{directory} is not writable by this user, so the spool file cannot be written there'
        if locked == 'directory'
        else f'{spool} is not writable by this user, so no row can be spooled to it'
    )
    assert str(raised.value) == f'invalid configuration: AGENTRT_LEDGER_SPOOL: {problem}'
    assert read_settings().ledger_spool == spool


@pytest.mark.skipif(not Path('/proc/self').is_dir(), reason='no /proc here')
def test_a_spool_where_no_file_can_be_made_is_refused_at_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # /proc is neither read-only nor closed to root by its permission bits, yet no file can be made there: the spool
    # was accepted, and its journal failed during the turn ("FileNotFoundError: ... /proc/x.journal_...").
    monkeypatch.setenv('AGENTRT_LEDGER_SPOOL', '/proc/agentrt-spool.jsonl')
    with pytest.raises(ConfigError) as raised:
        read_settings()
    message = str(raised.value)
    assert message.startswith('invalid configuration: AGENTRT_LEDGER_SPOOL: /proc ') and '\n' not in message
    assert message.endswith('so the spool file cannot be written there')
    # A directory that takes files passes, and the probe file that proved it is gone.
    directory = tmp_path / 'spool'
    directory.mkdir(mode=0o700)
    monkeypatch.setenv('AGENTRT_LEDGER_SPOOL', str(directory / 'spool.jsonl'))
    assert read_settings().ledger_spool == directory / 'spool.jsonl'
    assert list(directory.iterdir()) == []


@pytest.mark.parametrize(
    ('variable', 'value', 'problem'),
    [
        ('AGENTRT_MODEL_TIMEOUT_SECONDS', '0', 'greater than 0'),
        ('AGENTRT_MODEL_TIMEOUT_SECONDS', '-5', 'greater than 0'),
        ('AGENTRT_MODEL_TIMEOUT_SECONDS', 'nan', 'a finite number'),
        ('AGENTRT_MODEL_TIMEOUT_SECONDS', 'inf', 'a finite number'),
        ('AGENTRT_MODEL_TIMEOUT_SECONDS', 'two minutes', 'a valid number'),
        ('AGENTRT_MODEL_MAX_RETRIES', '-1', 'greater than or equal to 0'),
        ('AGENTRT_MODEL_MAX_RETRIES', '1.5', 'a valid integer'),
        ('AGENTRT_STREAM_SEND_TIMEOUT_SECONDS', '0', 'greater than 0'),
        ('AGENTRT_STREAM_SEND_TIMEOUT_SECONDS', '-1', 'greater than 0'),
        ('AGENTRT_STREAM_SEND_TIMEOUT_SECONDS', 'nan', 'a finite number'),
        ('AGENTRT_STREAM_SEND_TIMEOUT_SECONDS', '3601', 'less than or equal to 3600'),
        ('AGENTRT_STREAM_SEND_TIMEOUT_SECONDS', 'half a minute', 'a valid number'),
    ],
)
def test_bad_timeouts_and_retries_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        read_settings()
    assert str(info.value).startswith(f'invalid configuration: {variable}: ') and problem in str(info.value)


def test_model_bounds_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings(_env_file=None).model_timeout_seconds, Settings(_env_file=None).model_max_retries) == (120, 0)
    monkeypatch.setenv('AGENTRT_MODEL_TIMEOUT_SECONDS', '2.5')
    monkeypatch.setenv('AGENTRT_MODEL_MAX_RETRIES', '2')
    assert (read_settings().model_timeout_seconds, read_settings().model_max_retries) == (2.5, 2)


def test_the_stream_send_timeout_reads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).stream_send_timeout_seconds == 30
    monkeypatch.setenv('AGENTRT_STREAM_SEND_TIMEOUT_SECONDS', '2.5')
    assert read_settings().stream_send_timeout_seconds == 2.5


def test_a_dot_env_that_is_not_utf8_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # A `.env` saved in Latin-1 in the working directory: every command was "internal error: UnicodeDecodeError"
    # (exit 70, "report it").
    monkeypatch.chdir(tmp_path)
    (tmp_path / '.env').write_bytes(b'DB_POOL_SIZE=5\nAGENTRT_MODEL=caf\xe9\n')
    with pytest.raises(ConfigError) as raised:
        read_settings()
    assert str(raised.value) == (
        f'invalid configuration: {tmp_path / ".env"} is not UTF-8 text (byte 0xe9 at offset 32): save it as UTF-8, '
        'or remove it'
    )


def test_a_validators_own_words_are_shown_without_pydantics_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # "AGENTRT_LEDGER_SPOOL: Value error, /tmp is not a file": pydantic's "Value error, " in front of the runtime's own
    # message, in a CLI error line and a ConfigError.
    monkeypatch.setenv('AGENTRT_LEDGER_SPOOL', str(tmp_path))
    with pytest.raises(ConfigError) as raised:
        read_settings()
    assert str(raised.value) == (
        f"invalid configuration: AGENTRT_LEDGER_SPOOL: {tmp_path} is not a file (a directory?); give the spool file's "
        'path'
    )


@pytest.mark.parametrize(
    ('variable', 'written', 'field', 'value'),
    [
        ('DB_POOLER', 'PgBouncer', 'pooler', 'pgbouncer'),
        ('AGENTRT_BACKGROUND', ' Queue ', 'background', 'queue'),
        ('AGENTRT_BUDGET_UNPRICED', 'REFUSE', 'budget_unpriced', 'refuse'),
    ],
)
def test_a_choice_is_read_in_any_case(
    monkeypatch: pytest.MonkeyPatch, variable: str, written: str, field: str, value: str
) -> None:
    monkeypatch.setenv(variable, written)
    assert getattr(Settings(_env_file=None), field) == value


def test_a_choice_that_is_none_of_them_is_still_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('DB_POOLER', 'PgPool')
    with pytest.raises(ConfigError, match="DB_POOLER: Input should be 'auto', 'none' or 'pgbouncer'"):
        read_settings()
