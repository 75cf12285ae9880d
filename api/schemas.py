"""Response (and request) models of the HTTP API: what OpenAPI publishes and what every route returns.

Money is a decimal string (`"0.000123"`), exact as the ledger stores it and in plain notation (`"0.000000001"`,
never `"1E-9"`); times are ISO 8601 with a UTC offset.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from agentrt.api.message_schemas import MODEL_MESSAGE, UI_MESSAGE, schema_ref
from agentrt.db.models.ledger import LLMRequestContentRow, LLMRequestRow
from agentrt.services.budgets import BudgetStatus
from agentrt.services.conversations import ConversationSummary
from agentrt.services.ledger import CostSummary


def decimal_text(value: Decimal) -> str:
    """A decimal as JSON carries it: a string, exact, in plain notation (`0.000000001`, never `1E-9`, which is what
    `str()` and pydantic give under a millionth)."""
    return format(value, 'f')


Money = Annotated[Decimal, PlainSerializer(decimal_text, return_type=str, when_used='json')]
"""USD (or any decimal) in a response: `decimal_text` in JSON."""


class ErrorOut(BaseModel):
    """Every error response: a message (or a list of field errors), its kind, and the id to find it in the logs."""

    detail: str | list[dict[str, Any]]
    type: str
    error_id: str
    field: str | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {'model': ErrorOut, 'description': 'No API key, or an invalid or revoked one.'},
    403: {'model': ErrorOut, 'description': 'The API key lacks the scope this route needs.'},
    422: {'model': ErrorOut, 'description': 'A bad body, path or query value (`field` names it).'},
    503: {'model': ErrorOut, 'description': 'The database is unavailable, the server is busy, or it is shutting down.'},
}
# What a route answers beyond ERROR_RESPONSES, declared where it can happen: OpenAPI had none of these (a generated
# client did not know that a request it asks for by id can be 404, or that a turn can be 409 or 502).
BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {'model': ErrorOut, 'description': 'A `Content-Length` that is not a number, or a body that cannot be read.'},
    408: {
        'model': ErrorOut,
        'description': 'The body stopped arriving, or arrived too slowly (`AGENTRT_HTTP_BODY_TIMEOUT_SECONDS`).',
    },
    413: {'model': ErrorOut, 'description': 'A body over `AGENTRT_HTTP_MAX_BODY_BYTES`.'},
    415: {'model': ErrorOut, 'description': 'A body not sent as UTF-8 `application/json`, or in a content coding.'},
}
NOT_FOUND_RESPONSE: dict[int | str, dict[str, Any]] = {
    404: {'model': ErrorOut, 'description': "Not found in the key's account."}
}
BUSY_CONVERSATION_RESPONSE: dict[int | str, dict[str, Any]] = {
    409: {'model': ErrorOut, 'description': 'Another turn is running on this conversation, or saved it meanwhile.'}
}


# The audit: one row per model request.


class InteractionOut(BaseModel):
    """One model request as the audit lists it (its prompt and response are in the detail)."""

    id: uuid.UUID
    started_at: datetime
    finished_at: datetime
    status: Literal['complete', 'error', 'cancelled', 'refused']
    success: bool
    model: str
    response_model: str | None
    provider: str | None
    agent: str | None = Field(description='The agent instance slug, or the agent name.')
    conversation_id: str | None
    run_id: str | None
    streamed: bool
    input_tokens: int
    output_tokens: int
    total_tokens: int
    total_cost: Money | None = Field(description='USD; null when the model is unpriced.')
    price_source: str | None
    latency_ms: float
    ttft_ms: float | None = Field(description='Time to the first streamed token.')
    finish_reason: str | None
    error_type: str | None
    error_message: str | None
    trace_id: str | None = Field(
        default=None, description='The OpenTelemetry trace the request was made in (32 hex digits), if one was.'
    )

    @classmethod
    def of(cls, row: LLMRequestRow) -> InteractionOut:
        """From a ledger row."""
        return cls(
            id=row.id,
            started_at=row.started_at,
            finished_at=row.finished_at,
            status=row.status,  # type: ignore[arg-type]  # the table's check constraint allows only these
            success=row.success,
            model=row.model,
            response_model=row.response_model,
            provider=row.provider,
            agent=row.agent_instance_slug or row.agent_name,
            conversation_id=row.chat_session_id,
            run_id=row.run_id,
            streamed=row.streamed,
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            total_tokens=row.total_tokens,
            total_cost=row.total_cost,
            price_source=row.price_source,
            latency_ms=row.latency_ms,
            ttft_ms=row.time_to_first_token_ms,
            finish_reason=row.finish_reason,
            error_type=row.error_type,
            error_message=row.error_message,
            trace_id=row.trace_id,
        )


class InteractionPage(BaseModel):
    """A page of the audit, newest first, with the total the filters match."""

    items: list[InteractionOut]
    page: int
    page_size: int
    total: int
    total_pages: int
    next_cursor: str | None = Field(description='Pass as `cursor` for the next page (stable while rows arrive).')


class ContentOut(BaseModel):
    """A stored prompt, response or error body (secrets redacted before it was stored)."""

    kind: Literal['prompt', 'response', 'error']
    body: str
    size_bytes: int
    truncated: bool
    redactions: int

    @classmethod
    def of(cls, row: LLMRequestContentRow) -> ContentOut:
        """From a stored content row."""
        return cls(
            kind=row.kind,  # type: ignore[arg-type]  # the table's check constraint allows only these
            body=row.body,
            size_bytes=row.size_bytes,
            truncated=row.truncated,
            redactions=row.redactions,
        )


class InteractionDetail(InteractionOut):
    """One model request with its stored prompt, response or error."""

    contents: list[ContentOut]


# Costs.


class CostRowOut(BaseModel):
    """Totals for one group of requests."""

    key: str
    requests: int
    failed: int = Field(description='Requests that failed (provider error, unusable answer); not the cancelled ones.')
    cancelled: int = Field(description='Requests the caller stopped (a stopped stream, a cancelled turn).')
    input_tokens: int
    output_tokens: int
    total_tokens: int
    total_cost: Money | None
    unpriced: int = Field(
        description="Requests without a cost: an unpriced model's, and any whose usage the provider never reported "
        '(a failure or a cancellation before any usage); counted in tokens, not in cost.'
    )

    @classmethod
    def of(cls, summary: CostSummary) -> CostRowOut:
        """From the service's summary."""
        return cls(**summary.__dict__)


