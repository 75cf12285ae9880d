"""Errors over HTTP, in one place: which status each error gets and what the client may read of it.

A client reads a message meant for it and an error id; the log line with that id holds the whole story (the
exception, its text, the traceback). Nothing internal reaches the client: not an SQL statement, a host name, a
provider's error body or a stack. The same mapping serves JSON responses (`install_error_handlers`, in
`error_handlers.py`) and the error event of a streamed chat (`public_error`).

Body of every error response: `{"detail": <message or a list of field errors>, "type": <kind>, "error_id": <id>}`,
plus `"field"` when one input is to blame. A budget's refusal (429, `budget_exceeded`) adds its figures: `reason`,
`limit_usd`, `spent_usd`, `reserved_usd`, `needed_usd` (decimal strings) and `period_end`.

Secrets: a client's message goes through `redact_text` (the ledger's redaction) before it is sent, and the log lines
of `agentrt.api` (the exception's text and its traceback, the provider's error chained in it) are redacted by the
runtime's log filter (`agentrt.services.log_redaction`), installed when this module is imported.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import TypeAdapter
from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelAuthenticationError,
    ModelNotFoundError,
    ModelQuotaExceededError,
    ModelRateLimitError,
    ModelRequestTimeout,
    ModelTimeoutError,
    UnexpectedModelBehavior,
    UsageLimitExceeded,
    UserError,
)
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.requests import ClientDisconnect

from agentrt.agents.errors import (
    AgentRuntimeError,
    BudgetExceededError,
    ConcurrentTurnError,
    ConfigError,
    DatabaseDisconnectedError,
    DatabaseNotInitializedError,
    DatabaseUnavailableError,
    EmbeddedPostgresError,
    InvalidInputError,
    ModelBehaviorError,
    ModelProviderError,
    RuntimeBusyError,
    ShuttingDownError,
    TurnLimitExceededError,
    UnknownTenantError,
)
from agentrt.agents.run_errors import provider_wait
from agentrt.api.schemas import decimal_text
from agentrt.db.failures import cannot_connect, disk_full, lost_connection, pool_exhausted
from agentrt.services.ledger import RollupCannotAnswer
from agentrt.services.ledger.redaction import redact_text
from agentrt.services.log_redaction import install_log_redaction, loggable

logger = logging.getLogger('agentrt.api')
install_log_redaction()

_MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class PublicError:
    """What a client is told about an error: an HTTP status, a kind, a message for people, and the id to look for."""

    status: int
    type: str
    message: str
    error_id: str
    field: str | None = None
    extra: dict[str, Any] = dataclass_field(default_factory=dict)
    """More of the error a client may act on (a budget's figures), JSON-ready."""
    retry_after_s: int | None = None
    """When the provider asked to be called again (a rate limit's `Retry-After`), for the response's own header."""

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        body: dict[str, Any] = {'detail': self.message, 'type': self.type, 'error_id': self.error_id}
        if self.field is not None:
            body['field'] = self.field
        body.update(self.extra)
        return body

    def headers(self) -> dict[str, str] | None:
        """The headers the error response carries: the scheme a 401 asks for, when a 503 or a refused turn (409
        `concurrent_turn`) may be tried again."""
        if self.status == 401:
            return {'WWW-Authenticate': 'Bearer'}
        retry_after = _RETRY_AFTER_S.get(self.type) if self.status in (409, 503) else self.retry_after_s
        return None if retry_after is None else {'Retry-After': str(retry_after)}

    def stream_text(self) -> str:
        """The message with its id, for the error event of a streamed chat."""
        return f'{self.message} (error id {self.error_id})'


class ApiError(Exception):
    """Raised by routes for an outcome with a fixed status: `raise ApiError(404, 'not_found', 'no such ...')`."""

    def __init__(self, status: int, type_: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.field = field


def new_error_id() -> str:
    """A short random id that ties what the client saw to the log line."""
    return 'err_' + uuid.uuid4().hex[:16]


def public_error(exc: BaseException, *, where: str = '') -> PublicError:
    """Map an exception to what the client may see, and log it under a new error id.

    Client errors (4xx) are logged at INFO with their message; a busy refusal (503 `busy`: turns or the pool at
    capacity, an expected and documented answer), a request the shutdown stopped (503 `shutting_down`), PostgreSQL
    away (503 `database_unavailable` for a connection that could not be made or was lost, or its disk full: each turn
    through an outage says so) and a model provider's or a model's failure (502: the ledger row holds the rest) at
    WARNING in one line;
    everything else at ERROR with the traceback.

    Args:
        exc: the exception.
        where: what was being done (method and path), for the log line.
    """
    error_id = new_error_id()
    status, type_, message, field_name = _classify(exc)
    where = loggable(where)
    if type_ in _ONE_LINE or _outage(exc):  # where it was raised says nothing the message does not: a traceback each
        # buried real errors (an outage of 10 s: 367 turns refused, 23,000 lines)
        logger.warning(
            '%s %s %d %s: %s %s', error_id, where, status, type_, type(exc).__name__, loggable(_short(str(exc)))
        )
    elif type_ in _NOT_OURS:  # the provider's or the model's failure, not a bug of the server's: no traceback
        model = getattr(exc, 'model_name', None)
        logger.warning(
            '%s %s %d %s: %s (model %s): %s',
            error_id,
            where,
            status,
            type_,
            type(exc).__name__,
            loggable(model or 'unknown'),  # the operator's text (AGENTRT_MODEL): a newline in it forged a line
            loggable(client_text(str(exc))),
        )
    elif status >= 500:
        # The exception's text is escaped as the rest (a newline in it forged a line); the traceback follows it.
        logger.error(
            '%s %s %d %s: %s %s',
            error_id,
            where,
            status,
            type_,
            type(exc).__name__,
            loggable(_short(str(exc))),
            exc_info=exc,
        )
    else:
        logger.info('%s %s %d %s: %s', error_id, where, status, type_, loggable(_short(str(exc) or message)))
    extra = _budget_figures(exc) if isinstance(exc, BudgetExceededError) else {}
    # The field is the client's own words too (a key of its body, as sent): redacted as its message is.
    shown_field = client_text(field_name) if field_name is not None else None
    return PublicError(
        status,
        type_,
        client_text(message),
        error_id,
        shown_field,
        extra,
        _provider_retry_after(exc) if status == 502 else None,
    )


def _provider_retry_after(exc: BaseException) -> int | None:
    """The whole seconds a rate-limiting provider asked to wait (its `Retry-After`), or None: the 502 says it in a
    header too, as the 409 and 503 say theirs, so a client need not read it out of the text."""
    cause = exc if isinstance(exc, ModelAPIError) else exc.__cause__
    retry_after = provider_wait(cause) if isinstance(cause, ModelAPIError) else None
    return math.ceil(retry_after) if isinstance(retry_after, int | float) and retry_after > 0 else None


def _outage(exc: BaseException) -> bool:
    """Whether `exc` says PostgreSQL (or the pooler in front of it) is away: no connection could be made, or the one
    in use was lost. A lock or statement timeout, a deadlock, is not: where it happened is worth its traceback."""
    if not isinstance(exc, DatabaseUnavailableError):
        return False
    return (
        isinstance(exc, DatabaseDisconnectedError)
        or cannot_connect(exc)
        or lost_connection(exc)
        or disk_full(exc) is not None  # each turn while the disk is full says so; where says nothing more
    )


DISK_FULL_MESSAGE = (
    "the database's disk is full: nothing of this request was saved; try again once the server's operator has freed "
    'space'
)
"""A 503 `database_unavailable` for PostgreSQL out of disk space (SQLSTATE 53100): the CLI's words name the data
directory, a client's do not (no other answer of the API shows a server path)."""

NEVER_STARTED_MESSAGE = (
    "the server's runtime was never started: the app was built with create_app(manage_runtime=False), which leaves its "
    "start to the program around it, and nothing started it; start it in that program's lifespan (agentrt_runtime() "
    'or init_database(); README "Serving over HTTP")'
)
"""A 500 `configuration_error` for a runtime nothing tried to start (`DatabaseNotInitializedError.never_started`):
the one a mounted `create_app(manage_runtime=False)` answers when its program's lifespan does not start it."""

# 503s that are expected answers, not bugs: at capacity, or a request the server's shutdown stopped (`api/cut_off.py`).
_ONE_LINE = frozenset({'busy', 'shutting_down'})

# A 503's `Retry-After` (seconds, RFC 9110 section 10.2.3): a client or proxy that honours it waits instead of
# hammering a server at capacity, or a database that is away (an outage lasts seconds at least), or a server stopping.
# And a turn refused because another holds its conversation (409 `concurrent_turn`): a turn lasts seconds. Not a 409
# `conflict` (`If-Match` named another revision): the same request again cannot succeed, only one read anew.
_RETRY_AFTER_S = {'busy': 1, 'database_unavailable': 5, 'shutting_down': 5, 'concurrent_turn': 2}

# 502s: the provider failed the request, or the model's answer could not be used. Its traceback is our code's (the
# run, the ledger, the route) and says nothing the error, its id and the ledger row do not.
_NOT_OURS = frozenset({'model_provider_error', 'model_behavior_error'})


_TIME = TypeAdapter(datetime)


def _budget_figures(exc: BudgetExceededError) -> dict[str, Any]:
    """The refusal's figures: the caller's own account's, so nothing of another tenant is told."""

    def value(item: Decimal | datetime | None) -> str | None:
        if isinstance(item, datetime):
            # As pydantic writes every other time of the API (`GET /api/v1/budget`'s `period_end`): UTC as `Z`, where
            # `isoformat()` wrote `+00:00`, two spellings of one time (QA).
            return str(_TIME.dump_python(item, mode='json'))
        return None if item is None else decimal_text(item)

    return {
        'reason': exc.reason,
        'limit_usd': value(exc.limit_usd),
        'spent_usd': value(exc.spent_usd),
        'reserved_usd': value(exc.reserved_usd),
        'needed_usd': value(exc.needed_usd),
        'period_end': value(exc.period_end),
    }


def _classify(exc: BaseException) -> tuple[int, str, str, str | None]:
    """(status, type, client message, field) for an exception. Messages of 5xx never quote the exception."""
    if isinstance(exc, ApiError):
        return exc.status, exc.type, exc.message, exc.field
    if isinstance(exc, ClientDisconnect):  # a hang-up while sending: nothing ran, and nobody reads the answer
        return 400, 'client_disconnected', 'the client disconnected before its request body arrived', 'body'
    if isinstance(exc, InvalidInputError):
        return 422, 'invalid_input', str(exc), exc.field
    if isinstance(exc, UnknownTenantError):
        if exc.what == 'agent':  # names only the caller's own account's agents
            return 422, 'unknown_agent', str(exc), 'agent'
        return 401, 'unauthorized', "the API key's account no longer exists", None
    if isinstance(exc, ConcurrentTurnError):
        return 409, 'concurrent_turn', str(exc), None
    if isinstance(exc, BudgetExceededError):  # its message names the account's own limit and what to do
        return 429, 'budget_exceeded', str(exc), None
    if isinstance(exc, TurnLimitExceededError):
        return 422, 'turn_limit_exceeded', str(exc), None
    if isinstance(exc, UsageLimitExceeded):  # pydantic-ai's own text names the limit and its value
        return 422, 'turn_limit_exceeded', f'the turn reached a usage limit: {exc}', None
    if isinstance(exc, RollupCannotAnswer):
        return 422, 'invalid_input', str(exc), 'source'
    if isinstance(exc, ModelBehaviorError):  # its message is written for people; the model's body stays in the log
        return 502, 'model_behavior_error', str(exc), None
    if isinstance(exc, ModelProviderError | ModelAPIError | UnexpectedModelBehavior):
        return 502, 'model_provider_error', _provider_message(exc), None
    if isinstance(exc, ShuttingDownError):  # the server began to stop while the turn waited: nothing was started
        return 503, 'shutting_down', str(exc), None
    if isinstance(exc, RuntimeBusyError):  # the turn waited its turn too long: nothing was started
        return 503, 'busy', 'the server is busy; try again shortly', None
    if isinstance(exc, DatabaseUnavailableError) and pool_exhausted(exc):  # the runtime's words for the pool's timeout
        return 503, 'busy', 'the server is busy; try again shortly', None
    if isinstance(exc, DatabaseUnavailableError) and disk_full(exc) is not None:
        # Not "try again shortly": it fails until the operator frees space (where stays in the server's log).
        return 503, 'database_unavailable', DISK_FULL_MESSAGE, None
    if isinstance(exc, DatabaseNotInitializedError) and exc.never_started:
        # Not "try again shortly" (QA: a 503 for ever, readiness "unreachable"): nothing tried to start the runtime,
        # which only an app of `create_app(manage_runtime=False)` leaves to its program. After a shutdown, or a start
        # that failed, it is the 503 below.
        return 500, 'configuration_error', NEVER_STARTED_MESSAGE, None
    if isinstance(exc, DatabaseUnavailableError | DatabaseNotInitializedError | EmbeddedPostgresError):
        return 503, 'database_unavailable', 'the database is unavailable; try again shortly', None
    if isinstance(exc, PoolTimeoutError):
        return 503, 'busy', 'the server is busy; try again shortly', None
    if isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return 503, 'database_unavailable', 'the database is unavailable; try again shortly', None
    if isinstance(exc, ConfigError):
        return 500, 'configuration_error', 'the server is misconfigured; its operator can find the error id', None
    if isinstance(exc, AgentRuntimeError):
        return 500, 'internal_error', 'the request failed on the server', None
    return 500, 'internal_error', 'the request failed on the server', None


def stream_error(exc: BaseException) -> PublicError:
    """`public_error` for an error inside a streamed chat, where pydantic-ai's own `UserError`s are for the client.

    The UI adapters raise `UserError` with a fixed text written for the client ("Conversation ... was changed by
    another request; reload it", ...) when the conversation store refuses a load or a save.
    """
    if isinstance(exc, UserError):
        return public_error(ApiError(409, 'conversation_error', str(exc)), where='chat stream')
    return public_error(exc, where='chat stream')


def _provider_message(exc: BaseException) -> str:
    """What a client may do about a provider's failure: try again (when, if the provider said), or nothing (the
    server's key or model is wrong: only its operator can fix it). Never the provider's own text."""
    status = getattr(exc, 'status_code', None)
    suffix = f' (HTTP {status})' if isinstance(status, int) else ''
    cause = exc if isinstance(exc, ModelAPIError) else exc.__cause__
    if isinstance(cause, ModelAuthenticationError) or status in (401, 403):
        return f"the model provider refused this server's credentials{suffix}; the server's operator must fix its key"
    if isinstance(cause, ModelNotFoundError) or status == 404:
        return f"the model provider does not serve this server's model{suffix}; the server's operator must fix it"
    if isinstance(cause, ModelQuotaExceededError):
        return f"the model provider's quota for this server is used up{suffix}; the server's operator must raise it"
    if isinstance(cause, ModelRateLimitError) or status == 429:
        retry_after = provider_wait(cause) if isinstance(cause, ModelAPIError) else None
        when = f'in {math.ceil(retry_after)} s' if retry_after else 'shortly'
        return f'the model provider is rate limiting this server{suffix}; try again {when}'
    if isinstance(cause, ModelRequestTimeout | ModelTimeoutError):
        return 'the model provider did not answer in time; try again shortly'
    # A 503 may say when too: the header passed it on, the text said "shortly" (QA).
    retry_after = provider_wait(cause) if isinstance(cause, ModelAPIError) else None
    return (
        f'the model provider failed{suffix}; try again {f"in {math.ceil(retry_after)} s" if retry_after else "shortly"}'
    )


def _redacted(text: str) -> str:
    """`text` without secrets; twice what `_short` keeps is redacted, so a secret the cut splits was redacted whole."""
    return redact_text(text[: 2 * _MAX_MESSAGE_CHARS])[0]


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 1] + '…'


def client_text(text: str) -> str:
    """`text` as a client may read it: without secrets (`_redacted`) and at most `_MAX_MESSAGE_CHARS` long."""
    return _short(_redacted(text))
