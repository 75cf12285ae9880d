"""`PricedModel`: a model named `gpt-4o-mini` (priced by genai-prices) that spends the most a budget allows.

Plain and streamed, every response reports as input tokens the byte bound of what it was sent (as many as a
byte-level tokenizer could ever make of it) and as output tokens the request's `max_tokens` (the worst case: it
writes all it may). A gate holds requests until the test opens it, so a test can look at what racing requests hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic_ai import ModelResponse, TextPart
from pydantic_ai.messages import ModelMessage, ModelResponseStreamEvent
from pydantic_ai.models import Model, ModelRequestParameters, StreamedResponse
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import RequestUsage
from sqlalchemy import text

from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.budgets import RequestSizes
from agentrt.services.ledger import utc_now

DEFAULT_OUTPUT_TOKENS = 4096  # what the model writes when no max_tokens is set


class PricedModel(Model):
    """gpt-4o-mini, offline: answers `reply`, reporting the most usage the request allows (see the module)."""

    def __init__(
        self, reply: str = 'ok', *, gate: asyncio.Event | None = None, output_tokens: int | None = None
    ) -> None:
        super().__init__()
        self.reply = reply
        self.gate = gate
        self.output_tokens = output_tokens
        self.arrived = 0
        self.max_tokens_seen: list[int | None] = []

    @property
    def model_name(self) -> str:
        return 'gpt-4o-mini'

    @property
    def system(self) -> str:
        return 'openai'

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        usage = await self._arrive(messages, model_settings, model_request_parameters)
        return ModelResponse(
            parts=[TextPart(self.reply)], usage=usage, model_name=self.model_name, provider_name='openai'
        )

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: Any = None,
    ) -> AsyncGenerator[StreamedResponse]:
        usage = await self._arrive(messages, model_settings, model_request_parameters)
        yield _Stream(model_request_parameters, _text=self.reply, _final_usage=usage)

    async def _arrive(
        self, messages: list[ModelMessage], settings: ModelSettings | None, parameters: ModelRequestParameters
    ) -> RequestUsage:
        self.arrived += 1
        max_tokens = (settings or {}).get('max_tokens')
        self.max_tokens_seen.append(max_tokens)
        if self.gate is not None:
            await self.gate.wait()
        output = self.output_tokens if self.output_tokens is not None else (max_tokens or DEFAULT_OUTPUT_TOKENS)
        return RequestUsage(input_tokens=RequestSizes().input_tokens_bound(messages, parameters), output_tokens=output)


@dataclass
class _Stream(StreamedResponse):
    _text: str = ''
    _final_usage: RequestUsage = field(default_factory=RequestUsage)
    _started: datetime = field(default_factory=utc_now)

    async def _get_event_iterator(self) -> AsyncIterator[ModelResponseStreamEvent]:
        for event in self._parts_manager.handle_text_delta(vendor_part_id='content', content=self._text):
            yield event
        self._usage = self._final_usage

    @property
    def model_name(self) -> str:
        return 'gpt-4o-mini'

    @property
    def provider_name(self) -> str | None:
        return 'openai'

    @property
    def provider_url(self) -> str | None:
        return None

    @property
    def timestamp(self) -> datetime:
        return self._started


@dataclass(frozen=True)
class HeldAmounts:
    """A hold's amount and the input's share of it."""

    amount_usd: Decimal
    input_usd: Decimal


class LongAnswerModel(PricedModel):
    """A `PricedModel` that streams a long answer, `chunks` pieces of `CHUNK_TOKENS` words each, and reports its usage
    only with the last one (as OpenAI's Chat Completions do): a stream cut before its end was billed by the provider
    for what it produced (`produced_tokens`), though it never said so. After `pause_after` pieces it waits for
    `resume` (set it to let the answer go on), so a test can cut it there; `paused` is set when it waits."""

    CHUNK_TOKENS = 50

    def __init__(self, chunks: int = 40, pause_after: int = 4) -> None:
        super().__init__()
        self.chunks = chunks
        self.pause_after = pause_after
        self.resume = asyncio.Event()
        self.paused = asyncio.Event()
        self.produced_tokens = 0
        self.held: list[HeldAmounts] = []
        """What each request held as it arrived (the newest hold then)."""

    async def _arrive(
        self, messages: list[ModelMessage], settings: ModelSettings | None, parameters: ModelRequestParameters
    ) -> RequestUsage:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            newest = text('SELECT amount_usd, input_usd FROM budget_reservations ORDER BY created_at DESC LIMIT 1')
            amount, input_usd = (await session.execute(newest)).one()
        self.held.append(HeldAmounts(amount, input_usd))
        return await super()._arrive(messages, settings, parameters)

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: Any = None,
    ) -> AsyncGenerator[StreamedResponse]:
        usage = await self._arrive(messages, model_settings, model_request_parameters)
        yield _LongStream(model_request_parameters, _model=self, _input_tokens=usage.input_tokens)


@dataclass
class _LongStream(_Stream):
    _model: LongAnswerModel | None = None
    _input_tokens: int = 0

    async def _get_event_iterator(self) -> AsyncIterator[ModelResponseStreamEvent]:
        model = self._model
        assert model is not None
        for index in range(model.chunks):
            if index == model.pause_after:
                model.paused.set()
                await model.resume.wait()
            model.produced_tokens += model.CHUNK_TOKENS
            for event in self._parts_manager.handle_text_delta(vendor_part_id='content', content='word ' * 50):
                yield event
        self._usage = RequestUsage(input_tokens=self._input_tokens, output_tokens=model.produced_tokens)
