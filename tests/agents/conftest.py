"""Helpers for agent tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
import pytest_asyncio
from logfire.testing import capfire  # noqa: F401 - the fixture, here rather than through logfire's pytest plugin
from openai import AsyncOpenAI
from pydantic_ai.models import Model
from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
from pydantic_ai.providers.openai import OpenAIProvider
from sqlalchemy import select

from agentrt.db.models import Account
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.ledger import LedgerConfig, LLMRequestTracker, set_request_tracker
from tests.fake_openai import FakeOpenAI


async def account_id(slug: str) -> int:
    """The id of the account `slug`."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(select(Account.id).where(Account.slug == slug))).scalar_one()


@pytest_asyncio.fixture
async def clients() -> AsyncIterator[list[AsyncOpenAI]]:
    """The OpenAI clients a test made with `loopback_model`, closed at its end."""
    made: list[AsyncOpenAI] = []
    yield made
    for openai_client in made:
        await openai_client.close()


def loopback_model(api: str, fake: FakeOpenAI, clients: list[AsyncOpenAI], timeout: float | None = None) -> Model:
    """`gpt-4o-mini` on the `FakeOpenAI` server over its Chat Completions (`api='chat'`) or Responses API, its
    client added to `clients`; `timeout` (seconds per read) when given, else the SDK's own."""
    # No SDK retries: one model request is one HTTP request, and the test stays fast.
    options: dict[str, Any] = {} if timeout is None else {'timeout': timeout}
    openai_client = AsyncOpenAI(base_url=fake.base_url, api_key='sk-test', max_retries=0, **options)
    clients.append(openai_client)
    provider = OpenAIProvider(openai_client=openai_client)
    if api == 'chat':
        return OpenAIChatModel('gpt-4o-mini', provider=provider)
    return OpenAIResponsesModel('gpt-4o-mini', provider=provider)


@pytest.fixture
def long_commit_delay() -> Iterator[None]:
    """A commit delay no demo turn outlasts however slow the machine: its rows wait for its end (the default delay,
    50 ms, covers a demo turn on a machine that is not overloaded; BENCHMARKS section 3b). Also what lets a test
    expect every stored response with its stamps: a row whose delay passed first is taken as it is then (README)."""
    previous = set_request_tracker(LLMRequestTracker(replace(LedgerConfig.from_env(), commit_delay_ms=5000)))
    try:
        yield
    finally:
        set_request_tracker(previous)
