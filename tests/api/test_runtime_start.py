"""`create_app()` mounted inside another application: the first request starts the runtime (`api/runtime_start.py`)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from sqlalchemy import make_url

from tests.api.conftest import Keys
from tests.programs import run_program

MOUNTED = textwrap.dedent(
    """
    import asyncio, sys
    import httpx2 as httpx
    from fastapi import FastAPI
    from agentrt.agents.runtime import shutdown_runtime
    from agentrt.api.app import create_app

    outer = FastAPI()  # the program's own app; a server runs its lifespan, never a mounted app's
    outer.mount('/agent', create_app())

    @outer.get('/mine')
    async def mine():
        return {'mine': True}

    async def main():
        transport = httpx.ASGITransport(app=outer)  # runs no lifespan at all
        async with httpx.AsyncClient(transport=transport, base_url='http://test') as client:
            print((await client.get('/mine')).json())
            me = await client.get('/agent/api/v1/me', headers={'Authorization': f'Bearer {sys.argv[1]}'})
            print(me.status_code, me.json().get('account'))
            print((await client.get('/agent/health/ready')).json()['status'])
            turn = await client.post(
                '/agent/api/v1/conversations/mounted-1/turns',
                json={'message': 'Dermatologists in Boston'},
                headers={'Authorization': f'Bearer {sys.argv[1]}'},
            )
            print(turn.status_code, 'Dermatology' in turn.json().get('output', ''))
        await shutdown_runtime()  # what the program's own shutdown does

    asyncio.run(main())
    """
)


async def test_a_mounted_app_starts_the_runtime_at_its_first_request(database_url: str, keys: Keys) -> None:
    """`outer.mount('/agent', create_app())`: Starlette runs only the served app's lifespan, so the mounted app's
    never started the runtime, and every request answered 503 `database_unavailable` ("unreachable" from
    `/health/ready`) with PostgreSQL up. Now its first request starts it, and the turn runs."""
    done = await run_program('-c', MOUNTED, keys.acme, database_url=database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["{'mine': True}", '200 acme-health', 'ready', '200 True'], (
        done.stdout + done.stderr
    )


MISCONFIGURED = textwrap.dedent(
    """
    import asyncio, logging
    import httpx2 as httpx
    from fastapi import FastAPI
    from agentrt.api.app import create_app

    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')
    outer = FastAPI()
    outer.mount('/agent', create_app())

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url='http://test') as client:
            for path in ('/agent/api/v1/me', '/agent/health/ready'):
                answer = await client.get(path, headers={'Authorization': 'Bearer agk_x'})
                print(answer.status_code, answer.json()['type'], answer.json()['error_id'].startswith('err_'))

    asyncio.run(main())
    """
)


async def test_a_mounted_app_whose_login_postgresql_refuses_answers_configuration_error(database_url: str) -> None:
    """A refused login (an unknown role in `DATABASE_URL`) is configuration, not an outage: a mounted app answered
    503 `database_unavailable`, "try again shortly", to every request, as the served app would never have (it exits
    2 at its start). Now 500 `configuration_error`, as a route answers for one; the log has the server's words."""
    refused = make_url(database_url).set(username='no_such_role').render_as_string(hide_password=False)
    done = await run_program('-c', MISCONFIGURED, database_url=refused)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['500 configuration_error True'] * 2, done.stdout + done.stderr
    assert 'role "no_such_role" does not exist' in done.stderr and 'in DATABASE_URL' in done.stderr, done.stderr


def _readme_mount_example() -> str:
    """The ```python block README's "Serving over HTTP" gives for mounting the app in a program's own."""
    text = (Path(__file__).resolve().parents[2] / 'README.md').read_text()
    section = text[text.index('In your own FastAPI application, mount it') :]
    match = re.search(r'```python\n(.*?)```', section, re.DOTALL)
    assert match is not None, 'README.md: no python block after "In your own FastAPI application, mount it"'
    return match.group(1)


async def test_the_readmes_mounting_example_runs_as_written(database_url: str, keys: Keys) -> None:
    """README's lifespan for a program that mounts the app: started before the first request, shut down at its end."""
    runner = textwrap.dedent(
        """
        import asyncio, sys
        import httpx2 as httpx
        from agentrt.db.engine import current_engine

        async def main():
            async with app.router.lifespan_context(app):  # what the program's server runs
                print('started', current_engine() is not None)
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url='http://test') as client:
                    me = await client.get('/agent/api/v1/me', headers={'Authorization': f'Bearer {sys.argv[1]}'})
                    print(me.status_code, me.json().get('account'))
            print('stopped', current_engine() is None)

        asyncio.run(main())
        """
    )
    done = await run_program('-c', _readme_mount_example() + runner, keys.acme, database_url=database_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ['started True', '200 acme-health', 'stopped True'], done.stdout + done.stderr


LIFESPANS_NESTED = textwrap.dedent(
    """
    import asyncio, sys
    from contextlib import asynccontextmanager
    import httpx2 as httpx
    from fastapi import FastAPI
    from sqlalchemy import text
    from agentrt.agents.runtime import agentrt_runtime
    from agentrt.api.app import create_app
    from agentrt.db.engine import current_engine
    from agentrt.db.session import Unscoped, get_db_session

    SUB = create_app()  # manage_runtime=True: its lifespan starts the runtime and shuts it down

    async def one():
        async with get_db_session(account=Unscoped.ADMIN) as session:
            return (await session.execute(text('SELECT 1'))).scalar_one()

    @asynccontextmanager
    async def app_inside(app):  # the program's block around the mounted app's lifespan
        async with agentrt_runtime():
            async with SUB.router.lifespan_context(SUB):
                yield
            print('after the app', await one())  # was DatabaseNotInitializedError: the app's end shut it down

    @asynccontextmanager
    async def app_around(app):  # the other way round
        async with SUB.router.lifespan_context(SUB):
            async with agentrt_runtime():
                yield
            print('after the block', await one())

    async def serve(lifespan):
        host = FastAPI(lifespan=lifespan)
        host.mount('/agent', SUB)
        async with host.router.lifespan_context(host):  # what the program's server runs
            transport = httpx.ASGITransport(app=host)
            async with httpx.AsyncClient(transport=transport, base_url='http://test') as client:
                me = await client.get('/agent/api/v1/me', headers={'Authorization': f'Bearer {sys.argv[1]}'})
                print(me.status_code, me.json().get('account'))
        print('down', current_engine() is None)

    async def main():
        await serve(app_inside)
        await serve(app_around)

    asyncio.run(main())
    """
)


async def test_the_apps_lifespan_and_an_agentrt_runtime_block_nest_either_way(database_url: str, keys: Keys) -> None:
    """`create_app()`'s lifespan run inside a program's `agentrt_runtime()` block shut the runtime down at its end,
    under the block: the program's own sessions after it failed with `DatabaseNotInitializedError` (QA). Now the
    lifespan counts as one of the blocks, either way round: the runtime shuts down as the outer one ends."""
    done = await run_program('-c', LIFESPANS_NESTED, keys.acme, database_url=database_url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        '200 acme-health',
        'after the app 1',
        'down True',
        '200 acme-health',
        'after the block 1',
        'down True',
    ], done.stdout + done.stderr[-3000:]