class CostReport(BaseModel):
    """Costs of the caller's account, grouped."""

    by: Literal['account', 'agent', 'model', 'day']
    source: Literal['ledger', 'rollup']
    items: list[CostRowOut]


# Budget.


class BudgetOut(BaseModel):
    """The caller's account budget and where its current period stands (USD as decimal strings)."""

    limited: bool = Field(description='Whether the account has a budget; the other fields are null when not.')
    limit_usd: Money | None = None
    period: str | None = Field(default=None, description='`month`, `week`, `day` (UTC) or a window such as `7d`.')
    period_start: datetime | None = None
    period_end: datetime | None = Field(default=None, description='When the period ends and the budget starts afresh.')
    spent_usd: Money | None = Field(default=None, description="What the period's settled requests cost.")
    reserved_usd: Money | None = Field(default=None, description='What requests in flight hold.')
    remaining_usd: Money | None = None
    holds: int | None = Field(default=None, description='Requests in flight holding part of the budget.')
    refused_requests: int | None = Field(
        default=None,
        description=(
            'Requests the limit refused this period (one refused because its model has no price is not counted here: '
            'the audit lists every refused request, `status` `refused`).'
        ),
    )

    @classmethod
    def of(cls, status: BudgetStatus | None) -> BudgetOut:
        """From the service's status (None: no budget)."""
        if status is None:
            return cls(limited=False)
        return cls(
            limited=True,
            limit_usd=status.limit_usd,
            period=status.period,
            period_start=status.period_start,
            period_end=status.period_end,
            spent_usd=status.spent_usd,
            reserved_usd=status.reserved_usd,
            remaining_usd=status.remaining_usd,
            holds=status.holds,
            refused_requests=status.refused_requests,
        )


class BudgetExceededOut(ErrorOut):
    """429: the account's budget refused a model request of the turn; nothing was sent to the model."""

    reason: Literal['limit', 'unpriced']
    limit_usd: Money | None = None
    spent_usd: Money | None = None
    reserved_usd: Money | None = None
    needed_usd: Money | None = Field(default=None, description='The least the refused request had to hold.')
    period_end: datetime | None = Field(default=None, description='When the budget starts afresh.')


