"""The one place where what a pydantic-ai run raises becomes one of the runtime's documented errors.

`simple_chat`, `simple_chat_stream` (and through them the CLI and the HTTP API) run the agent inside
`documented_errors()`, so nothing undocumented escapes from a run: README.md lists what does. Errors the runtime
raises itself (`AgentRuntimeError` subclasses, e.g. `ConcurrentTurnError` from the turn guard) pass through.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from pydantic_ai.exceptions import UnexpectedModelBehavior, UsageLimitExceeded

from agentrt.agents.turn_limits import LIMIT_SETTINGS
from agentrt.db.errors import AgentRuntimeError, ModelBehaviorError, TurnLimitExceededError


def documented_error(exc: BaseException) -> AgentRuntimeError | None:
    """The documented error that stands for `exc`, raised by a run; None when `exc` is not one to translate.

    - `UsageLimitExceeded` -> `TurnLimitExceededError`, naming the limit and its setting;
    - `UnexpectedModelBehavior` (tool retries exhausted, output cut off by its token limit, a content filter)
      -> `ModelBehaviorError`, keeping the body the model sent.

    Provider failures (`ModelHTTPError`, `ModelAPIError`) belong here too, as `ModelProviderError`; until they are
    added they pass through unchanged.
    """
    if isinstance(exc, AgentRuntimeError):
        return None
    if isinstance(exc, UsageLimitExceeded):
        return TurnLimitExceededError(_limit_message(exc.message))
    if isinstance(exc, UnexpectedModelBehavior):
        return ModelBehaviorError(f'the model did not produce a usable answer: {exc.message}', body=exc.body)
    return None


@contextmanager
def documented_errors() -> Iterator[None]:
    """Re-raise what `documented_error` translates as its documented error (the original is its `__cause__`)."""
    try:
        yield
    except Exception as exc:
        translated = documented_error(exc)
        if translated is None:
            raise
        raise translated from exc


def _limit_message(message: str) -> str:
    found = re.search(r'\b(\w+_limit)\b', message)
    setting = LIMIT_SETTINGS.get(found.group(1)) if found else None
    where = f' ({setting})' if setting else ''
    return f'this turn reached its usage limit{where}: {message.rstrip(".")}; the turn stopped and was not saved'
