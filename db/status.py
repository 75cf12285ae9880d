"""What `agentrt db status` reports: server version, migration revision, row counts and the job queue."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from agentrt.db.engine import timeouts_in_force
from agentrt.db.models import Base
from agentrt.db.roles import ADMIN_ROLE


async def server_version(*, session: AsyncSession) -> str:
    """The server's `SHOW server_version`."""
    version: str = (await session.execute(text('SHOW server_version'))).scalar_one()
    return version


EXACT_BELOW = 100_000
"""Tables the planner estimates at fewer rows than this are counted exactly; larger ones are given its estimate."""


@dataclass(frozen=True)
class TableRows:
    """How many rows a table holds: counted, or the planner's estimate (`estimated`)."""

    rows: int
    estimated: bool = False

    def __str__(self) -> str:
        """`1,234` counted; `~1.2M` (`~150k`, `~2.4B`) estimated, a figure an exact-looking number would overstate."""
        if not self.estimated:
            return f'{self.rows:,}'
        for size, unit in ((1e9, 'B'), (1e6, 'M'), (1e3, 'k')):
            if self.rows >= size:
                figure = self.rows / size
                return f'~{figure:.1f}{unit}' if figure < 10 else f'~{figure:.0f}{unit}'
        return f'~{self.rows}'


async def table_counts(*, session: AsyncSession, exact_below: int = EXACT_BELOW) -> dict[str, TableRows | None]:
    """Rows of every runtime table; None for a table the schema does not have yet.

    A table the planner estimates (`pg_class.reltuples`, kept by ANALYZE and autovacuum) at `exact_below` rows or
    more is given that estimate: `count(*)` reads every row (2.4 s for the tables of a year of ledger) for a figure
    the status only needs roughly. A table never analysed (`reltuples` -1) is counted.
    """
    estimates = {name: float(rows) for name, rows in await session.execute(_ESTIMATES)}
    counts: dict[str, TableRows | None] = {}
    for table in Base.metadata.sorted_tables:
        estimate = estimates.get(table.name)
        if estimate is None:
            counts[table.name] = None
        elif estimate >= exact_below:
            counts[table.name] = TableRows(round(estimate), estimated=True)
        else:
            counted = (await session.execute(select(func.count()).select_from(table))).scalar_one()
            counts[table.name] = TableRows(counted)
    return counts


_ESTIMATES = text("""
SELECT c.relname, c.reltuples FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
""")


async def roles_exist(*, session: AsyncSession) -> bool:
    """Whether the operator's role of migration 0012 exists and the login role may switch to it."""
    found = (
        await session.execute(
            text("SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles WHERE rolname = :role"),
            {'role': ADMIN_ROLE},
        )
    ).scalar_one_or_none()
    return bool(found)


async def session_timeouts(engine: AsyncEngine) -> dict[str, int]:
    """The timeouts a statement outside any transaction runs with (an autocommit connection: no BEGIN, so no
    per-transaction prelude): the connection's, or behind a pooler the role's or the server's defaults."""
    async with engine.connect() as conn:
        autocommit = await conn.execution_options(isolation_level='AUTOCOMMIT')
        return await timeouts_in_force(autocommit)


@dataclass(frozen=True)
class JobQueueState:
    """The durable job queue's jobs by status (procrastinate's `todo`, `doing`, `failed`) and its live workers.

    A `doing` job whose worker sent no heartbeat within the window (killed, its machine gone) is `stalled`, not
    `running`: nothing runs it until a live worker's stalled-job check puts it back in the queue.
    """

    waiting: int
    running: int
    failed: int
    workers_alive: int
    stalled: int


async def job_queue_state(*, session: AsyncSession, alive_within_s: float) -> JobQueueState | None:
    """The queue's jobs and the workers that sent a heartbeat within `alive_within_s`; None without its tables
    (migration 0011_procrastinate not applied)."""
    tables = "to_regclass('procrastinate_jobs') IS NOT NULL AND to_regclass('procrastinate_workers') IS NOT NULL"
    if not (await session.execute(text(f'SELECT {tables}'))).scalar_one():
        return None
    rows = await session.execute(_JOBS_BY_STATUS, {'s': alive_within_s})
    by_status: dict[str, int] = {status: count for status, count in rows}
    alive = (
        await session.execute(
            text('SELECT count(*) FROM procrastinate_workers WHERE last_heartbeat > now() - make_interval(secs => :s)'),
            {'s': alive_within_s},
        )
    ).scalar_one()
    return JobQueueState(
        waiting=by_status.get('todo', 0),
        running=by_status.get('doing', 0),
        failed=by_status.get('failed', 0),
        workers_alive=alive,
        stalled=by_status.get('stalled', 0),
    )


# A `doing` job counts as running while its worker is alive (a heartbeat within the window), else as stalled.
_JOBS_BY_STATUS = text("""
SELECT CASE WHEN job.status = 'doing' AND NOT EXISTS (
           SELECT 1 FROM procrastinate_workers worker
           WHERE worker.id = job.worker_id AND worker.last_heartbeat > now() - make_interval(secs => :s))
       THEN 'stalled' ELSE job.status::text END AS status,
       count(*)
FROM procrastinate_jobs job GROUP BY 1
""")
