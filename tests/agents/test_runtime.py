"""`agentrt_runtime()` blocks in a program of a user's own: nested and overlapping blocks on one event loop."""

from __future__ import annotations

import textwrap

from tests.programs import run_program

NESTED = textwrap.dedent(
    """
    import asyncio
    from sqlalchemy import text
    from agentrt.agents.runtime import agentrt_runtime
    from agentrt.db.errors import DatabaseNotInitializedError
    from agentrt.db.session import Unscoped, get_db_session

    async def one() -> int:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            return (await session.execute(text('SELECT 1'))).scalar_one()

    async def helper() -> None:  # a library's helper, with a block of its own
        async with agentrt_runtime():
            print('inner', await one())

    async def overlapping(delay: float) -> None:
        async with agentrt_runtime():
            await asyncio.sleep(delay)
            print('overlapping', delay, await one())

    async def main() -> None:
        async with agentrt_runtime():
            await helper()
            print('after inner', await one())  # was DatabaseNotInitializedError: the inner end shut it down
            await asyncio.gather(overlapping(0.0), overlapping(0.3))
        try:
            await one()
        except DatabaseNotInitializedError:
            print('down after the last block')

    asyncio.run(main())
    """
)


async def test_a_nested_block_leaves_the_runtime_up_for_the_block_around_it(database_url: str) -> None:
    done = await run_program('-c', NESTED, database_url=database_url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split('\n')[:-1] == [
        'inner 1',
        'after inner 1',
        'overlapping 0.0 1',
        'overlapping 0.3 1',
        'down after the last block',
    ], done.stdout + done.stderr[-3000:]
