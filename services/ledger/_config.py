"""Configuration of the LLM ledger writer, from the runtime's settings: spool, content cap, retries, commit delay."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from agentrt.db.engine import current_settings
from agentrt.db.errors import AgentRuntimeError, ConfigError
from agentrt.db.settings import Settings, default_data_dir, get_settings, parse_database_url, read_settings
from agentrt.services.ledger._retry import RetryPolicy

DEFAULT_CONTENT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_COMMIT_DELAY_MS = 50.0


@dataclass(frozen=True)
class LedgerConfig:
    """Knobs of `LLMRequestTracker`.

    Environment: `AGENTRT_LEDGER_SPOOL` (spool file), `AGENTRT_LEDGER_STORE_CONTENT` (0/1),
    `AGENTRT_LEDGER_CONTENT_MAX_BYTES`, `AGENTRT_LEDGER_RETRY_ATTEMPTS`, `AGENTRT_LEDGER_COMMIT_DELAY_MS`.
    """

    spool_path: Path | None = None
    """The spool file; `None` means `default_spool_path()`, resolved when first needed."""
    store_content: bool = True
    content_max_bytes: int = DEFAULT_CONTENT_MAX_BYTES
    """Cap per stored body (prompt, response, error); longer bodies are cut and flagged `truncated`."""
    max_batch_rows: int = 500
    """Ledger rows per group commit."""
    max_batch_content_bytes: int = 8 * 1024 * 1024
    commit_delay_ms: float = DEFAULT_COMMIT_DELAY_MS
    """How long a ready row may wait for more rows before the writer commits it (PostgreSQL's `commit_delay`, in the
    process): a run's rows go in one transaction when its requests end within it. The run's end, `track_request()`,
    `flush()` and a full batch commit at once. 0: commit each row as soon as it is ready. See `LLMRequestTracker`."""
    journal: bool = True
    """Write the rows the writer holds (for the commit delay, or while it retries) to a journal file beside the spool,
    so a process killed meanwhile loses none of them (`_journal.py`). Off: they are only in memory until committed."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    lock_timeout_ms: int = 2000
    statement_timeout_ms: int = 15000
    replay_check_interval: float = 30.0
    """Seconds between checks for spool files left by other processes or earlier runs; also the longest wait between
    two tries of this process's own spool while the database stays away."""
    replay_retry_seconds: float = 2.0
    """After rows were spooled (the database could not take them), try the spool again this many seconds later, then
    after twice as long each time it still fails (up to `replay_check_interval`), until it is written: an idle process
    does not keep its rows out of the database until its next write."""

    @classmethod
    def from_env(cls) -> LedgerConfig:
        """Build the configuration from the runtime's settings (`AGENTRT_LEDGER_*` variables, `.env`).

        Raises:
            ConfigError: a variable is set to an invalid value (the message names it).
        """
        settings = read_settings()
        return cls(
            spool_path=settings.ledger_spool.expanduser() if settings.ledger_spool else None,
            store_content=settings.ledger_store_content,
            content_max_bytes=settings.ledger_content_max_bytes,
            retry=RetryPolicy(attempts=settings.ledger_retry_attempts),
            commit_delay_ms=settings.ledger_commit_delay_ms,
        )

    @property
    def content_cap(self) -> int | None:
        """The cap per stored body, or None when contents are not stored (rows and spool lines then carry none)."""
        return self.content_max_bytes if self.store_content else None

    def resolved_spool_path(self) -> Path:
        """The configured spool path, or the default one."""
        return self.spool_path or default_spool_path()


def default_spool_path() -> Path:
    """`<data dir>/../ledger-spool/llm-ledger-<database>.jsonl`: beside the embedded PostgreSQL data, never in it.

    The file name carries a fingerprint of the database (server, port, name, user; or the embedded
    data directory), so a spool is only ever replayed into the database its rows were meant for.
    """
    settings: Settings | None
    try:
        settings = current_settings()
    except AgentRuntimeError:
        try:
            settings = get_settings()
        except ConfigError:
            settings = None
    data_dir = Path(settings.data_dir if settings else default_data_dir()).expanduser()
    if settings is not None and settings.database_url:
        url = parse_database_url(settings.database_url)
        identity = f'{url.username}@{url.host or url.query.get("host")}:{url.port or 5432}/{url.database}'
    else:
        identity = f'embedded:{data_dir.resolve()}'
    fingerprint = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return data_dir.parent / 'ledger-spool' / f'llm-ledger-{fingerprint}.jsonl'
