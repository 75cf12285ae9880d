"""A process that starts a chat turn and never finishes it, so a test can SIGKILL it while it holds the conversation.

`python -m tests.agents.turn_and_die DATABASE_URL SESSION_ID DATA_DIR`: runs `simple_chat` on the conversation (account
`acme-health`) with a model that never answers; prints `{"at_model": true}` once the turn has claimed the conversation
and reached the model, then waits to be killed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agentrt.agents.simple_chat import simple_chat
from agentrt.db.engine import init_database
from agentrt.db.settings import Settings


async def main(url: str, session_id: str, data_dir: Path) -> None:
    # A directory of the test's (this process is killed: it cannot remove one of its own).
    await init_database(Settings(database_url=url, data_dir=data_dir, pool_size=5), migrate=False)
    reached = asyncio.Event()

    async def never(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        reached.set()
        await asyncio.Event().wait()
        raise AssertionError('unreachable')

    turn = asyncio.create_task(
        simple_chat(
            'Find me cardiologists in Seattle', session_id=session_id, account='acme-health', model=FunctionModel(never)
        )
    )
    await reached.wait()
    print(json.dumps({'at_model': True}), flush=True)
    await turn


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
