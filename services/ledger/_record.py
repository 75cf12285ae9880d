"""`LedgerRecord`: one model request as the ledger stores it; it builds its own row, content rows and spool line."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic_ai.messages import ModelResponse

from agentrt.services.ledger._contents import Body, ContentKind
from agentrt.services.ledger._pricing import price, price_source, priced_model
from agentrt.services.ledger.redaction import redact_cut, redact_text
from agentrt.services.pg_text import is_storable, storable_text

__all__ = ['ContentItem', 'ContentKind', 'LedgerRecord', 'Status', 'new_request_id', 'utc_now']

logger = logging.getLogger('agentrt.ledger')

Status = Literal['complete', 'error', 'cancelled', 'refused']
RawBody = bytes | str | Body
"""A body to store: a `Body` (JSON-able values, redacted string by string), or text that is redacted as it is."""

ERROR_MESSAGE_MAX_CHARS = 4000
# An error message is redacted from at most this many characters (then cut to ERROR_MESSAGE_MAX_CHARS): the work is
# bounded whatever the provider sent, and a secret can only reach the kept part if redaction shrank what came before
# it by 60,000 characters.
ERROR_MESSAGE_SCAN_CHARS = 16 * ERROR_MESSAGE_MAX_CHARS
SPOOL_FORMAT_VERSION = 1

# Column limits of `llm_requests`, applied before the write so a long value can never make a billing row fail: every
# text column of the row (tests/services/ledger/test_row_text.py checks them against the table).
_STRING_LIMITS: dict[str, int] = {
    'run_id': 64,
    'conversation_id': 200,
    'chat_session_id': 200,
    'account_slug': 64,
    'agent_instance_slug': 64,
    'agent_type': 64,
    'agent_name': 200,
    'provider': 100,
    'model': 200,
    'response_model': 200,
    'price_source': 200,
    'finish_reason': 32,
    'error_type': 200,
    'provider_response_id': 200,
    'trace_id': 32,
    'status': 16,
    'error_message': ERROR_MESSAGE_MAX_CHARS,
}


def storable_row(row: dict[str, Any]) -> dict[str, Any]:
    """`row` (an `llm_requests` row) with every string column made storable, in place: cut to its column's size, NUL
    and lone surrogates replaced by U+FFFD (`storable_text`). The one place a ledger row's text is cleaned, for rows
    built now (`LedgerRecord.to_row`) and rows read back from a spool file (`row_from_json`: a line spooled before
    rows were cleaned would otherwise be refused by every replay).

    Any string column: agent names come from user code, model names from a user's model string, error types and
    messages from providers, slugs and ids from the caller. A billing row is never refused for its text.
    """
    texts = []
    for name, limit in _STRING_LIMITS.items():
        value = row[name]
        if value is not None:
            if len(value) > limit:
                value = row[name] = value[:limit]
            texts.append(value)
    # One scan of all the text in the common case (nothing to replace): the writer builds every row this way.
    if not is_storable(''.join(texts)):
        for name in _STRING_LIMITS:
            if row[name] is not None:
                row[name] = storable_text(row[name])
    return row


def new_request_id() -> uuid.UUID:
    """A time-ordered UUID (version 7 layout), minted before the model call: the ledger row's idempotency key.

    Time order keeps inserts at the right edge of the primary key index.
    """
    millis = time.time_ns() // 1_000_000
    value = (millis & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), 'big')
    value = (value & ~(0xF << 76)) | (0x7 << 76)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return uuid.UUID(int=value)


@dataclass(slots=True)
class ContentItem:
    """One stored prompt, response or error body, already redacted and capped."""

    kind: ContentKind
    body: str
    size_bytes: int
    truncated: bool
    redactions: int

    @classmethod
    def build(cls, kind: ContentKind, raw: RawBody, max_bytes: int) -> ContentItem:
        """Render or redact `raw` and cut it to `max_bytes` (UTF-8), recording the size before the cut."""
        if isinstance(raw, Body):
            text, redactions = raw.render()
        else:
            text = raw.decode('utf-8', errors='replace') if isinstance(raw, bytes) else raw
            text, redactions = redact_text(text)
            # PostgreSQL text cannot hold NUL; JSON escapes it, free text might not.
            text = text.replace('\x00', '\\u0000')
        try:
            encoded = text.encode('utf-8')
        except UnicodeEncodeError:
            # A lone surrogate cannot be stored as UTF-8: it becomes its JSON escape (`\udc80`), so JSON stays valid.
            encoded = text.encode('utf-8', errors='backslashreplace')
            text = encoded.decode('utf-8')
        truncated = len(encoded) > max_bytes
        if truncated:
            text = encoded[:max_bytes].decode('utf-8', errors='ignore')
        return cls(kind=kind, body=text, size_bytes=len(encoded), truncated=truncated, redactions=redactions)

    def to_row(self, request_id: uuid.UUID) -> dict[str, Any]:
        """The `llm_request_contents` row of this body."""
        return {
            'request_id': request_id,
            'kind': self.kind,
            'body': self.body,
            'size_bytes': self.size_bytes,
            'truncated': self.truncated,
            'redactions': self.redactions,
        }


@dataclass(slots=True)
class LedgerRecord:
    """Everything the ledger stores about one model request. Field names match `llm_requests` columns."""

    id: uuid.UUID
    model: str
    streamed: bool
    status: Status
    success: bool
    latency_ms: float
    started_at: datetime
    finished_at: datetime
    run_id: str | None = None
    run_step: int | None = None
    conversation_id: str | None = None
    chat_session_id: str | None = None
    account_id: int | None = None
    account_slug: str | None = None
    agent_instance_id: int | None = None
    agent_instance_slug: str | None = None
    agent_type: str | None = None
    agent_name: str | None = None
    provider: str | None = None
    response_model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    usage_reported: bool = True
    input_cost: Decimal | None = None
    output_cost: Decimal | None = None
    total_cost: Decimal | None = None
    output_bound_usd: Decimal | None = None
    """A request cut off or failed without a complete answer: what the output it received can cost at most (its
    UTF-8 size as tokens, at the output rate); its budget hold is settled at no less than its input's share and this."""
    price_source: str | None = None
    time_to_first_token_ms: float | None = None
    finish_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    error_status_code: int | None = None
    provider_response_id: str | None = None
    trace_id: str | None = None
    """The OpenTelemetry trace the request was made in (32 hex digits), when one was being recorded."""
    # The bodies to store: redacted, rendered and capped by `prepare()`, in the tracker's worker thread.
    raw_contents: list[tuple[ContentKind, RawBody]] = field(default_factory=list)
    # The response to split the cost of; `resolve_costs()` consumes it. Kept out of rows and the spool.
    pricing: ModelResponse | None = None
    # The content rows, redacted once (and the cap they were built with), reused if they must be spooled.
    _contents: tuple[int, list[dict[str, Any]]] | None = field(default=None, repr=False, compare=False)
    # The error message as stored (the raw message it was redacted from, and the result).
    _error: tuple[str, str] | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def prepare(self, content_max_bytes: int | None) -> None:
        """Do the costly part of storing this record once: price it, redact its error message and, unless
        `content_max_bytes` is None (contents not stored), render, redact and cap its bodies.

        Blocking and CPU-bound (linear in the size of the bodies): the tracker runs it in a worker thread. Safe to
        call again, or from two threads: later calls reuse the results.
        """
        with self._lock:
            self.to_row()
            if content_max_bytes is not None:
                self.content_rows(content_max_bytes)

    def prepare_quickly(self, content_max_bytes: int | None, max_pending: int) -> bool:
        """`prepare()` here and now if that is quick: no error message to redact, and bodies whose text to check
        comes to at most `max_pending` characters and holds no possible secret. False: `prepare()` it in a thread
        (what was checked meanwhile is not checked again).
        """
        if self.error_message is not None:
            return False
        if content_max_bytes is not None and self._contents is None:
            pending = 0
            for _, raw in self.raw_contents:
                size = raw.pending_size() if isinstance(raw, Body) else None
                if size is None:
                    return False
                pending += size
            if pending > max_pending:
                return False
            if not all(raw.quick_render() for _, raw in self.raw_contents if isinstance(raw, Body)):
                return False
        self.prepare(content_max_bytes)
        return True

    def sealed(self) -> bool:
        """Whether its bodies are final: a response body waits for pydantic-ai's stamps until sealed
        (`ResponseBody`); `prepare()` only a sealed record, or one whose event loop went away."""
        return all(raw.sealed for _, raw in self.raw_contents if isinstance(raw, Body))

    def stamped(self) -> bool:
        """Whether sealing it now would take its bodies' final content (pydantic-ai has stamped its response)."""
        return all(raw.stamped for _, raw in self.raw_contents if isinstance(raw, Body))

    def seal(self) -> None:
        """Make its bodies final as they are now (on the event loop)."""
        for _, raw in self.raw_contents:
            if isinstance(raw, Body):
                raw.seal()

    def discard_contents(self) -> None:
        """Store no bodies for this record (they could not be prepared); the row itself is kept."""
        self.raw_contents = []
        self._contents = None

    def needs_preparing(self, content_max_bytes: int | None) -> bool:
        """Whether `prepare()` has work worth a worker thread: bodies to store, or an error message to redact."""
        if content_max_bytes is not None and self.raw_contents and self._contents is None:
            return True
        return self.error_message is not None and (self._error is None or self._error[0] is not self.error_message)

    def to_row(self) -> dict[str, Any]:
        """The `llm_requests` row: priced (`resolve_costs()`), strings cut to their column sizes, error redacted."""
        self.resolve_costs()
        row = {name: getattr(self, name) for name in ROW_FIELDS}
        if self.error_message is not None:
            row['error_message'] = self._redacted_error(self.error_message)
        return storable_row(row)

    def _redacted_error(self, message: str) -> str:
        if self._error is None or self._error[0] is not message:
            redacted = redact_cut(message, ERROR_MESSAGE_MAX_CHARS, scan=ERROR_MESSAGE_SCAN_CHARS)
            # PostgreSQL text holds neither NUL nor a lone surrogate: either would make the row itself fail.
            self._error = (message, storable_text(redacted))
        return self._error[1]

    def content_rows(self, max_bytes: int) -> list[dict[str, Any]]:
        """The `llm_request_contents` rows: each raw body redacted and cut to `max_bytes` (UTF-8), built once."""
        if self._contents is None or self._contents[0] != max_bytes:
            items = [ContentItem.build(kind, raw, max_bytes) for kind, raw in self.raw_contents]
            self._contents = (max_bytes, [item.to_row(self.id) for item in items])
        return self._contents[1]

    def spool_entry(self, content_max_bytes: int | None) -> dict[str, Any]:
        """The spool line of this record: its row and its redacted contents (none when `content_max_bytes` is None).

        Contents are redacted before they are spooled, so no secret reaches the disk either.
        """
        self.prepare(content_max_bytes)
        contents = [] if content_max_bytes is None else self.content_rows(content_max_bytes)
        return {
            'v': SPOOL_FORMAT_VERSION,
            'row': row_to_json(self.to_row()),
            'contents': [{k: v for k, v in content.items() if k != 'request_id'} for content in contents],
        }

    def unmeasured(self) -> None:
        """Record the request's usage as not measured (a provider's nonsense is not a measurement): no counts, no
        cost, `price_source` `unmeasured`; the budget charges it as a request whose usage was never reported."""
        for name in TOKEN_FIELDS:
            setattr(self, name, 0)
        self.usage_reported = False
        self.total_cost = self.input_cost = self.output_cost = None
        self.price_source = 'unmeasured'
        self.pricing = None

    def resolve_costs(self) -> None:
        """Split the cost into input and output with genai-prices, once, off the model call's path.

        pydantic-ai already filled `usage.cost` (the total) from genai-prices; the split needs
        `ModelResponse.cost()`, which takes a few hundred microseconds, so it runs in the writer.
        """
        response, self.pricing = self.pricing, None
        if response is None:
            return
        try:
            calc = price(response)
        except LookupError:  # a model without a price: unpriced
            return
        except Exception as exc:  # usage genai-prices refuses (ValueError), or a pricing bug
            if self.usage_reported and self.total_cost is None and priced_model(response):
                # A model with a price, and no cost: not an unpriced model's free request, a usage no request has
                # (a stream cut after such a usage chunk; a complete answer's is found before the writer).
                logger.warning(
                    'ledger: %s reported usage its price cannot be worked out from (%s); the request is recorded '
                    'unmeasured',
                    self.model,
                    exc,
                )
                self.unmeasured()
            return
        self.input_cost, self.output_cost = calc.input_price, calc.output_price
        if self.total_cost is None:
            self.total_cost = calc.total_price
        self.price_source = price_source(calc)


