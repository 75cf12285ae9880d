"""Usage limits per chat turn, from the settings (`AGENTRT_TURN_*`).

pydantic-ai applies `UsageLimits` to the usage a run starts from; a conversation passed with `conversation=`
carries its lifetime usage, so a limit meant for one turn would be spent by the turns before it (a conversation
died for good at turn 17). The chat layer starts each run from zero usage and adds the turn to the conversation's
lifetime usage when it saves, so these limits bound one turn and the lifetime figures stay on the record.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from decimal import Decimal

from pydantic_ai.usage import RunUsage, UsageLimits

from agentrt.db.settings import Settings
from agentrt.services.ledger import MAX_COST_USD, MAX_TOKENS

LIMIT_SETTINGS = {
    'request_limit': 'AGENTRT_TURN_REQUEST_LIMIT',
    'tool_calls_limit': 'AGENTRT_TURN_TOOL_CALLS_LIMIT',
    'total_tokens_limit': 'AGENTRT_TURN_TOTAL_TOKENS_LIMIT',
}
"""pydantic-ai's name of each limit and the setting that sets it, for error messages."""


@dataclass(repr=False, kw_only=True)
class MeasuredUsageLimits(UsageLimits):
    """`UsageLimits` read on what the ledger takes for a measurement: token limits not on counts no request has (a
    trillion tokens or more, a fraction), a cost limit not on a cost no request has (`MAX_COST_USD` or more).

    pydantic-ai adds a response's usage to the run's before the ledger sees it, and checks the limits on that sum (on
    each streamed chunk, with a caller's own token limits): a proxy's 2^70 tokens or a gateway's 10^15 USD ended the
    turn as over its limit, where the ledger recorded the request unmeasured (QA). The ledger then takes such usage
    back out of the run's (`LedgerCapability`), so later checks read the measured rest.
    """

    def check_before_request(self, usage: RunUsage) -> None:
        """pydantic-ai's check before each request, on what can be read."""
        if self._skips(usage):
            self._readable(usage).check_before_request(usage)
        else:
            super().check_before_request(usage)

    def check_tokens(self, usage: RunUsage) -> None:
        """pydantic-ai's check after each response (the limits, and its warning when a response reported no usage)."""
        if self._skips(usage):
            self._readable(usage).check_tokens(usage)
        else:
            super().check_tokens(usage)

    def _check_token_limits(self, usage: RunUsage) -> None:
        """pydantic-ai's check of a streamed request's provisional total (its continuations)."""
        if self._skips(usage):
            self._readable(usage)._check_token_limits(usage)
        else:
            super()._check_token_limits(usage)

    def check_per_request_input_tokens(self, request_input_tokens: int) -> None:
        """pydantic-ai's check of one request's input tokens (on each streamed chunk too), on a count a request has."""
        if isinstance(request_input_tokens, int) and request_input_tokens < MAX_TOKENS:
            super().check_per_request_input_tokens(request_input_tokens)

    def check_cost(self, usage: RunUsage, *, warn_if_cost_unavailable: bool = True) -> None:
        """pydantic-ai's cost check, on a cost a request has."""
        if self._skips(usage):
            self._readable(usage).check_cost(usage, warn_if_cost_unavailable=warn_if_cost_unavailable)
        else:
            super().check_cost(usage, warn_if_cost_unavailable=warn_if_cost_unavailable)

    def _skips(self, usage: RunUsage) -> bool:
        return not (_counted(usage) and _priced(usage))

    def _readable(self, usage: RunUsage) -> UsageLimits:
        """Plain limits without those `usage` cannot be read against."""
        values = {field.name: getattr(self, field.name) for field in fields(UsageLimits)}
        if not _counted(usage):
            values.update(input_tokens_limit=None, output_tokens_limit=None, total_tokens_limit=None)
        if not _priced(usage):
            values['cost_limit'] = None
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
    return MeasuredUsageLimits(**{field.name: getattr(limits, field.name) for field in fields(UsageLimits)})


def _counted(usage: RunUsage) -> bool:
    """Whether `usage` holds token counts a request has (whole numbers under `MAX_TOKENS`), a limit can be read on."""
    counts = (usage.input_tokens, usage.output_tokens, usage.total_tokens)
    return all(isinstance(count, int) and count < MAX_TOKENS for count in counts)


def _priced(usage: RunUsage) -> bool:
    """Whether `usage`'s cost (if any) is one a request has."""
    cost = usage.cost
    return cost is None or (isinstance(cost, int | float | Decimal) and 0 <= cost < MAX_COST_USD)


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
