"""Usage limits per chat turn, from the settings (`AGENTRT_TURN_*`).

pydantic-ai applies `UsageLimits` to the usage a run starts from; a conversation passed with `conversation=`
carries its lifetime usage, so a limit meant for one turn would be spent by the turns before it (a conversation
died for good at turn 17). The chat layer starts each run from zero usage and adds the turn to the conversation's
lifetime usage when it saves, so these limits bound one turn and the lifetime figures stay on the record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any, cast

from pydantic_ai.usage import RunUsage, UsageLimits

from agentrt.db.settings import Settings
from agentrt.services.ledger import MAX_TOKENS, implausible_amount, usage_plausible

LIMIT_SETTINGS = {
    'request_limit': 'AGENTRT_TURN_REQUEST_LIMIT',
    'tool_calls_limit': 'AGENTRT_TURN_TOOL_CALLS_LIMIT',
    'total_tokens_limit': 'AGENTRT_TURN_TOTAL_TOKENS_LIMIT',
}
"""pydantic-ai's name of each limit and the setting that sets it, for error messages."""
_COUNTS = ('input_tokens', 'output_tokens', 'cache_read_tokens', 'cache_write_tokens', 'total_tokens')
"""The run usage's counts the ledger has columns for (and `details['reasoning_tokens']`)."""


@dataclass(repr=False, kw_only=True)
class MeasuredUsageLimits(UsageLimits):
    """`UsageLimits` read on what the ledger takes for a measurement: no token or cost limit is read on a sum that
    holds an amount no request has (`implausible_amount`: a trillion tokens or more in any count, a fraction, a cost
    of `MAX_COST_USD` or more or of more than `MAX_COST_DECIMALS` places), for the ledger records the response that
    brought it unmeasured, counts and cost together.

    pydantic-ai adds a response's usage to the run's before the ledger sees it, and checks the limits on that sum (on
    each streamed chunk, with a caller's own token limits): a proxy's 2^70 tokens or a gateway's 10^15 USD ended the
    turn as over its limit, where the ledger recorded the request unmeasured (QA); on a stream, so did plausible
    counts beside such a cost, or beside 2^70 cached or reasoning tokens (QA). The ledger then takes such usage back
    out of the run's (`LedgerCapability`), so later checks read the measured rest.
    """

    _request: Any = field(default=None, init=False, repr=False, compare=False)
    """The model request in flight (the ledger's `InFlight`, set by `watch_request`), whose stream's usage so far is
    in the sums pydantic-ai checks on each chunk."""

    def watch_request(self, flight: Any) -> None:
        """The ledger's note of the request in flight (None once it ended), called by `LedgerCapability`: a stream
        whose usage so far holds an amount no request has (a gateway's cost of 45 decimal places, lost in pydantic-ai's
        28-digit sum) leaves no trace in the sum, and stopped the turn on counts the ledger records unmeasured (QA)."""
        self._request = flight

    def check_before_request(self, usage: RunUsage) -> None:
        """pydantic-ai's check before each request, on what can be read."""
        self._read_by(usage).check_before_request(usage)

    def check_tokens(self, usage: RunUsage) -> None:
        """pydantic-ai's check after each response (the limits, and its warning when a response reported no usage)."""
        self._read_by(usage).check_tokens(usage)

    def _check_token_limits(self, usage: RunUsage) -> None:
        """pydantic-ai's check of a streamed request's provisional total (its continuations)."""
        self._read_by(usage)._check_token_limits(usage)

    def check_per_request_input_tokens(self, request_input_tokens: int) -> None:
        """pydantic-ai's check of one request's input tokens (on each streamed chunk too), on a count a request has,
        of a response the ledger records measured (plausible counts beside a gateway's 10^15 USD stopped a stream;
        QA)."""
        measured = isinstance(request_input_tokens, int) and request_input_tokens < MAX_TOKENS
        if measured and not self._streaming_unmeasured():
            super().check_per_request_input_tokens(request_input_tokens)

    def check_cost(self, usage: RunUsage, *, warn_if_cost_unavailable: bool = True) -> None:
        """pydantic-ai's cost check, on a cost a request has."""
        self._read_by(usage).check_cost(usage, warn_if_cost_unavailable=warn_if_cost_unavailable)

    def _read_by(self, usage: RunUsage) -> UsageLimits:
        """What `usage` is checked against: these limits (pydantic-ai's checks of them), or plain ones without the
        token and cost limits when it holds an amount no request has."""
        return self._plain(unreadable=True) if self._skips(usage) else cast(UsageLimits, super())

    def _skips(self, usage: RunUsage) -> bool:
        return not _measured(usage) or self._streaming_unmeasured()

    def _streaming_unmeasured(self) -> bool:
        """Whether the stream in flight has reported an amount no request has (its usage so far), or none its request
        can have (past what it was sent with: `SentBounds`)."""
        so_far = getattr(getattr(self._request, 'stream', None), 'usage', None)
        so_far = so_far() if callable(so_far) else so_far  # a method in earlier pydantic-ai
        return so_far is not None and not usage_plausible(so_far, getattr(self._request, 'sent', None))

    def _readable(self, usage: RunUsage) -> UsageLimits:
        """Plain limits without those `usage` cannot be read against."""
        return self._plain(unreadable=self._skips(usage))

    def _plain(self, *, unreadable: bool) -> UsageLimits:
        """These limits as plain `UsageLimits`; without the token and cost limits when `unreadable`."""
        values = {limit.name: getattr(self, limit.name) for limit in fields(UsageLimits)}
        if unreadable:
            values.update(input_tokens_limit=None, output_tokens_limit=None, total_tokens_limit=None, cost_limit=None)
        return UsageLimits(**values)