_NOT_COLUMNS = {'raw_contents', 'pricing', '_contents', '_error', '_lock'}
ROW_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(LedgerRecord) if f.name not in _NOT_COLUMNS)
_ROW_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(LedgerRecord) if f.name in ROW_FIELDS}


def row_to_json(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger row in JSON-safe form, for the spool file (decimals as strings, times in ISO 8601)."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, uuid.UUID | Decimal):
            value = str(value)
        elif isinstance(value, datetime):
            value = value.isoformat()
        out[name] = value
    return out


_DECIMALS = {'input_cost', 'output_cost', 'total_cost', 'output_bound_usd'}
_TIMES = {'started_at', 'finished_at'}


def row_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `row_to_json`: a row ready for the database driver. Unknown keys are ignored.

    Raises:
        ValueError: the row lacks its id, model or start time, or a value does not parse.
    """
    row: dict[str, Any] = {}
    for name in ROW_FIELDS:
        value = data.get(name)
        if value is None:
            value = _ROW_DEFAULTS.get(name)
            value = None if value is MISSING else value
        else:
            if name == 'id':
                if not isinstance(value, str):  # `uuid.UUID` raised AttributeError for a number: no rejected line
                    raise ValueError(f'spooled ledger row has an id that is not text: {value!r}')
                value = uuid.UUID(value)
            elif name in _DECIMALS:
                value = Decimal(value)
            elif name in _TIMES:
                value = datetime.fromisoformat(value)
        row[name] = value
    if row['id'] is None or row['model'] is None or row['started_at'] is None:
        raise ValueError('spooled ledger row lacks id, model or started_at')
    _check_amounts(row)
    # Lines spooled before rows were made storable can hold NUL or a lone surrogate (the JSON keeps both escaped):
    # cleaned here, the replay writes them instead of being refused again by every replay.
    return storable_row(row)


MAX_COST_USD = Decimal(10) ** 12
"""An amount no request costs: `1e400` replayed made `agentrt costs` report 10^400 USD (QA)."""
TOKEN_FIELDS: tuple[str, ...] = tuple(name for name in ROW_FIELDS if name.endswith('_tokens'))
"""A row's token counts (input, output, cache read and write, reasoning, total)."""
MAX_COST_DECIMALS = 40
"""The most decimal places a cost has: a provider's `1e-20000` could not be encoded for PostgreSQL's numeric (the row
refused, then rejected at replay: the request gone from the ledger), and `1e-400` made every sum carry 400 digits
(QA). A price per token times a count has a dozen or so."""
MAX_TOKENS = 10**12
"""A count no request has (a trillion tokens): counts just under the bigint columns' limit made every sum of them
(`agentrt costs`, the usage roll-up) overflow, for every account from then on (QA)."""


def implausible_amount(values: Mapping[str, Any]) -> str | None:
    """The first of `values` (a row's or a record's costs, token counts and durations, by column name) that no request
    has, described (`total_cost 1E+400`); None when every one is a request's. A cost is a finite amount from 0 under
    `MAX_COST_USD`, of at most `MAX_COST_DECIMALS` decimal places; a token count a whole number from 0 under
    `MAX_TOKENS`; a duration (`_ms`) a number from 0."""
    for name, value in values.items():
        if value is None:
            continue
        if name in _DECIMALS:
            plausible = (
                isinstance(value, Decimal)
                and value.is_finite()
                and 0 <= value < MAX_COST_USD
                and -MAX_COST_DECIMALS <= int(value.as_tuple().exponent)
            )
        elif name.endswith(('_tokens', '_ms')):
            kinds = int if name.endswith('_tokens') else int | float  # counts are whole; durations may not be
            most = MAX_TOKENS if name.endswith('_tokens') else 2**63
            plausible = isinstance(value, kinds) and not isinstance(value, bool) and 0 <= value < most
        else:
            continue
        if not plausible:
            return f'{name} {value!r}'
    return None


def _check_amounts(row: dict[str, Any]) -> None:
    """Refuse a spooled row whose costs, counts or durations no request has (a hand-edited or corrupt line): the
    database took them, and every total built on them was wrong."""
    problem = implausible_amount(row)
    if problem is not None:
        raise ValueError(f'spooled ledger row has {problem}: not an amount a request has')


def parse_spool_entry(entry: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The inverse of `LedgerRecord.spool_entry`: the ledger row and its content rows.

    Raises:
        ValueError: the row is not valid (also TypeError or KeyError): the line goes to the `.rejected` file.
    """
    row = row_from_json(entry['row'])
    stored = entry.get('contents') or []
    # Anything else went through as an AttributeError: the replay failed, kept the file and failed on every later
    # write, holding back the good rows beside the line.
    if not isinstance(stored, list) or not all(isinstance(content, dict) for content in stored):
        raise ValueError('spooled ledger contents are not a list of objects')
    contents = [
        {**{key: storable_text(v) if isinstance(v, str) else v for key, v in content.items()}, 'request_id': row['id']}
        for content in stored
    ]
    return row, contents


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)
