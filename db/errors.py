"""Errors the database layer raises with messages meant for people."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any


class AgentRuntimeError(Exception):
    """Base class of every error the runtime raises on purpose."""


class ConfigError(AgentRuntimeError, ValueError):
    """A configuration value (environment variable, `.env`, CLI flag) is invalid."""


class SchemaBehindError(ConfigError):
    """The database's schema is behind this version's and `AGENTRT_AUTO_MIGRATE=false`: `agentrt db upgrade` first."""


class DatabaseUnavailableError(AgentRuntimeError):
    """PostgreSQL cannot be reached: it refused the connection, is starting up, is full, or no pooled connection
    became free in time; or it gave up on a statement (a lock or statement timeout, an operator's cancel), or aborted
    the transaction in a conflict with a concurrent one (a deadlock, a serialization failure). Nothing of the
    operation was done; running it again normally succeeds once the cause has passed."""


class DatabaseDisconnectedError(DatabaseUnavailableError):
    """The connection to PostgreSQL was lost while an operation used it (server restart, failover, a terminated
    backend). The operation did not complete, or the outcome of its commit is unknown: repeat it only if it is
    safe to repeat (`retry_on_disconnect`). The connection is discarded, never handed out again."""


class RuntimeBusyError(AgentRuntimeError):
    """The process was running as many turns as its event loop keeps up with, and this turn waited its turn longer
    than `AGENTRT_TURN_QUEUE_SECONDS`: it was not started (nothing sent, nothing billed, nothing saved). Send the
    message again shortly, or run more worker processes."""


class ShuttingDownError(RuntimeBusyError):
    """The process began to stop (SIGTERM, Ctrl-C) while this turn waited for admission: it was not started (nothing
    sent, nothing billed, nothing saved). Send the message again (to another worker, or once the server is back)."""


class EmbeddedPostgresError(AgentRuntimeError):
    """The embedded PostgreSQL server could not be initialised or started."""


class MigrationError(AgentRuntimeError):
    """A schema migration failed; the message carries the migration's own error. Migrations run in one transaction,
    so nothing of the failed upgrade was applied."""


class DatabaseNotInitializedError(AgentRuntimeError):
    """`get_db_session()` was used before `init_database()`, or after `shutdown_runtime()`.

    Attributes:
        never_started: nothing tried to start the runtime in this process (no `init_database()`, no
            `agentrt_runtime()`): the program's mistake, which no wait mends. False after a shutdown, or after a start
            that failed (a database that may come back).
    """

    def __init__(self, message: str, *, never_started: bool = False) -> None:
        super().__init__(message)
        self.never_started = never_started


# The classes below are raised above the database layer; they live here, at the bottom of the layers, so any layer
# can raise them. `agentrt.agents.errors` is the documented public list.


class InvalidInputError(AgentRuntimeError, ValueError):
    """Input was refused at the boundary, before any model request or billing (message, id, slug, ...); or data too
    large for PostgreSQL to hold (`field` `value`: a turn's tool result or history, refused as it is saved, nothing
    of it stored).

    Attributes:
        field: the name of the argument or field that was refused.
    """

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field

    @classmethod
    def wrong_type(cls, field: str, expected: str, value: object) -> InvalidInputError:
        """`field must be <expected>, not <the value's type>`."""
        return cls(f'{field} must be {expected}, not {type(value).__name__}', field=field)


def check_seconds(value: object, field: str) -> None:
    """Refuse a duration that is not a finite number of seconds, 0 or more (a NaN or negative one would make a wait
    end at once, an infinite one never).

    Raises:
        InvalidInputError: naming `field`.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError.wrong_type(field, 'a number of seconds', value)
    try:
        finite = math.isfinite(value)
    except OverflowError:  # a whole number past a float's range (`10**400`): raised as it was (QA)
        finite = False
    if not (finite and value >= 0):
        shown = f'{value!r}' if finite or not isinstance(value, int) else 'a whole number past any duration'
        raise InvalidInputError(f'{field} must be a finite number of seconds, 0 or more, not {shown}', field=field)


class TurnLimitExceededError(AgentRuntimeError):
    """A per-turn usage limit (requests, tool calls, tokens) was reached; nothing beyond it was sent."""


class ModelProviderError(AgentRuntimeError):
    """The model provider failed the request (HTTP error, rate limit, dropped connection, corrupt stream).

    Attributes:
        status_code: the HTTP status the provider answered with, or None when there was no answer.
        model_name: the model that was asked.
        body: the provider's error body, with secrets redacted (None when there was none).
    """

    def __init__(
        self, message: str, *, status_code: int | None = None, model_name: str | None = None, body: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.model_name = model_name
        self.body = body


class ModelBehaviorError(AgentRuntimeError):
    """The model's answer could not be used: it kept calling a tool wrongly until the retries ran out, or its output
    was cut off (output token limit) or filtered by the provider. Nothing of the turn was saved.

    Attributes:
        body: what the model sent, when pydantic-ai kept it (None otherwise).
        model_name: the model that was asked, when known (`agentrt serve`'s log line names it).
    """

    def __init__(self, message: str, *, body: str | None = None, model_name: str | None = None) -> None:
        super().__init__(message)
        self.body = body
        self.model_name = model_name


class BudgetExceededError(AgentRuntimeError):
    """The account's budget refused a model request: what it would cost at most does not fit in what is left of the
    limit this period, or the model has no price and `AGENTRT_BUDGET_UNPRICED=refuse`. Nothing was sent; the
    refusal is a ledger row with status `refused` and cost 0.

    Attributes:
        reason: `limit` (the request does not fit) or `unpriced` (the model has no price).
        account_id: the account whose budget refused it.
        limit_usd: the account's limit per period.
        spent_usd: what the period's settled requests cost (None when unknown).
        reserved_usd: what requests in flight hold of it (None when unknown).
        needed_usd: the least this request had to hold (its input and the fewest output tokens it may be given).
        period_start: the start of the period (UTC).
        period_end: when the period ends and the budget starts afresh (UTC).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str = 'limit',
        account_id: int | None = None,
        limit_usd: Decimal | None = None,
        spent_usd: Decimal | None = None,
        reserved_usd: Decimal | None = None,
        needed_usd: Decimal | None = None,
        period_start: datetime | None = None,
        period_end: datetime | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.account_id = account_id
        self.limit_usd = limit_usd
        self.spent_usd = spent_usd
        self.reserved_usd = reserved_usd
        self.needed_usd = needed_usd
        self.period_start = period_start
        self.period_end = period_end


def validation_message(error: Mapping[str, Any], default: str = 'invalid value') -> str:
    """The message of one pydantic validation error (`ValidationError.errors()`) as a person should read it: a
    validator's own words without pydantic's "Value error, " / "Assertion failed, " in front of them."""
    context = error.get('ctx')
    if error.get('type') in ('value_error', 'assertion_error') and isinstance(context, Mapping):
        raised = context.get('error')
        if isinstance(raised, BaseException | str) and str(raised):
            return str(raised)
    return str(error.get('msg') or default)
