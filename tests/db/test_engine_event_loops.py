"""The runtime and event loops: a new loop after one that ended, loops in threads (`db/engine.py`).

Each scenario runs in a new interpreter: the runtime is one per process, and these tests start and drop it.
"""

from __future__ import annotations

import subprocess
import textwrap

from tests.programs import run_program


async def _python(script: str, database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return await run_program('-c', textwrap.dedent(script), database_url=database_url, **env)


async def test_starts_that_wait_for_each_other_on_a_second_event_loop(database_url: str) -> None:
    """Two starts at once on one `asyncio.run`, then two at once on the next: the lock they queue on was one for the
    process, bound to the first loop that waited on it, and the second loop's waiter got asyncio's raw
    "RuntimeError: <Lock> is bound to a different event loop" (two first turns of a script's second `asyncio.run`)."""
    done = await _python(
        """
        import asyncio
        from agentrt.db.engine import init_database

        async def two_starts():
            engines = await asyncio.gather(init_database(), init_database(), return_exceptions=True)
            print([type(engine).__name__ for engine in engines])

        asyncio.run(two_starts())
        asyncio.run(two_starts())
        """,
        database_url,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['AsyncEngine', 'AsyncEngine']"] * 2, done.stdout + done.stderr


async def test_an_event_loop_in_another_thread_is_refused_while_the_first_runs_the_runtime(database_url: str) -> None:
    """A second event loop running at the same time (a thread of the program with its own `asyncio.run`) got the
    first loop's engine: its sessions used connections of the other loop and waited for ever, and its
    `shutdown_runtime()` closed the other loop's pool under it. Now each is a `ConfigError` saying why, and the first
    loop's runtime goes on untouched."""
    done = await _python(
        """
        import asyncio, threading
        from sqlalchemy import text
        from agentrt.agents.runtime import agentrt_runtime, shutdown_runtime
        from agentrt.db.engine import init_database
        from agentrt.db.errors import ConfigError
        from agentrt.db.roles import Unscoped
        from agentrt.db.session import get_db_session

        started, other_done = threading.Event(), threading.Event()

        async def query():
            async with get_db_session(account=Unscoped.ADMIN) as session:
                return (await session.execute(text('SELECT 1'))).scalar_one()

        async def attempt(name, step):
            try:
                await asyncio.wait_for(step(), 20)  # a hang is what this test is about: say so instead
                print(name, 'allowed')
            except ConfigError as exc:
                print(name, 'refused', 'another event loop' in str(exc))
            except TimeoutError:
                print(name, 'hung')

        async def other():
            await attempt('init', init_database)
            await attempt('session', query)
            await attempt('shutdown', shutdown_runtime)
            async def runtime():
                async with agentrt_runtime():
                    pass
            await attempt('agentrt_runtime', runtime)

        def in_thread():
            started.wait()
            try:
                asyncio.run(other())
            finally:
                other_done.set()

        async def main():
            async with agentrt_runtime():
                print('first', await query())
                started.set()
                await asyncio.to_thread(other_done.wait)
                print('first still', await query())

        thread = threading.Thread(target=in_thread)
        thread.start()
        asyncio.run(main())
        thread.join()
        """,
        database_url,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        'first 1',
        'init refused True',
        'session refused True',
        'shutdown refused True',
        'agentrt_runtime refused True',
        'first still 1',
    ], done.stdout + done.stderr


async def test_a_session_on_a_new_event_loop_after_one_that_ended_without_shutdown(database_url: str) -> None:
    """A program's own session opened on a new `asyncio.run` before any turn started the database afresh: the pool
    still held the ended loop's connections, and SQLAlchemy logged a traceback ("Exception terminating connection
    ... Event loop is closed") for each as it replaced them. Now the pool follows the new loop quietly."""
    done = await _python(
        """
        import asyncio
        from sqlalchemy import text
        from agentrt.db.engine import init_database
        from agentrt.db.roles import Unscoped
        from agentrt.db.session import get_db_session

        async def query(tag):
            async with get_db_session(account=Unscoped.ADMIN) as session:
                print(tag, (await session.execute(text('SELECT 1'))).scalar_one())

        async def first():
            await init_database()
            await asyncio.gather(query('first'), query('first'))  # two connections in the pool

        asyncio.run(first())
        asyncio.run(query('second'))
        asyncio.run(query('third'))
        """,
        database_url,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['first 1', 'first 1', 'second 1', 'third 1'], done.stdout + done.stderr
    assert 'Traceback' not in done.stderr and 'Event loop is closed' not in done.stderr, done.stderr


async def test_work_that_outlived_a_shutdown_is_told_so(database_url: str) -> None:
    """A turn still running when the program shut the runtime down got "the database is not initialised: run inside
    agentrt_runtime()", advice for a program that never started it. Now the error says it was shut down meanwhile;
    a start after it works as before."""
    done = await _python(
        """
        import asyncio
        from sqlalchemy import text
        from agentrt.agents.runtime import shutdown_runtime
        from agentrt.db.engine import init_database
        from agentrt.db.errors import DatabaseNotInitializedError
        from agentrt.db.roles import Unscoped
        from agentrt.db.session import get_db_session

        async def query():
            async with get_db_session(account=Unscoped.ADMIN) as session:
                return (await session.execute(text('SELECT 1'))).scalar_one()

        async def main():
            try:
                await query()
            except DatabaseNotInitializedError as exc:
                print('before', 'run inside' in str(exc))
            await init_database()
            await shutdown_runtime()
            try:
                await query()
            except DatabaseNotInitializedError as exc:
                print('after', 'was shut down' in str(exc), 'run inside' in str(exc))
            await init_database()
            print('again', await query())
            await shutdown_runtime()

        asyncio.run(main())
        """,
        database_url,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['before True', 'after True False', 'again 1'], done.stdout + done.stderr


async def test_a_runtime_that_never_started_for_invalid_settings_shuts_down_quietly(database_url: str) -> None:
    """`agentrt_runtime()` with an invalid setting: the start's ConfigError was raised again by its `finally`'s
    `shutdown_runtime()` (it made the ledger's tracker only to close it, reading the settings), so the program's
    traceback pointed at the shutdown and hid the start; and `shutdown_runtime()` alone, nothing started, failed."""
    done = await _python(
        """
        import asyncio, traceback
        from agentrt.agents.runtime import agentrt_runtime, shutdown_runtime
        from agentrt.db.errors import ConfigError

        async def main():
            try:
                async with agentrt_runtime():
                    print('started')
            except ConfigError as exc:
                where = {frame.name for frame in traceback.extract_tb(exc.__traceback__)}
                named = 'DB_POOL_SIZE' in str(exc)
                print('start refused', named, 'init_database' in where, 'shutdown_runtime' in where)
            print('shutdown', await shutdown_runtime())

        asyncio.run(main())
        """,
        database_url,
        DB_POOL_SIZE='nan',
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['start refused True True False', 'shutdown None'], done.stdout + done.stderr
