"""A database of each xdist worker's own on the run's server (the embedded one, or the one `DATABASE_URL` names).

The workers run at once and every test empties the runtime tables first: on one database, one worker would empty
them under another's test. So each worker gets `<database>_<worker>` (e.g. `agentrt_test_gw0`) on the server, the
run's embedded one (tests/conftest.py) or an external one, made afresh at the start of the run and dropped at
its end. That needs the CREATEDB privilege; without it the run stops with a message that says what to do.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import make_url

from agentrt.db.database_url import parse_database_url
from agentrt.db.engine import build_engine
from agentrt.db.settings import Settings


async def worker_database(url: str, worker: str) -> str:
    """Make an empty database for `worker` on the server of `url` (dropping one left by an earlier run) and return
    `url` naming it."""
    parsed = make_url(url)
    name = f'{parsed.database or "postgres"}_{worker}'
    await _admin(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    return parsed.set(database=name).render_as_string(hide_password=False)


async def drop_worker_database(admin_url: str, worker_url: str) -> None:
    """Drop the database `worker_database()` made (connected through the database of `admin_url`)."""
    name = make_url(worker_url).database
    await _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _admin(url: str, *statements: str) -> None:
    engine = build_engine(parse_database_url(url), Settings(database_url=url, pool_size=1, max_overflow=0))
    try:
        async with engine.execution_options(isolation_level='AUTOCOMMIT').connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    except Exception as error:
        raise RuntimeError(
            f'each pytest-xdist worker needs a database of its own on the DATABASE_URL server, and {statements[-1]!r} '
            f'failed: {error}. Grant the user CREATEDB, or run the suite in one process: python -m pytest -n 0'
        ) from error
    finally:
        await engine.dispose()
