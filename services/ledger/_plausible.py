"""Whether a response's token counts can be a measurement, beyond each count on its own (`implausible_amount`):
counts that contradict each other.

A provider (or a proxy in front of it) that reports such counts is not measuring: the ledger records the response
unmeasured, and the budget charges its hold (README, "Billing" and "Budgets"), rather than what the counts claim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def inconsistent_counts(counts: Mapping[str, Any]) -> str | None:
    """The first way `counts` (token counts by column name: `input_tokens`, `output_tokens`, `cache_read_tokens`,
    `cache_write_tokens`) cannot be a measurement of a request, described; None when they can be.

    Every provider pydantic-ai reads counts cached tokens within the input's, and genai-prices refuses to price them
    otherwise: 100,000 cached tokens of a 100-token prompt made a priced model's request unpriced, and free against
    its budget (QA). Counts that are not whole numbers are left to `implausible_amount`.
    """
    input_tokens = counts.get('input_tokens') or 0
    cached = [counts.get(name) or 0 for name in ('cache_read_tokens', 'cache_write_tokens')]
    if not all(_count(value) for value in (input_tokens, *cached)):
        return None
    if sum(cached) > input_tokens:
        return f'cached tokens ({cached[0]} read, {cached[1]} written) past its input tokens ({input_tokens})'
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
