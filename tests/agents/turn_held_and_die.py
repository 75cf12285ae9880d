"""A process whose chat turn made one model request (its ledger row held for the commit delay) and never finishes the
second, so a test can SIGKILL it while its writer holds that row.

`python -m tests.agents.turn_held_and_die DATABASE_URL SESSION_ID DATA_DIR plain|streamed`: runs the turn (account
`acme-health`) with a model that first calls a directory tool, then never answers; the ledger's commit delay is 10
minutes (so the first request's row is held, however slow the machine), its spool the one `AGENTRT_LEDGER_SPOOL` names
(the test's). Prints `{"at_second_request": true}` once the second request started, then waits to be killed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
from agentrt.db.engine import init_database
from agentrt.db.settings import Settings
from agentrt.services.ledger import LedgerConfig, LLMRequestTracker, set_request_tracker

QUESTION = 'Find me cardiologists in Seattle'


async def main(url: str, session_id: str, data_dir: Path, streamed: bool) -> None:
    await init_database(Settings(database_url=url, data_dir=data_dir, pool_size=5), migrate=False)
    set_request_tracker(LLMRequestTracker(replace(LedgerConfig.from_env(), commit_delay_ms=600_000)))
    second = asyncio.Event()

    def first_a_tool_then_nothing(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[ToolCallPart('get_directory_entry', {'entry_id': 1}, tool_call_id='c1')])

    async def stream_never(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[DeltaToolCalls | str]:
        if len(messages) == 1:
            yield {0: DeltaToolCall('get_directory_entry', '{"entry_id": 1}', tool_call_id='c1')}
            return
        second.set()
        await asyncio.Event().wait()
        yield 'unreachable'

    async def never(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            return first_a_tool_then_nothing(messages, info)
        second.set()
        await asyncio.Event().wait()
        raise AssertionError('unreachable')

    async def turn() -> None:
        if not streamed:
            await simple_chat(QUESTION, session_id=session_id, account='acme-health', model=FunctionModel(never))
            return
        model = FunctionModel(stream_function=stream_never)
        async with simple_chat_stream(QUESTION, session_id=session_id, account='acme-health', model=model) as stream:
            async for _ in stream:
                pass

    running = asyncio.create_task(turn())
    waiting = asyncio.create_task(second.wait())
    await asyncio.wait([running, waiting], return_when=asyncio.FIRST_COMPLETED)
    if running.done():
        running.result()  # the turn ended before its second request: say why
    print(json.dumps({'at_second_request': True}), flush=True)
    await running


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == 'streamed'))
