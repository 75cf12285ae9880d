"""The input/output split of a response's cost with genai-prices, memoised, for the ledger writer."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import PriceCalculation
from pydantic_ai.messages import ModelResponse
from pydantic_ai.usage import RequestUsage

_PRICE_CACHE: dict[tuple[Any, ...], PriceCalculation] = {}
_PRICE_CACHE_SIZE = 4096
_PRICED_MODELS: dict[tuple[Any, ...], bool] = {}


def price(response: ModelResponse) -> PriceCalculation:
    """`response.cost()`, memoised on everything the price depends on.

    genai-prices takes a few hundred microseconds per calculation; identical usage (same model,
    provider, token counts, price context, snapshot and hour) gets the same price, so repeats are free.

    Raises:
        LookupError: the model has no price. ValueError: the response omitted its usage.
    """
    usage = response.usage
    timestamp = response.timestamp
    key = (
        response.model_name,
        response.provider_url,
        response.provider_name,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
        usage.cache_write_1h_tokens,
        usage.output_reasoning_tokens,
        usage.input_audio_tokens,
        usage.cache_audio_read_tokens,
        usage.output_audio_tokens,
        usage.audio_seconds,
        usage.unmeasured_requests,
        tuple(sorted(usage.details.items())) if usage.details else (),
        timestamp.replace(minute=0, second=0, microsecond=0) if timestamp else None,
        json.dumps(response.provider_details, sort_keys=True, default=str) if response.provider_details else None,
        id(get_snapshot()),
    )
    calc = _PRICE_CACHE.get(key)
    if calc is None:
        calc = response.cost()
        if len(_PRICE_CACHE) >= _PRICE_CACHE_SIZE:
            _PRICE_CACHE.pop(next(iter(_PRICE_CACHE)))
        _PRICE_CACHE[key] = calc
    return calc


def priced_model(response: ModelResponse) -> bool:
    """Whether genai-prices has a price for `response`'s model, whatever its usage says (memoised per model).

    pydantic-ai leaves a response's cost None both for a model without a price and for usage genai-prices cannot
    price (cached tokens past the input's): the two are told apart here, by pricing one token in and one out.
    """
    key = (response.model_name, response.provider_url, response.provider_name, id(get_snapshot()))
    known = _PRICED_MODELS.get(key)
    if known is None:
        try:
            replace(response, usage=RequestUsage(input_tokens=1, output_tokens=1)).cost()
            known = True
        except (LookupError, ValueError):  # no such model, or no model name to look up
            known = False
        if len(_PRICED_MODELS) >= _PRICE_CACHE_SIZE:
            _PRICED_MODELS.clear()
        _PRICED_MODELS[key] = known
    return known


def price_source(calc: PriceCalculation) -> str:
    """`genai-prices <version>: <provider>/<model>`, the ledger's record of where a price came from."""
    return f'genai-prices {_genai_prices_version()}: {calc.provider.id}/{calc.model.id}'


@lru_cache(maxsize=1)
def _genai_prices_version() -> str:
    try:
        return version('genai-prices')
    except PackageNotFoundError:  # pragma: no cover
        return 'unknown'
