"""What a model request can cost at most, before it is sent: input tokens bounded, output tokens capped, priced.

Input tokens: the provider's own count (`Model.count_tokens`) where the model supports it, otherwise the UTF-8 size
of the serialised request (its messages, instructions and tool definitions) plus an allowance for the provider's
framing. Byte-level BPE tokenizers never make more tokens than bytes, so the size is an upper bound, loose by about
3-4 times for English. Output tokens: the request's `max_tokens`, which the reservation caps, so the provider cannot
bill more than was held.

Price: genai-prices, looked up the way pydantic-ai prices the response (the provider's URL, then its name), with
every input token priced at the dearest input rate (cache writes can cost more than plain input) and the input
count rounded up to 3 significant bits, so prices are memoised per model and size class. A price never falls as
tokens grow (tiers apply to all tokens once crossed), so rounding up keeps the bound.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from genai_prices import calc_price
from genai_prices.types import PriceCalculation
from pydantic import TypeAdapter
from pydantic_ai.messages import (
    FileUrl,
    ModelMessage,
    ModelRequest,
    ModelResponsePart,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    UserPromptPart,
)
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.tools import ToolDefinition
from pydantic_ai.usage import RequestUsage
from pydantic_core import to_json

from agentrt.services.budgets._config import MEDIA_URL_TOKENS, PROVIDER_FRAMING_TOKENS
from agentrt.services.message_json import message_adapter

_TOOLS_ADAPTER: TypeAdapter[list[ToolDefinition]] = TypeAdapter(list[ToolDefinition])
_MILLION = 1_000_000
# Models that are not a provider's: their responses carry no provider name, and pydantic-ai prices them by the model
# name alone (a `FunctionModel` named `gpt-4o-mini` is priced as OpenAI's).
_NO_PROVIDER_SYSTEMS = frozenset({'function', 'test'})


def size_class(tokens: int) -> int:
    """`tokens` rounded up to 3 significant bits (at most 1/8 more): the memo key of a price."""
    if tokens <= 16:
        return max(tokens, 0)
    shift = tokens.bit_length() - 4
    return ((tokens + (1 << shift) - 1) >> shift) << shift


@dataclass(frozen=True)
class _PriceRef:
    model_name: str
    provider_id: str | None
    provider_api_url: str | None


class Pricer:
    """Upper-bound prices of one model's requests, memoised per size class of the input and per hour."""

    def __init__(self, ref: _PriceRef) -> None:
        self._ref = ref
        self._memo: dict[tuple[int, int], tuple[Decimal, Decimal]] = {}
        self._lock = threading.Lock()

    @property
    def model_name(self) -> str:
        """The model name prices are looked up by."""
        return self._ref.model_name

    def cost(self, input_tokens: int, output_tokens: int, at: datetime) -> Decimal:
        """The most `input_tokens` in and `output_tokens` out can cost at time `at` (USD)."""
        input_cost, per_output_token = self._rates(input_tokens, at)
        return input_cost + per_output_token * output_tokens

    def output_tokens_for(self, input_tokens: int, amount: Decimal, at: datetime) -> int | None:
        """The most output tokens `amount` pays for beside `input_tokens`; None when output is free."""
        input_cost, per_output_token = self._rates(input_tokens, at)
        if per_output_token <= 0:
            return None
        return max(int((amount - input_cost) / per_output_token), 0)

    def _rates(self, input_tokens: int, at: datetime) -> tuple[Decimal, Decimal]:
        """(input cost, cost of one output token) for the size class of `input_tokens`, priced at `at`'s hour."""
        tokens = size_class(input_tokens)
        key = (tokens, int(at.timestamp()) // 3600)
        rates = self._memo.get(key)
        if rates is None:
            input_cost = max(
                self._price(RequestUsage(input_tokens=tokens), at),
                self._price(RequestUsage(input_tokens=tokens, cache_write_tokens=tokens), at),
                self._price(
                    RequestUsage(input_tokens=tokens, cache_write_tokens=tokens, cache_write_1h_tokens=tokens), at
                ),
            )
            with_output = self._price(RequestUsage(input_tokens=tokens, output_tokens=_MILLION), at)
            plain_input = self._price(RequestUsage(input_tokens=tokens), at)
            rates = (input_cost, max(with_output - plain_input, Decimal(0)) / _MILLION)
            with self._lock:
                if len(self._memo) > 4096:
                    self._memo.clear()
                self._memo[key] = rates
        return rates

    def _price(self, usage: RequestUsage, at: datetime) -> Decimal:
        return _calc(usage, self._ref, at).total_price


def _calc(usage: RequestUsage, ref: _PriceRef, at: datetime | None = None) -> PriceCalculation:
    """genai-prices' price of `usage`, matched by the provider's URL or by its id (the two are exclusive)."""
    if ref.provider_api_url is not None:
        return calc_price(usage, ref.model_name, provider_api_url=ref.provider_api_url, genai_request_timestamp=at)
    return calc_price(usage, ref.model_name, provider_id=ref.provider_id, genai_request_timestamp=at)


_pricers: dict[tuple[str, str | None, str | None], Pricer | None] = {}


def pricer_for(model: Model) -> Pricer | None:
    """The pricer of `model`'s requests, or None when genai-prices has no price for it (memoised per model)."""
    name, system, url = model.model_name, model.system, _base_url(model)
    key = (name, system, url)
    if key in _pricers:
        return _pricers[key]
    pricer = None
    refs: list[_PriceRef] = []
    if url and system != 'openai-decisions':  # pydantic-ai's order: the URL first (that provider shares a URL)
        refs.append(_PriceRef(name, None, url))
    if system:
        refs.append(_PriceRef(name, system, None))
    if system in _NO_PROVIDER_SYSTEMS or not system:
        refs.append(_PriceRef(name, None, None))
    for ref in refs:
        try:
            _calc(RequestUsage(input_tokens=1, output_tokens=1), ref)
        except (LookupError, ValueError):
            continue
        pricer = Pricer(ref)
        break
    if len(_pricers) > 1024:
        _pricers.clear()
    _pricers[key] = pricer
    return pricer


def _base_url(model: Model) -> str | None:
    try:
        return model.base_url
    except Exception:  # some models resolve it lazily, or have none (pydantic-ai's own lookup does the same)
        return None


def output_bound_usd(model: Model, parts: Sequence[ModelResponsePart], at: datetime) -> Decimal | None:
    """What the output `parts` (an answer received in part) can cost at most at time `at`: their UTF-8 size as tokens
    (a text's characters, a tool call's name and arguments; any other part as JSON), at the model's output rate.

    None when there is no output or the model has no price (genai-prices).
    """
    size = 0
    for part in parts:
        if isinstance(part, TextPart | ThinkingPart):
            size += _utf8_size(part.content)
        elif isinstance(part, ToolCallPart):
            size += _utf8_size(part.tool_name) + _utf8_size(part.args_as_json_str())
        else:
            size += len(to_json(part, fallback=repr))
    pricer = pricer_for(model) if size else None
    return None if pricer is None else pricer.cost(0, size, at)


def supports_count_tokens(model: Model) -> bool:
    """Whether `model` (or the model a wrapper wraps) implements `Model.count_tokens`."""
    while isinstance(model, WrapperModel):
        if type(model).count_tokens is not WrapperModel.count_tokens:
            return True
        model = model.wrapped
    return type(model).count_tokens is not Model.count_tokens


class RequestSizes:
    """The UTF-8 size of a run's messages, each serialised once however many requests of the run resend it.

    Messages are recognised by identity (and their number of parts), like the ledger's stored bodies. Not
    thread-safe: one per run, used from the run's event loop.
    """

    __slots__ = ('_json_of', '_messages')

    def __init__(self, json_of: Callable[[ModelMessage], str | None] | None = None) -> None:
        """Start with no message seen.

        Args:
            json_of: a message's `dump_json` text when the caller has it or makes it anyway (the ledger's bodies of
                the run: a loaded message's stored text, a message it dumps for its prompt), so a message is
                serialised once for both; None for a message it has no text for, which is then dumped here.
        """
        self._messages: dict[int, tuple[ModelMessage, int, int]] = {}
        self._json_of = json_of

    def input_tokens_bound(self, messages: Sequence[ModelMessage], parameters: ModelRequestParameters | None) -> int:
        """An upper bound on the input tokens of a request sending `messages` with `parameters`."""
        total = PROVIDER_FRAMING_TOKENS
        for message in messages:
            total += self._message_size(message)
        if parameters is not None:
            for part in getattr(parameters, 'instruction_parts', None) or ():
                total += _utf8_size(getattr(part, 'content', ''))
            tools = [*parameters.function_tools, *parameters.output_tools]
            if tools:
                total += _json_size(tools, _TOOLS_ADAPTER)
            if parameters.output_object is not None:
                total += len(to_json(parameters.output_object.json_schema))
        return total

    def _message_size(self, message: ModelMessage) -> int:
        seen = self._messages.get(id(message))
        if seen is not None and seen[0] is message and seen[1] == len(message.parts):
            return seen[2]
        text = None if self._json_of is None else self._json_of(message)
        measured = _json_size(message, message_adapter) if text is None else _utf8_size(text)
        size = measured + MEDIA_URL_TOKENS * _file_urls(message)
        self._messages[id(message)] = (message, len(message.parts), size)
        return size


def _file_urls(message: ModelMessage) -> int:
    if not isinstance(message, ModelRequest):
        return 0
    count = 0
    for part in message.parts:
        if isinstance(part, UserPromptPart) and not isinstance(part.content, str):
            count += sum(1 for item in part.content if isinstance(item, FileUrl))
    return count


def _json_size(value: Any, adapter: TypeAdapter[Any]) -> int:
    try:
        return len(adapter.dump_json(value, fallback=repr))
    except Exception:  # text pydantic cannot encode (a lone surrogate): its escaped repr is at least as long
        return _utf8_size(repr(value))


def _utf8_size(text: str) -> int:
    return len(text.encode('utf-8', errors='backslashreplace'))
