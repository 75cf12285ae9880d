"""`ContextWindow`: the capability that bounds what each model request sends (the history processor, request-only).

pydantic-ai's own `ProcessHistory` capability runs a history processor before every model request and also writes
its output back into the run's history. That write-back would drop the folded turns from the run's messages
(`result.all_messages()`), and the next request of the same turn would fold a history that was already folded.
`ContextWindow` runs the same kind of processor (`fit_history`) in the same hook, `before_model_request`, but only
on the request's copy of the messages (the hook's documented "request-only messages"): the run keeps its whole
history and the store appends to the record as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pydantic_ai import RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.models import ModelRequestContext

from agentrt.services.conversations import FitMemo, fit_history


@dataclass
class ContextWindow(AbstractCapability[Any]):
    """Send each model request within a token budget: the latest turns whole, older ones folded into a summary.

    Add it to a run (`agent.run(..., capabilities=[ContextWindow(16_000)])`) or to an agent. `simple_chat` adds one
    per turn from `AGENTRT_CONTEXT_MAX_TOKENS`, with the conversation's title and whether its load left older
    messages in the database.
    """

    max_tokens: int
    """The budget of the history sent (instructions and tool definitions come on top)."""
    title: str | None = None
    """The conversation's title: the topic line of the summary."""
    earlier_omitted: bool = False
    """The run's history does not start the conversation (older messages were not loaded)."""
    _memo: FitMemo = field(default_factory=FitMemo, repr=False, compare=False)

    async def for_run(self, ctx: RunContext[Any]) -> ContextWindow:
        """A copy per run: its requests share estimates and the summary (`FitMemo`), other runs do not."""
        return replace(self, _memo=FitMemo())

    async def before_model_request(
        self, ctx: RunContext[Any], request_context: ModelRequestContext
    ) -> ModelRequestContext:
        """Replace the request's messages with those `fit_history` keeps; the run's history stays whole."""
        request_context.messages = fit_history(
            request_context.messages,
            max_tokens=self.max_tokens,
            title=self.title,
            earlier_omitted=self.earlier_omitted,
            memo=self._memo,
        )
        return request_context
