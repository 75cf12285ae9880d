"""Runtime configuration: one pydantic-settings class read from the environment and an optional `.env`."""

from __future__ import annotations

import errno
import importlib.util
import os
import stat
import tempfile
from contextlib import suppress
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agentrt.db.database_url import mask_url, parse_database_url
from agentrt.db.errors import ConfigError, validation_message

__all__ = ['Settings', 'default_data_dir', 'get_settings', 'mask_url', 'parse_database_url', 'read_settings']

CHARS_PER_TOKEN = 4
"""How the context budget turns text into tokens: the usual rule of thumb for English, without a tokenizer."""
MAX_PG_TIMEOUT_MS = 2**31 - 1
"""The largest `statement_timeout` / `lock_timeout` PostgreSQL takes (milliseconds, a 32-bit int)."""
SPOOL_NAME_MAX_BYTES = 150
"""The longest ledger spool file name: a journal's name adds up to about 100 bytes to it (`<spool>.journal-<host>-<pid>-
<start>-<n>`, a host name up to 64), and file systems take 255."""


def unsafe_directory(directory: Path) -> str | None:
    """What makes `directory` unsafe for private files such as the ledger's spool (another user's, root's aside; or
    writable by its group or by anyone, who could then read, replace or plant files in it), or None when it is not."""
    status = directory.stat()
    if status.st_uid not in (os.geteuid(), 0):
        return f'is owned by another user (uid {status.st_uid})'
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f'is writable by others (mode {stat.S_IMODE(status.st_mode):o})'
    return None


def unwritable_directory(directory: Path) -> str | None:
    """Why this process cannot make or write files in `directory` (a read-only file system; permissions), or None."""
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        return 'is on a read-only file system'
    if not os.access(directory, os.W_OK | os.X_OK):
        return 'is not writable by this user'
    return None


def spool_write_problem(path: Path) -> str | None:
    """Why this process could not make or append to the spool file `path`, or None: a file where a directory of its
    path goes; its directory (or the nearest one that exists) on a read-only file system, not writable by this user,
    or refusing a probe file made there (`/proc`), where the spool and the journals beside it are made; the file
    itself not writable.

    Raises:
        OSError: the path cannot even be looked at (a name too long, a directory this user may not enter).
    """
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f'{ancestor} is a file, so the spool file cannot be made under it'
    if (unwritable := unwritable_directory(ancestor)) is not None:
        return f'{ancestor} {unwritable}, so the spool file cannot be written there'
    if (refused := _refused_file(ancestor, path.name)) is not None:
        return f'{ancestor} refused a file made in it ({refused}), so the spool file cannot be written there'
    if path.exists() and not os.access(path, os.W_OK):
        return f'{path} is not writable by this user, so no row can be spooled to it'
    return None


def _refused_file(directory: Path, name: str) -> str | None:
    """Why a file named after `name` could not be made and written in `directory`, tried with a probe file removed at
    once, or None. Permission bits and mount flags do not tell it all: root may write in `/proc` by them, whose files
    cannot be made (the spool's journals failed there during the turn, after the start's check had passed)."""
    try:
        descriptor, probe = tempfile.mkstemp(prefix=f'.{name}.probe-', dir=directory)
    except OSError as exc:
        return _unless_full(exc)
    try:
        os.write(descriptor, b'\n')
    except OSError as exc:
        return _unless_full(exc)
    finally:
        os.close(descriptor)
        with suppress(OSError):
            os.unlink(probe)
    return None


