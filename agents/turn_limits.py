"""Usage limits per chat turn, from the settings (`AGENTRT_TURN_*`).

pydantic-ai applies `UsageLimits` to the usage a run starts from; a conversation passed with `conversation=`
carries its lifetime usage, so a limit meant for one turn would be spent by the turns before it (a conversation
died for good at turn 17). The chat layer starts each run from zero usage and adds the turn to the conversation's
lifetime usage when it saves, so these limits bound one turn and the lifetime figures stay on the record.
"""

from __future__ import annotations

from pydantic_ai.usage import UsageLimits

from agentrt.db.settings import Settings

LIMIT_SETTINGS = {
    'request_limit': 'AGENTRT_TURN_REQUEST_LIMIT',
    'tool_calls_limit': 'AGENTRT_TURN_TOOL_CALLS_LIMIT',
    'total_tokens_limit': 'AGENTRT_TURN_TOTAL_TOKENS_LIMIT',
}
"""pydantic-ai's name of each limit and the setting that sets it, for error messages."""


def turn_usage_limits(settings: Settings) -> UsageLimits:
    """The usage limits of one chat turn: model requests, tool calls and total tokens (settings `AGENTRT_TURN_*`).

    The request and tool-call limits are checked before a request or a tool call runs, so a turn stopped by them
    sends nothing past the limit; the token limit is checked on each response, so the request that crosses it has
    been sent (and billed) and the turn stops there.
    """
    return UsageLimits(
        request_limit=settings.turn_request_limit,
        tool_calls_limit=settings.turn_tool_calls_limit,
        total_tokens_limit=settings.turn_total_tokens_limit,
    )
