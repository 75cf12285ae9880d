"""Whether a response's token counts can be a measurement of the request that was sent, beyond each count on its own
(`implausible_amount`): counts that contradict each other, or that the request itself rules out.

A provider (or a proxy in front of it) that reports such counts is not measuring: the ledger records the response
unmeasured, and the budget charges its hold (README, "Billing" and "Budgets"), rather than what the counts claim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

OUTPUT_FACTOR = 4
"""Output tokens are plausible up to this many times the `max_tokens` the request was sent with (plus the slack)."""
OUTPUT_SLACK_TOKENS = 32_768
"""Output tokens allowed beside `OUTPUT_FACTOR` times `max_tokens`: room for a provider that overshoots it, or bills
thinking beside it (a thinking budget is at most this on the providers that have one)."""
INPUT_FACTOR = 4
"""Input tokens are plausible up to this many times the request's size bound (`RequestSizes`: its UTF-8 size, which
a byte-level tokenizer never exceeds, and the provider's framing), plus the slack."""
INPUT_SLACK_TOKENS = 10_000_000
"""Input tokens allowed beside that, once, and once more for each native tool of the request: the largest context
window a model has (ten million tokens) holds whatever the request names without carrying it (files by URL, a
provider's cache or stored conversation), and a native tool (web search, code execution) can read the context again
for each of its steps."""


@dataclass(slots=True)
class SentBounds:
    """What a request was sent with, against which its response's counts are read: its `max_tokens` (None: it set
    none), its native tools, and (worked out only when a count needs it) the bound of its input's size."""

    max_tokens: int | None
    native_tools: int = 0
    input_size: Callable[[], int] | None = None
    """The request's input size bound, in tokens; called at most once, and only for input counts past the slack."""
    _size: int | None = field(default=None, init=False, repr=False)

    def most_output_tokens(self) -> int | None:
        """The most output tokens a response to the request can have; None when it set no `max_tokens`."""
        if self.max_tokens is None:
            return None
        return OUTPUT_FACTOR * self.max_tokens + OUTPUT_SLACK_TOKENS

    def input_exceeds(self, tokens: int) -> bool:
        """Whether `tokens` input tokens are more than the request can have been (its size bound is only worked out
        for counts past the slack, which no request but a huge one comes near)."""
        slack = INPUT_SLACK_TOKENS * (1 + self.native_tools)
        if tokens <= slack or self.input_size is None:
            return False
        if self._size is None:
            try:
                self._size = self.input_size()
            except Exception:  # the counts are recorded as reported, as before this check
                return False
        return tokens > INPUT_FACTOR * self._size + slack


def max_tokens_sent(settings: Mapping[str, Any] | None) -> int | None:
    """The `max_tokens` of a request's settings as sent (a positive whole number), else None."""
    value = (settings or {}).get('max_tokens')
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def inconsistent_counts(counts: Mapping[str, Any], sent: SentBounds | None = None) -> str | None:
    """The first way `counts` (token counts by column name: `input_tokens`, `output_tokens`, `cache_read_tokens`,
    `cache_write_tokens`) cannot be a measurement of a request, described; None when they can be.

    Every provider pydantic-ai reads counts cached tokens within the input's, and genai-prices refuses to price them
    otherwise: 100,000 cached tokens of a 100-token prompt made a priced model's request unpriced, and free against
    its budget (QA). With `sent` (the request's bounds): a request sent with `max_tokens` has at most
    `SentBounds.most_output_tokens` output tokens, and its input at most what `SentBounds.input_exceeds` allows (a
    proxy's 10^11 of each was a $75,000 row, against a request that held $0.01 and asked for 16,384 tokens at most;
    QA). Counts that are not whole numbers are left to `implausible_amount`.
    """
    input_tokens, output_tokens = counts.get('input_tokens') or 0, counts.get('output_tokens') or 0
    cached = [counts.get(name) or 0 for name in ('cache_read_tokens', 'cache_write_tokens')]
    if not all(_count(value) for value in (input_tokens, output_tokens, *cached)):
        return None
    if sum(cached) > input_tokens:
        return f'cached tokens ({cached[0]} read, {cached[1]} written) past its input tokens ({input_tokens})'
    if sent is None:
        return None
    most = sent.most_output_tokens()
    if most is not None and output_tokens > most:
        return f'output tokens ({output_tokens}) past what the max_tokens it was sent with ({sent.max_tokens}) allows'
    if sent.input_exceeds(input_tokens):
        return f'input tokens ({input_tokens}) past what the request sent can make'
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