def _unless_full(exc: OSError) -> str | None:
    """An error of the probe file as said, or None for a full disk: the spool takes rows again once there is room,
    and until then holds them in memory, so a full disk at start is no reason to refuse it."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return None
    return exc.strerror or str(exc)


def default_data_dir() -> Path:
    """Where the embedded PostgreSQL keeps its data when `AGENTRT_DATA_DIR` is not set."""
    return Path(platformdirs.user_data_dir('agentrt')) / 'pgdata'


class Settings(BaseSettings):
    """Every knob of the runtime. Environment variable names are given in each field's alias."""

    # Inputs stay out of validation errors: a URL too malformed to mask (`u:pw@host/db`, no scheme) was quoted
    # whole in the ValidationError that `--debug` prints chained under the ConfigError.
    # Not NaN or infinity: `DB_POOL_TIMEOUT=nan` failed every bound and was reported as "less than or equal to 3600".
    model_config = SettingsConfigDict(
        env_file='.env', extra='ignore', populate_by_name=True, hide_input_in_errors=True, allow_inf_nan=False
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment and `.env` by their documented names only. `populate_by_name` (so code can write
        `Settings(pool_size=5)`) made pydantic-settings read each field's own name from them too, in any case:
        `MODEL`, `DATA_DIR`, `POOL_SIZE` and 54 more changed the runtime, and a `POOL_SIZE=0` was reported as
        `DB_POOL_SIZE` (QA)."""
        return init_settings, _DocumentedNames(env_settings), _DocumentedNames(dotenv_settings), file_secret_settings

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices('DATABASE_URL', 'database_url'),
        description='PostgreSQL URL; unset starts the embedded server.',
    )
    pool_size: int = Field(default=10, ge=1, le=1000, validation_alias=AliasChoices('DB_POOL_SIZE', 'pool_size'))
    max_overflow: int = Field(
        default=10, ge=0, le=1000, validation_alias=AliasChoices('DB_MAX_OVERFLOW', 'max_overflow')
    )
    pool_timeout: float = Field(
        default=30.0, gt=0, le=3600, validation_alias=AliasChoices('DB_POOL_TIMEOUT', 'pool_timeout')
    )
    pool_pre_ping: bool = Field(default=True, validation_alias=AliasChoices('DB_POOL_PRE_PING', 'pool_pre_ping'))
    pool_pre_ping_idle: float = Field(
        default=5.0,
        ge=0,
        le=86_400,
        validation_alias=AliasChoices('DB_POOL_PRE_PING_IDLE', 'pool_pre_ping_idle'),
        description='seconds; with pre-ping on, only connections idle longer than this are tested (0: every checkout)',
    )
    pool_recycle: int = Field(
        default=1800, ge=-1, validation_alias=AliasChoices('DB_POOL_RECYCLE', 'pool_recycle'), description='seconds'
    )
    statement_cache: bool = Field(
        default=True,
        validation_alias=AliasChoices('DB_STATEMENT_CACHE', 'statement_cache'),
        description='false behind PgBouncer in transaction mode (prepared statements do not survive it)',
    )
    pooler: Literal['auto', 'none', 'pgbouncer'] = Field(
        default='auto',
        validation_alias=AliasChoices('DB_POOLER', 'pooler'),
        description='pgbouncer: a pooler in transaction mode is between the runtime and PostgreSQL (statement caches '
        'off, timeouts set per transaction, nothing kept in the session); auto: switch to it when PgBouncer is '
        'detected at connect; none: connect directly',
    )
    migration_database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices('DATABASE_MIGRATION_URL', 'migration_database_url'),
        description='a direct PostgreSQL URL for migrations when DATABASE_URL points at a pooler',
    )
    connect_timeout: float = Field(
        default=10.0, gt=0, le=600, validation_alias=AliasChoices('DB_CONNECT_TIMEOUT', 'connect_timeout')
    )
    # At most PostgreSQL's own maximum (INT_MAX ms, about 24.8 days): the server refused a larger one at the first
    # connection, which was reported as the database being unreachable (exit 3) rather than as this setting.
    statement_timeout_ms: int = Field(
        default=30_000,
        ge=0,
        le=MAX_PG_TIMEOUT_MS,
        validation_alias=AliasChoices('DB_STATEMENT_TIMEOUT_MS', 'statement_timeout_ms'),
    )
    lock_timeout_ms: int = Field(
        default=10_000,
        ge=0,
        le=MAX_PG_TIMEOUT_MS,
        validation_alias=AliasChoices('DB_LOCK_TIMEOUT_MS', 'lock_timeout_ms'),
    )
    data_dir: Path = Field(
        default_factory=default_data_dir, validation_alias=AliasChoices('AGENTRT_DATA_DIR', 'data_dir')
    )
    model: str = Field(default='demo', min_length=1, validation_alias=AliasChoices('AGENTRT_MODEL', 'model'))
    auto_migrate: bool = Field(default=True, validation_alias=AliasChoices('AGENTRT_AUTO_MIGRATE', 'auto_migrate'))
    # Applied to the models the runtime builds from a model string (agents/model_resolution.py), never to a `Model`
    # object or to settings a caller passed (an agent's or a run's `model_settings` win over them).
    model_timeout_seconds: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        validation_alias=AliasChoices('AGENTRT_MODEL_TIMEOUT_SECONDS', 'model_timeout_seconds'),
        description='the longest a model request waits for the next byte from the provider (a plain answer arrives '
        'whole, so there it bounds the whole answer; a stream may last longer as long as it keeps sending)',
    )
    model_max_retries: int = Field(
        default=0,
        ge=0,
        le=10,
        validation_alias=AliasChoices('AGENTRT_MODEL_MAX_RETRIES', 'model_max_retries'),
        description="how many times the provider's SDK repeats a failed request (a timeout, a lost connection, HTTP "
        '408/409/429/5xx) by itself, unseen by the ledger (0: one request is one HTTP request)',
    )
    # The LLM ledger (services/ledger/_config.py turns these into the tracker's configuration).
    ledger_spool: Path | None = Field(
        default=None,
        validation_alias=AliasChoices('AGENTRT_LEDGER_SPOOL', 'ledger_spool'),
        description='spool file for ledger rows written while the database is unreachable',
    )
    ledger_store_content: bool = Field(
        default=True, validation_alias=AliasChoices('AGENTRT_LEDGER_STORE_CONTENT', 'ledger_store_content')
    )
    ledger_content_max_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        validation_alias=AliasChoices('AGENTRT_LEDGER_CONTENT_MAX_BYTES', 'ledger_content_max_bytes'),
    )
    ledger_retry_attempts: int = Field(
        default=8, ge=1, le=100, validation_alias=AliasChoices('AGENTRT_LEDGER_RETRY_ATTEMPTS', 'ledger_retry_attempts')
    )
    ledger_commit_delay_ms: float = Field(
        default=50,
        ge=0,
        le=5000,
        validation_alias=AliasChoices('AGENTRT_LEDGER_COMMIT_DELAY_MS', 'ledger_commit_delay_ms'),
        description='how long the ledger writer waits for more rows before it commits a ready one (0: at once)',
    )

    # Conversations (agents/turn_limits.py, agents/turn_input.py, services/conversations/_context.py). The
    # limits apply to one turn, not to the conversation's lifetime usage, which stays on the conversation record.
    turn_request_limit: int = Field(
        default=20,
        ge=1,
        le=10_000,
        validation_alias=AliasChoices('AGENTRT_TURN_REQUEST_LIMIT', 'turn_request_limit'),
        description='model requests one turn may send',
    )
    turn_tool_calls_limit: int = Field(
        default=60,
        ge=0,
        le=100_000,
        validation_alias=AliasChoices('AGENTRT_TURN_TOOL_CALLS_LIMIT', 'turn_tool_calls_limit'),
        description='tool calls one turn may run',
    )
    turn_total_tokens_limit: int = Field(
        default=400_000,
        ge=1,
        validation_alias=AliasChoices('AGENTRT_TURN_TOTAL_TOKENS_LIMIT', 'turn_total_tokens_limit'),
        description='input plus output tokens over all requests of one turn',
    )
    turn_lease_seconds: float = Field(
        default=60.0,
        ge=3,
        le=3600,
        validation_alias=AliasChoices('AGENTRT_TURN_LEASE_SECONDS', 'turn_lease_seconds'),
        description='how long a crashed turn keeps its conversation (a running turn renews its claim)',
    )
    turn_check_seconds: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        validation_alias=AliasChoices('AGENTRT_TURN_CHECK_SECONDS', 'turn_check_seconds'),
        description='before a model request, a turn checks that its conversation is still its own once this long '
        'passed since it last knew (0: before every request)',
    )
    turn_admission_lag_ms: float = Field(
        default=20.0,
        ge=0,
        le=10_000,
        validation_alias=AliasChoices('AGENTRT_TURN_ADMISSION_LAG_MS', 'turn_admission_lag_ms'),
        description='the cap on turns running at once in a process shrinks while the event loop is later than this, '
        'and grows while turns wait and it is within half of it; a turn over the cap waits holding no connection '
        '(0: no cap)',
    )
    turn_queue_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        validation_alias=AliasChoices('AGENTRT_TURN_QUEUE_SECONDS', 'turn_queue_seconds'),
        description='the longest a turn waits to start before RuntimeBusyError',
    )
    context_max_tokens: int = Field(
        default=16_000,
        ge=500,
        le=10_000_000,
        validation_alias=AliasChoices('AGENTRT_CONTEXT_MAX_TOKENS', 'context_max_tokens'),
        description='estimated tokens of history sent with a request (4 characters a token)',
    )
    message_max_chars: int = Field(
        default=32_000,
        ge=1,
        le=10_000_000,
        validation_alias=AliasChoices('AGENTRT_MESSAGE_MAX_CHARS', 'message_max_chars'),
        description='longest chat message accepted, in characters',
    )

    summary_every_turns: int = Field(
        default=5,
        ge=1,
        le=100_000,
        validation_alias=AliasChoices('AGENTRT_SUMMARY_EVERY_TURNS', 'summary_every_turns'),
        description="a conversation's title and summary are refreshed after its first turn, then every this many turns",
    )
    summary_every_tokens: int = Field(
        default=8_000,
        ge=1,
        le=10_000_000,
        validation_alias=AliasChoices('AGENTRT_SUMMARY_EVERY_TOKENS', 'summary_every_tokens'),
        description='or once the conversation grew by this many estimated tokens since its last summary',
    )
    usage_rollup_seconds: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        validation_alias=AliasChoices('AGENTRT_USAGE_ROLLUP_SECONDS', 'usage_rollup_seconds'),
        description="the daily usage rollup takes an account's new ledger rows at most this often (0: after every "
        'turn); the last turn is rolled up at the end of the interval',
    )

    # Background work after a turn (services/post_turn.py; the queue: services/jobs/).
    background: Literal['inline', 'queue'] = Field(
        default='inline',
        validation_alias=AliasChoices('AGENTRT_BACKGROUND', 'background'),
        description='inline: titles, summaries and usage rollups run in the process that ran the turn; queue: they '
        'are durable jobs in PostgreSQL (procrastinate) that `agentrt worker` processes run',
    )
    queue_database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices('AGENTRT_QUEUE_DATABASE_URL', 'queue_database_url'),
        description="the queue's connection (a direct one, for LISTEN/NOTIFY, when DATABASE_URL points at a "
        'transaction pooler; default DATABASE_URL)',
    )
    jobs_heartbeat_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        validation_alias=AliasChoices('AGENTRT_JOBS_HEARTBEAT_SECONDS', 'jobs_heartbeat_seconds'),
        description='how often a worker tells PostgreSQL it is alive',
    )
    jobs_stalled_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        validation_alias=AliasChoices('AGENTRT_JOBS_STALLED_SECONDS', 'jobs_stalled_seconds'),
        description='a running job whose worker sent no heartbeat for this long (it died) is run again by another',
    )
    jobs_shutdown_seconds: float = Field(
        default=20.0,
        ge=0,
        le=86_400,
        validation_alias=AliasChoices('AGENTRT_JOBS_SHUTDOWN_SECONDS', 'jobs_shutdown_seconds'),
        description='a worker asked to stop (SIGTERM, Ctrl-C) lets its running jobs finish this long, then puts the '
        'rest back in the queue for the next worker (under the 30 s Kubernetes gives a pod by default)',
    )
    jobs_outage_seconds: float = Field(
        default=120.0,
        ge=0,
        le=86_400,
        validation_alias=AliasChoices('AGENTRT_JOBS_OUTAGE_SECONDS', 'jobs_outage_seconds'),
        description='a worker that loses the job queue (PostgreSQL restarted, a failover) waits this long for it to '
        'come back, then takes jobs again; longer, it exits with code 3 (0: at once)',
    )
    jobs_reconcile_after_seconds: float = Field(
        default=120.0,
        ge=0,
        le=86_400,
        validation_alias=AliasChoices('AGENTRT_JOBS_RECONCILE_AFTER_SECONDS', 'jobs_reconcile_after_seconds'),
        description='the reconcile task queues the title and summary of a conversation left without them this long',
    )
    jobs_keep_failed_days: int = Field(
        default=7,
        ge=0,
        le=3650,
        validation_alias=AliasChoices('AGENTRT_JOBS_KEEP_FAILED_DAYS', 'jobs_keep_failed_days'),
        description="a job that failed every attempt stays in procrastinate's table this many days, to be looked at, "
        'then the reconcile task deletes it (0: kept until deleted by hand)',
    )

    @model_validator(mode='after')
    def _check_turn_within_lease(self) -> Settings:
        # A claim confirmed less than a lease ago cannot have expired: a shorter check interval misses no takeover.
        if self.turn_check_seconds > self.turn_lease_seconds:
            raise ConfigError(
                f'AGENTRT_TURN_CHECK_SECONDS ({self.turn_check_seconds:g}) must not exceed AGENTRT_TURN_LEASE_SECONDS '
                f'({self.turn_lease_seconds:g})'
            )
        return self

    @model_validator(mode='after')
    def _heartbeat_within_stall(self) -> Settings:
        # A worker silent for AGENTRT_JOBS_STALLED_SECONDS is taken for dead: a slower heartbeat than that had live
        # workers' jobs run a second time by others, every time.
        if self.jobs_heartbeat_seconds >= self.jobs_stalled_seconds:
            raise ConfigError(
                f'AGENTRT_JOBS_HEARTBEAT_SECONDS ({self.jobs_heartbeat_seconds:g}) must be less than '
                f'AGENTRT_JOBS_STALLED_SECONDS ({self.jobs_stalled_seconds:g})'
            )
        return self

    @model_validator(mode='after')
    def _queue_is_installed(self) -> Settings:
        if self.background == 'queue' and importlib.util.find_spec('procrastinate') is None:
            raise ConfigError(
                "AGENTRT_BACKGROUND=queue needs the queue extra: pip install -e '.[queue]' in a clone of agentrt, "
                "pip install 'agentrt[queue]' where it was installed as a package"
            )
        return self

    @model_validator(mode='after')
    def _message_fits_the_context(self) -> Settings:
        # The turn being answered is always sent whole: a message the budget cannot hold would overflow it alone.
        if self.message_max_chars > self.context_max_tokens * CHARS_PER_TOKEN:
            raise ConfigError(
                f'AGENTRT_MESSAGE_MAX_CHARS ({self.message_max_chars}) must fit in AGENTRT_CONTEXT_MAX_TOKENS '
                f'({self.context_max_tokens} tokens, {CHARS_PER_TOKEN} characters each)'
            )
        return self

    # The HTTP API (agentrt.api, `agentrt serve`).
    api_key_cache_seconds: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        validation_alias=AliasChoices('AGENTRT_API_KEY_CACHE_SECONDS', 'api_key_cache_seconds'),
        description='seconds a server process trusts a checked API key before reading it again (0: every request); '
        'a revoked key stops working within this time',
    )
    http_max_body_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        le=1024**3,
        validation_alias=AliasChoices('AGENTRT_HTTP_MAX_BODY_BYTES', 'http_max_body_bytes'),
        description='largest HTTP request body accepted (413 beyond it)',
    )
    http_max_header_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        le=1024 * 1024,
        validation_alias=AliasChoices('AGENTRT_HTTP_MAX_HEADER_BYTES', 'http_max_header_bytes'),
        description='largest request line and headers `agentrt serve` reads (431 beyond it, or beyond 100 headers)',
    )
    http_body_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        validation_alias=AliasChoices('AGENTRT_HTTP_BODY_TIMEOUT_SECONDS', 'http_body_timeout_seconds'),
        description='a request whose body stops arriving (nothing of it for this long), or averages less than 500 '
        'bytes a second once this long has passed, is answered 408 and its connection closed, so a client that sends '
        'headers and no body, or a byte now and then, does not hold the connection for ever',
    )
    http_stream_keepalive_seconds: float = Field(
        default=15.0,
        ge=0,
        le=3600,
        validation_alias=AliasChoices('AGENTRT_HTTP_STREAM_KEEPALIVE_SECONDS', 'http_stream_keepalive_seconds'),
        description='a streamed turn (server-sent events) that sent nothing for this long sends a `: keepalive` '
        'comment, which SSE parsers ignore, so clients and idle-timeout proxies see the connection alive (0: never)',
    )
    stream_send_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        validation_alias=AliasChoices('AGENTRT_STREAM_SEND_TIMEOUT_SECONDS', 'stream_send_timeout_seconds'),
        description='a streamed turn whose client reads nothing for this long (a piece of the stream, or a keepalive, '
        'cannot be sent) is ended as a hang-up ends it: the run cancelled, nothing saved, the conversation released',
    )
    http_web_ui: bool = Field(
        default=True,
        validation_alias=AliasChoices('AGENTRT_HTTP_WEB_UI', 'http_web_ui'),
        description='`agentrt serve` serves the web UI at `/` (false: the API only)',
    )

    # Budgets (agentrt.services.budgets, reserved by the ledger capability before every model request).
    budgets: bool = Field(
        default=True,
        validation_alias=AliasChoices('AGENTRT_BUDGETS', 'budgets'),
        description='reserve against the account budget before every model request (off: no reservation and no '
        'refusal in this process; what its requests cost still counts against the budget)',
    )
    budget_unpriced: Literal['count', 'refuse'] = Field(
        default='refuse',
        validation_alias=AliasChoices('AGENTRT_BUDGET_UNPRICED', 'budget_unpriced'),
        description='a model without a price for an account with a budget: refuse the request, or count it (its '
        'tokens are counted, it costs 0 against the limit)',
    )
    budget_max_output_tokens: int = Field(
        default=16_384,
        ge=1,
        le=10_000_000,
        validation_alias=AliasChoices('AGENTRT_BUDGET_MAX_OUTPUT_TOKENS', 'budget_max_output_tokens'),
        description='output tokens reserved (and set as max_tokens) for a request whose settings set none',
    )
    budget_min_output_tokens: int = Field(
        default=256,
        ge=1,
        le=10_000_000,
        validation_alias=AliasChoices('AGENTRT_BUDGET_MIN_OUTPUT_TOKENS', 'budget_min_output_tokens'),
        description='fewest output tokens a request near the limit is given; a request that cannot afford them is '
        'refused',
    )
    budget_reservation_ttl_seconds: float = Field(
        default=900.0,
        ge=10,
        le=7 * 24 * 3600,
        validation_alias=AliasChoices('AGENTRT_BUDGET_RESERVATION_TTL_SECONDS', 'budget_reservation_ttl_seconds'),
        description='how long a hold lasts unrenewed when its process cannot be checked (another host); a request '
        'in flight renews its hold every third of it',
    )
    budget_sweep_interval_seconds: float = Field(
        default=60.0,
        ge=1,
        le=86_400,
        validation_alias=AliasChoices('AGENTRT_BUDGET_SWEEP_INTERVAL_SECONDS', 'budget_sweep_interval_seconds'),
        description='how often a process releases the holds of dead processes and expired ones (in the background)',
    )
    budget_count_tokens: bool = Field(
        default=True,
        validation_alias=AliasChoices('AGENTRT_BUDGET_COUNT_TOKENS', 'budget_count_tokens'),
        description="count a request's input tokens with the provider (Model.count_tokens) where the model "
        'supports it, one extra provider call per request; otherwise the UTF-8 size of the request bounds them',
    )

    @model_validator(mode='after')
    def _min_output_within_max(self) -> Settings:
        # Admission gives a request without max_tokens at most the maximum: a larger minimum was silently cut to it.
        if self.budget_min_output_tokens > self.budget_max_output_tokens:
            raise ConfigError(
                f'AGENTRT_BUDGET_MIN_OUTPUT_TOKENS ({self.budget_min_output_tokens}) must not exceed '
                f'AGENTRT_BUDGET_MAX_OUTPUT_TOKENS ({self.budget_max_output_tokens})'
            )
        return self

    @model_validator(mode='after')
    def _migration_url_beside_a_database_url(self) -> Settings:
        # Without DATABASE_URL the runtime's database is the embedded server's: `agentrt db upgrade` migrated the
        # other database and said it was done, while the runtime's own stayed unmigrated (and `agentrt chat` said to
        # run `db upgrade`: a loop).
        if self.migration_database_url is not None and self.database_url is None:
            raise ConfigError(
                'DATABASE_MIGRATION_URL is set but DATABASE_URL is not: it is the direct connection migrations take '
                'when DATABASE_URL points at a pooler, and without DATABASE_URL the runtime uses its embedded '
                'PostgreSQL, which it migrates itself; unset DATABASE_MIGRATION_URL, or set DATABASE_URL to the '
                'database it names'
            )
        return self

    @field_validator('ledger_spool')
    @classmethod
    def _spool_is_a_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return value
        path = value.expanduser()
        try:
            exists, parent_is_dir = path.exists(), path.parent.is_dir()
        except OSError as exc:  # a name too long (ENAMETOOLONG), a component that is a file (ENOTDIR): was a crash
            raise ValueError(f'the path cannot be used: {exc.strerror or exc}') from None
        if exists and not path.is_file():
            raise ValueError(f"{value} is not a file (a directory?); give the spool file's path")
        if (length := len(os.fsencode(path.name))) > SPOOL_NAME_MAX_BYTES:
            raise ValueError(
                f'its file name is {length} bytes long, and at most {SPOOL_NAME_MAX_BYTES} leave room for the files '
                "made beside it (a journal per process, named for the process's host; a replay's claimed files) in a "
                "file system's 255-byte names; give it a shorter name"
            )
        # Made (or written) when first needed, during an outage: refused now if it never can be, when the rows it was
        # given would be held only in the process's memory.
        try:
            problem = spool_write_problem(path)
        except OSError as exc:  # an ancestor this user may not look into
            raise ValueError(f'the path cannot be used: {exc.strerror or exc}') from None
        if problem is not None:
            raise ValueError(problem)
        # Checked here, at start, as well as by the spool when it writes: then, during an outage, it is too late.
        if parent_is_dir and (problem := unsafe_directory(path.parent)) is not None:
            raise ValueError(
                f'its directory {path.parent} {problem}, so others could read, replace or plant spooled rows; give a '
                'spool file in a directory of your own, or make that one owner-only (chmod 700)'
            )
        return value

    @field_validator('pool_recycle')
    @classmethod
    def _recycle_is_never_or_seconds(cls, value: int) -> int:
        # 0 is taken by SQLAlchemy as "older than 0 s": every checkout replaced its connection (twice the latency of a
        # turn, QA), which no one asks for.
        if value == 0:
            raise ValueError(
                '0 would replace the connection at every checkout: give seconds (1 or more), or -1 for never'
            )
        return value

    @field_validator('ledger_spool', mode='before')
    @classmethod
    def _blank_spool_is_the_default(cls, value: object) -> object:
        # As a blank data directory is the default one: `AGENTRT_LEDGER_SPOOL=` was Path(''), refused as ". is not a
        # file", and a blank of spaces was a file named ' ' in the working directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator('pooler', 'background', 'budget_unpriced', mode='before')
    @classmethod
    def _choice_in_any_case(cls, value: object) -> object:
        # `DB_POOLER=PgBouncer` or `AGENTRT_BACKGROUND=Queue ` names a choice as plainly as the lower-case word does
        # (QA); spelling it in the words the error lists is busywork, not a safeguard.
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator('data_dir', mode='before')
    @classmethod
    def _blank_data_dir_is_the_default(cls, value: object) -> object:
        # As a blank URL is no URL: `AGENTRT_DATA_DIR=` was Path(''), the working directory, where initdb failed
        # (or, in an empty one, made a cluster).
        return default_data_dir() if isinstance(value, str) and not value.strip() else value

    @field_validator('database_url', 'migration_database_url', 'queue_database_url')
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_database_url(value)
        return value.strip()

    @property
    def pooled(self) -> bool:
        """True in pooler mode (`DB_POOLER=pgbouncer`, or `auto` once PgBouncer was detected)."""
        return self.pooler == 'pgbouncer'

    @property
    def uses_embedded(self) -> bool:
        """True when no `DATABASE_URL` is configured and the embedded server is used."""
        return self.database_url is None


class _DocumentedNames(PydanticBaseSettingsSource):
    """A source's values read under a documented variable name (each field's upper-case alias), not its field name."""

    def __init__(self, source: PydanticBaseSettingsSource) -> None:
        super().__init__(source.settings_cls)
        self._source = source

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        return {name: value for name, value in self._source().items() if name.isupper()}


def read_settings() -> Settings:
    """Read the settings from the environment and `.env` now.

    Raises:
        ConfigError: with the name of every invalid variable.
    """
    try:
        return Settings()
    except ValidationError as exc:
        problems = '; '.join(_describe(err) for err in exc.errors())
        raise ConfigError(f'invalid configuration: {problems}') from exc
    except UnicodeDecodeError as exc:  # the environment is text already: only `.env` is decoded here
        # Was an internal error (exit 70): "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff ...".
        raise ConfigError(
            f'invalid configuration: {_env_file()} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset '
            f'{exc.start}): save it as UTF-8, or remove it'
        ) from exc
    except OSError as exc:
        raise ConfigError(f'invalid configuration: {_env_file()} cannot be read: {exc.strerror or exc}') from exc


def _env_file() -> Path:
    """The `.env` file the settings read (in the working directory), for error messages."""
    return Path.cwd() / str(Settings.model_config.get('env_file') or '.env')


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the settings once per process (see `read_settings`)."""
    return read_settings()


def _describe(err: ErrorDetails) -> str:
    field = str(err['loc'][0]) if err.get('loc') else '?'
    env_name = _ENV_NAMES.get(field, field)
    message = validation_message(err)
    context = err.get('ctx')
    if isinstance(context, dict) and isinstance(context.get('error'), ConfigError):
        text = str(context['error'])
        # `parse_database_url` names DATABASE_URL; the same checks run on the migration and queue URLs.
        if text.startswith('DATABASE_URL') and env_name != 'DATABASE_URL':
            text = f'{env_name}{text.removeprefix("DATABASE_URL")}'
        return text
    return f'{env_name}: {message}'


_ENV_NAMES = {
    name: next(choice for choice in field.validation_alias.choices if choice.isupper())  # type: ignore[union-attr]
    for name, field in Settings.model_fields.items()
}
