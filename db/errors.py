"""Errors the database layer raises with messages meant for people."""


class AgentRuntimeError(Exception):
    """Base class of every error the runtime raises on purpose."""


class ConfigError(AgentRuntimeError, ValueError):
    """A configuration value (environment variable, `.env`, CLI flag) is invalid."""


class DatabaseUnavailableError(AgentRuntimeError):
    """The PostgreSQL server cannot be reached or refused the connection."""


class EmbeddedPostgresError(AgentRuntimeError):
    """The embedded PostgreSQL server could not be initialised or started."""


class DatabaseNotInitializedError(AgentRuntimeError):
    """`get_db_session()` was used before `init_database()`."""
