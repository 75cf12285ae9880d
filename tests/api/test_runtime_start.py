"""`create_app()` mounted inside another application: the first request starts the runtime (`api/runtime_start.py`)."""

from __future__ import annotations

import re
import socket
import textwrap
from pathlib import Path

import httpx2
import pytest
from fastapi import FastAPI
from sqlalchemy import make_url

from agentrt.api.app import create_app
from agentrt.db import engine
from agentrt.db.settings import Settings
from tests.api.conftest import Keys, auth
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


NEVER_STARTED = textwrap.dedent(
    """
    import asyncio, sys
    import httpx2 as httpx
    from fastapi import FastAPI
    from agentrt.agents.runtime import agentrt_runtime
    from agentrt.api.app import create_app

    outer = FastAPI()  # told the app it starts the runtime, and has no lifespan that does
    outer.mount('/agent', create_app(manage_runtime=False))
    KEY = {'Authorization': f'Bearer {sys.argv[1]}'}

    async def ask(client):
        listed = await client.get('/agent/api/v1/conversations', headers=KEY)
        print(listed.status_code, listed.json()['type'], listed.headers.get('retry-after'))
        print(listed.json()['detail'])
        ready = await client.get('/agent/health/ready')
        print(ready.status_code, ready.json()['database']['error'].split(' (error id ')[0])

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url='http://test') as client:
            await ask(client)  # never started in this process
            async with agentrt_runtime():
                print((await client.get('/agent/api/v1/conversations', headers=KEY)).status_code)
            await ask(client)  # shut down: what a stopping server's last requests meet

    asyncio.run(main())
    """
)


async def test_an_app_whose_program_never_starts_the_runtime_answers_configuration_error(
    database_url: str, keys: Keys
) -> None:
    """`create_app(manage_runtime=False)` mounted in a program that never starts the runtime answered every request
    503 `database_unavailable`, "try again shortly", and readiness "unreachable", for ever (QA): a mistake of the
    program's, which no retry mends. Now 500 `configuration_error` saying so, and readiness says it was never started;
    after a shutdown it is the 503 it was."""
    done = await run_program('-c', NEVER_STARTED, keys.acme, database_url=database_url)
    assert done.returncode == 0, done.stderr[-3000:]
    never, detail, never_ready, started, down, down_detail, down_ready = done.stdout.splitlines()
    assert never == '500 configuration_error None', done.stdout + done.stderr[-3000:]
    assert 'create_app(manage_runtime=False)' in detail and 'nothing started it' in detail, detail
    assert 'README "Serving over HTTP"' in detail, detail
    assert never_ready.startswith('503 the runtime was never started: create_app(manage_runtime=False)'), never_ready
    assert started == '200'
    assert down == '503 database_unavailable 5', done.stdout
    assert down_detail == 'the database is unavailable; try again shortly'
    assert down_ready == '503 unreachable', down_ready


async def test_a_mounted_app_whose_start_failed_still_answers_database_unavailable(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other runtime that is not running without a shutdown: a mounted `create_app()` tried to start it and
    # PostgreSQL refused the connection. That may pass: still 503, "try again shortly", not `configuration_error`.
    monkeypatch.setattr(engine, '_runtime', None)
    monkeypatch.setattr(engine, '_start_tried', False)
    monkeypatch.setattr(engine, '_shut_down', False)
    with socket.socket() as refusing:
        refusing.bind(('127.0.0.1', 0))  # bound, not listening: connections are refused
        down = f'postgresql://nobody@127.0.0.1:{refusing.getsockname()[1]}/none'
        outer = FastAPI()
        outer.mount('/agent', create_app(settings=Settings(database_url=down, connect_timeout=2)))
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=outer), base_url='http://test') as client:
            listed = await client.get('/agent/api/v1/conversations', headers=auth(keys.acme))
    assert listed.status_code == 503 and listed.json()['type'] == 'database_unavailable', listed.text
