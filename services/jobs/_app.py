"""The procrastinate app of the runtime's jobs, and its connection pool: opened once per process, on the queue's URL."""

from __future__ import annotations

import asyncio
import logging

from procrastinate import App, PsycopgConnector
from sqlalchemy.engine import URL

from agentrt.db.database_url import mask_url
from agentrt.db.engine import current_settings, get_engine
from agentrt.db.settings import Settings, parse_database_url

logger = logging.getLogger('agentrt.jobs')

QUEUE_POOL_SIZE = 2
"""psycopg connections a process keeps for the queue: deferring from a server, fetching and finishing in a worker."""

# The tasks register on it when `agentrt.services.jobs` is imported; the pool is given when the queue is opened.
jobs = App(connector=PsycopgConnector())

_open_on: asyncio.AbstractEventLoop | None = None
_lock = asyncio.Lock()


def queue_conninfo(settings: Settings, engine_url: URL) -> str:
    """The libpq URL of the queue: `AGENTRT_QUEUE_DATABASE_URL`, else `DATABASE_URL`, else the embedded server's."""
    given = settings.queue_database_url or settings.database_url
    url = parse_database_url(given) if given else engine_url
    query = {key: value for key, value in url.query.items() if key != 'prepared_statement_cache_size'}
    return url.set(drivername='postgresql', query=query).render_as_string(hide_password=False)


def listens(settings: Settings) -> bool:
    """Whether workers wait for jobs with LISTEN/NOTIFY: not through a transaction pooler, where a LISTEN is lost
    when the pooler hands the server connection to another client (the workers poll instead)."""
    return not settings.pooled or settings.queue_database_url is not None


async def open_queue() -> App:
    """Open the queue for this process (once per event loop; safe from many tasks): a small psycopg pool on
    `queue_conninfo`, owned by a connector of its own.

    Prepared statements are off (`prepare_threshold=None`): behind PgBouncer in transaction mode psycopg's automatic
    ones collide (measured: 18 of 200 defers failed without it).
    """
    global _open_on
    async with _lock:
        loop = asyncio.get_running_loop()
        if _open_on is loop:
            return jobs
        settings = current_settings()
        conninfo = queue_conninfo(settings, get_engine().url)
        connector = PsycopgConnector(
            conninfo=conninfo,
            min_size=1,
            max_size=QUEUE_POOL_SIZE,
            timeout=settings.connect_timeout,
            kwargs={'prepare_threshold': None, 'application_name': 'agentrt-jobs'},
        )
        jobs.connector = jobs.job_manager.connector = connector  # as App.replace_connector does
        await jobs.open_async()
        _open_on = loop
        logger.info('job queue open on %s', mask_url(conninfo))
        return jobs


async def close_queue() -> None:
    """Close the queue's pool, if this process opened it."""
    global _open_on
    async with _lock:
        if _open_on is None:
            return
        _open_on = None
        await jobs.close_async()
