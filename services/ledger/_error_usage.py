"""The usage a provider reported in an answer pydantic-ai refused (a 200 with `choices: []`), read off the error."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from pydantic_ai import UsageExtractionFailedWarning
from pydantic_ai.exceptions import ModelAPIError
from pydantic_ai.messages import ModelResponse
from pydantic_ai.models import Model
from pydantic_ai.usage import RequestUsage

logger = logging.getLogger('agentrt.ledger')


def reported_in_error(model: Model, error: BaseException) -> ModelResponse | None:
    """A response with only the usage the provider reported in the answer that `error` refused, or None.

    pydantic-ai 2.78 raises `ModelEmptyResponseError` for a completion without choices and keeps the completion on
    its `body`: the provider billed its `usage` (100 tokens in, 10 out) though nothing came of it, and the ledger
    recorded the request unmeasured, at no cost (QA). 2.68 raises an `IndexError` without the body: unmeasured there.
    Only an OpenAI-shaped `usage` (Chat Completions' `prompt_tokens`, the Responses API's `input_tokens`) is read,
    the way pydantic-ai reads a whole answer's (`RequestUsage.extract`), priced as one (`ModelResponse.cost`).

    Args:
        model: the model the request was made to.
        error: what the request raised.
    """
    body = error.body if isinstance(error, ModelAPIError) else None
    usage = body.get('usage') if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(usage, dict):
        return None
    # pydantic-ai's body of an empty completion carries both shapes' keys, the unused ones None (QA: Responses-API
    # usage beside `prompt_tokens: None` was read as Chat Completions' and lost).
    flavor = (
        'chat'
        if usage.get('prompt_tokens') is not None
        else 'responses'
        if usage.get('input_tokens') is not None
        else None
    )
    if flavor is None:
        return None
    named = body.get('model')
    model_name = named if isinstance(named, str) and named else model.model_name
    response_id = body.get('id')
    base_url = model.base_url or ''
    try:
        with warnings.catch_warnings():
            # Usage it cannot read (negative, not a number) is a warning pydantic-ai prints with its source line to
            # the caller's stderr (QA): here it is the row's being unmeasured, which the ledger says.
            warnings.simplefilter('error', UsageExtractionFailedWarning)
            response = ModelResponse(
                parts=[],
                usage=RequestUsage.extract(
                    {'model': model_name, 'usage': usage},
                    provider=model.system,
                    provider_url=base_url,
                    provider_fallback='openai',
                    api_flavor=flavor,
                    details=_details(usage),
                ),
                model_name=model_name,
                provider_name=model.system,
                provider_url=base_url,
                provider_response_id=response_id if isinstance(response_id, str) and response_id else None,
            )
    except UsageExtractionFailedWarning:
        return None  # recorded unmeasured
    except Exception:  # the row is recorded unmeasured all the same
        logger.exception('ledger: could not read the usage of a refused answer')
        return None
    try:
        response.usage.cost = response.cost().total_price
    except (LookupError, ValueError):
        pass  # no price for the model: the row is measured, unpriced, as an answer's would be
    return response


def _details(usage: dict[str, Any]) -> dict[str, int]:
    """The whole-number counts beside the main ones (pydantic-ai's `details`), as it keeps them."""
    main = {'prompt_tokens', 'completion_tokens', 'input_tokens', 'output_tokens', 'total_tokens'}
    return {k: v for k, v in usage.items() if k not in main and isinstance(v, int) and not isinstance(v, bool)}