@dataclass(repr=False, kw_only=True)
class TurnUsageLimits(MeasuredUsageLimits):
    """`UsageLimits` whose token limits are checked on each response, never on each event of a stream.

    With a token limit, pydantic-ai checks it on every streamed event, from a snapshot of the response so far; for a
    model whose profile restores special tokens (open-weight names served by an OpenAI-compatible server: Ollama,
    vLLM) that snapshot runs a regular expression over the whole text each time, so a stream's cost grew with the
    square of its length (QA: an 81 KB answer in 4-character chunks took 35 s, 7 s for `gpt-4o-mini`; 2 s without the
    limit). A turn's token limit bounds its requests, each already bounded by its `max_tokens`, so checking it as each
    response ends (as pydantic-ai does as well) stops the turn at the same request, only not in the middle of it.
    """

    def has_token_limits(self) -> bool:
        """False, so pydantic-ai takes no snapshot per streamed event; `check_tokens` still checks the limits."""
        return False

    def check_tokens(self, usage: RunUsage) -> None:
        """pydantic-ai's check after each response, as plain `UsageLimits` make it (the limits, and its warning when
        a response reported no usage), on what can be read."""
        self._readable(usage).check_tokens(usage)


def measured_limits(limits: UsageLimits) -> UsageLimits:
    """A caller's own `usage_limits=` read as a turn's are (`MeasuredUsageLimits`); a subclass of theirs as it is."""
    if type(limits) is not UsageLimits:
        return limits
    return MeasuredUsageLimits(**{limit.name: getattr(limits, limit.name) for limit in fields(UsageLimits)})


def _measured(usage: RunUsage) -> bool:
    """Whether every count and the cost in `usage` are amounts a request has, as the ledger reads a response's
    (`implausible_amount`): a sum holding one it records unmeasured is not read against a limit."""
    cost: Any = usage.cost  # a Decimal by its type; a float or an int from code that filled it itself
    if isinstance(cost, float):
        if not math.isfinite(cost):
            return False
        cost = Decimal(repr(cost))
    elif isinstance(cost, int) and not isinstance(cost, bool):
        cost = Decimal(cost)
    amounts = {name: getattr(usage, name, 0) for name in _COUNTS}
    amounts['reasoning_tokens'] = usage.details.get('reasoning_tokens', 0)
    return implausible_amount({**amounts, 'total_cost': cost}) is None


def turn_usage_limits(settings: Settings) -> UsageLimits:
    """The usage limits of one chat turn: model requests, tool calls and total tokens (settings `AGENTRT_TURN_*`).

    The request and tool-call limits are checked before a request or a tool call runs, so a turn stopped by them
    sends nothing past the limit; the token limit is checked on each response, so the request that crosses it has
    been sent (and billed) and the turn stops there.
    """
    return TurnUsageLimits(
        request_limit=settings.turn_request_limit,
        tool_calls_limit=settings.turn_tool_calls_limit,
        total_tokens_limit=settings.turn_total_tokens_limit,
    )