# Conversations and turns.


class UsageOut(BaseModel):
    """Requests, tool calls and tokens."""

    requests: int
    tool_calls: int
    input_tokens: int
    output_tokens: int
    unmeasured_requests: int = Field(
        default=0,
        description='Requests whose provider reported no usage: the token counts leave them out (not measured zeros).',
    )


class ConversationOut(BaseModel):
    """A conversation as listed, without its messages."""

    conversation_id: str
    title: str | None
    summary: str | None
    created_at: datetime
    updated_at: datetime
    usage: UsageOut

    @classmethod
    def of(cls, item: ConversationSummary) -> ConversationOut:
        """From the service's summary."""
        usage = UsageOut(
            requests=item.requests,
            tool_calls=item.tool_calls,
            input_tokens=item.input_tokens,
            output_tokens=item.output_tokens,
            unmeasured_requests=item.unmeasured_requests,
        )
        return cls(
            conversation_id=item.conversation_id,
            title=item.title,
            summary=item.summary,
            created_at=item.created_at,
            updated_at=item.updated_at,
            usage=usage,
        )


class ConversationPage(BaseModel):
    """The caller's conversations, newest first (`order`: by when each began, or by the last update)."""

    items: list[ConversationOut]
    next_cursor: str | None


class ConversationMessages(BaseModel):
    """The messages of one conversation, in the Vercel AI UI format or pydantic-ai's own."""

    conversation_id: str
    revision: str | None
    title: str | None = Field(
        default=None, description="The conversation's title (as listed), whichever page this is; None until made."
    )
    format: Literal['vercel', 'pydantic']
    messages: list[Any] = Field(
        description="In `format` `vercel`, each an AI SDK UI message (`UIMessage`); in `pydantic`, pydantic-ai's own "
        '(`ModelMessage`).',
        # The schemas `document_messages` adds to the document (the route writes these bytes itself).
        json_schema_extra={'items': {'anyOf': [schema_ref(UI_MESSAGE), schema_ref(MODEL_MESSAGE)]}},
    )
    earlier: bool = Field(default=False, description='Older messages were left out (`limit`).')
    earlier_cursor: str | None = Field(
        default=None,
        description='When `earlier`: pass it as `before` (with `limit`) to read the messages before these.',
    )


class TurnRequest(BaseModel):
    """A non-streamed turn: the user's message, and optionally which of the account's agents answers."""

    model_config = ConfigDict(extra='forbid')

    message: str = Field(min_length=1, description='The user message.')
    agent: str | None = Field(default=None, min_length=1, max_length=64)


class TurnResponse(BaseModel):
    """The outcome of a non-streamed turn."""

    output: str
    conversation_id: str
    run_id: str
    model_name: str
    usage: UsageOut
    cost: Money | None = Field(description='USD of this turn; null when the model is unpriced.')
    duration_s: float
    finish_reason: str | None = Field(
        None,
        description="Why the answer ended: 'stop', 'length' (cut off at its output token limit), 'content_filter' (cut "
        'off by the provider), ...; null when the provider did not say. A cut-off answer is saved as it is.',
    )


# The caller.


class MeOut(BaseModel):
    """Who an API key speaks for."""

    account: str = Field(description="The account's slug.")
    key_id: str = Field(description='The public id of the key, `art_<prefix>`.')
    scopes: list[str] = Field(description='`chat`, `read`.')


# Health.


class LiveOut(BaseModel):
    """The process answers."""

    status: Literal['alive']


class DatabaseOut(BaseModel):
    """Whether the database answered within the deadline, and the schema it is at."""

    ok: bool
    revision: str | None
    head: str | None
    error: str | None = None


class PoolOut(BaseModel):
    """The connection pool of this process."""

    size: int
    checked_out: int
    overflow: int
    checked_in: int
    max_overflow: int


class BackgroundOut(BaseModel):
    """Post-turn tasks of this process."""

    running: int
    queued: int
    failed: int


class ReadyOut(BaseModel):
    """Readiness: `ready` when the database answers within a second at the schema this version expects."""

    status: Literal['ready', 'unavailable']
    database: DatabaseOut
    pool: PoolOut | None
    background: BackgroundOut | None
