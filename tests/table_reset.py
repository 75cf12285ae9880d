"""Bring the runtime tables back to a known state before each test, doing only the work the last test made necessary.

Emptying every table with `TRUNCATE` before each test cost about 30 ms of server CPU (new files for every table and
index, and every pooled connection rebuilding its cached table descriptions), and copying the 4,500 demo rows back
another 100 ms (their full-text vectors are computed again): together about a third of the suite's CPU. Most tests
leave most tables empty and the demo rows untouched, so one query first finds what changed:

- a table outside the demo set is emptied (`DELETE`, children first) only when it holds a row;
- the demo rows are kept when the next test wants them and they are intact: as many rows as the snapshot, every one
  written by the transaction that copied them (`xmin`; any insert or update writes a row version of another
  transaction, any delete lowers the count), so a test that changed them in any way gets a fresh copy;
- the sequences are reset each time (a rolled-back insert moves a sequence on and leaves no row behind): to 1 for an
  empty table, to the highest id for the demo tables, as `TRUNCATE ... RESTART IDENTITY` and seeding would leave them.

Everything is read from the server, so rows written by subprocesses (CLI, scripts, `agentrt serve`) count as well.

All of it is one PL/pgSQL function (`reset_tables`, made once per run in `SNAPSHOT_SCHEMA`) called in one statement
on an autocommit connection: one round trip a test instead of two sessions (two BEGIN, two COMMIT and the runtime's
session set-up each), which had cost about 1.5 ms of the test process's CPU a test.
"""

from __future__ import annotations

import json

from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.engine import get_engine
from agentrt.db.models import Account, AgentInstance, Base, DirectoryEntry
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.demo_data import seed_demo_data

# The demo data, seeded once per run by `seed_demo_data()` and kept in a schema of its own: copying it back with
# INSERT ... SELECT inside the server takes a tenth of the time of seeding 4,500 rows again.
SNAPSHOT_SCHEMA = 'agentrt_test_demo_snapshot'
DEMO_TABLES: tuple[Table, ...] = (Account.__table__, AgentInstance.__table__, DirectoryEntry.__table__)  # type: ignore[assignment]
_DEMO_NAMES = {table.name for table in DEMO_TABLES}


def _stored_columns(table: Table) -> str:
    """The columns an INSERT may set: all but the generated ones (the search vector)."""
    return ', '.join(f'"{column.name}"' for column in table.columns if column.computed is None)


# Every sequence a runtime table owns (an identity or serial column, whatever its model says of `autoincrement`: a
# model written with the default reads `'auto'`), with its table and column, read from the catalog.
OWNED_SEQUENCES = text(
    'SELECT t.relname AS "table", a.attname AS "column", quote_literal(s.oid::regclass::text) AS sequence'
    ' FROM pg_depend AS d'
    " JOIN pg_class AS s ON s.oid = d.objid AND s.relkind = 'S'"
    ' JOIN pg_class AS t ON t.oid = d.refobjid'
    ' JOIN pg_attribute AS a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid'
    " WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')"
    ' AND t.relnamespace = current_schema()::regnamespace AND t.relname = ANY(:tables)'
    ' ORDER BY 1, 2'
)


async def owned_sequences(session: AsyncSession) -> list[tuple[str, str, str]]:
    """(table, column, sequence as a quoted literal) of every sequence the runtime tables own."""
    names = [table.name for table in Base.metadata.sorted_tables]
    rows = await session.execute(OWNED_SEQUENCES, {'tables': names})
    return [(row.table, row.column, row.sequence) for row in rows]


# Every session here runs as the login role (`Unscoped.OWNER`): deleting, copying, DDL and sequences are the
# owner's (the test server's superuser), whatever row-level security allows the runtime's roles.


def _reset_function(sequences: list[tuple[str, str, str]]) -> str:
    """`SNAPSHOT_SCHEMA.reset_tables(demo, copy_xid, expected)`: what `TableReset.reset` does, as one statement. Returns
    the transaction id of the demo rows in place afterwards (the copy kept, or the new one), NULL without them.

    `expected` is the snapshot's row count per demo table (JSON). The demo rows are kept when `demo` is asked for,
    `copy_xid` names the copy in place and that copy is intact: as many rows as the snapshot, none written since.
    `sequences`: `owned_sequences()`, each reset.
    """
    tables = list(reversed(Base.metadata.sorted_tables))  # children first: no foreign key in the way
    demo_tables = [t for t in Base.metadata.sorted_tables if t.name in _DEMO_NAMES]
    intact = ' AND '.join(
        f'(SELECT count(*) FROM "{t.name}") = (expected->>\'{t.name}\')::bigint '
        f'AND NOT EXISTS (SELECT FROM "{t.name}" WHERE xmin::text <> copy_xid)'
        for t in demo_tables
    )
    holds = ', '.join(f'EXISTS (SELECT FROM "{t.name}")' for t in tables)
    deletes = '\n'.join(
        f'  IF holds[{i}]{" AND NOT keep_demo" if t.name in _DEMO_NAMES else ""} THEN DELETE FROM "{t.name}"; END IF;'
        for i, t in enumerate(tables, start=1)
    )
    emptied = ' OR '.join(
        f'(holds[{i}]{" AND NOT keep_demo" if t.name in _DEMO_NAMES else ""})' for i, t in enumerate(tables, start=1)
    )
    copies = '\n'.join(
        f'    INSERT INTO "{t.name}" ({columns}) SELECT {columns} FROM {SNAPSHOT_SCHEMA}."{t.name}";'
        for t in DEMO_TABLES
        if (columns := _stored_columns(t))
    )
    # As TRUNCATE ... RESTART IDENTITY and seeding leave them: 1 for an empty table, the highest id for the demo
    # tables (a rolled-back insert moved the sequence on without leaving a row).
    setvals = ', '.join(
        f'CASE WHEN demo THEN setval({sequence}, (SELECT max("{column}") FROM "{table}")) '
        f'ELSE setval({sequence}, 1, false) END'
        if table in _DEMO_NAMES
        else f'setval({sequence}, 1, false)'
        for table, column, sequence in sequences
    )
    setvals = setvals or 'NULL'  # no sequence at all: PERFORM still needs an expression
    return f"""
CREATE OR REPLACE FUNCTION {SNAPSHOT_SCHEMA}.reset_tables(demo boolean, copy_xid text, expected jsonb) RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
  keep_demo boolean := false;
  holds boolean[] := ARRAY[{holds}];
  kept text := NULL;
BEGIN
  IF demo AND copy_xid IS NOT NULL THEN
    keep_demo := {intact};
  END IF;
  IF {emptied} THEN
    -- A role bound by a row-level security policy would delete only the rows it sees and leave the rest to the next
    -- test: with row security off, such a DELETE fails instead (superusers and table owners without FORCE ROW LEVEL
    -- SECURITY are not bound: no change for them).
    PERFORM set_config('row_security', 'off', true);
  END IF;
{deletes}
  IF demo AND NOT keep_demo THEN
{copies}
    kept := (SELECT xmin::text FROM "{DEMO_TABLES[0].name}" LIMIT 1);
    -- Statistics for the demo rows, as autovacuum would have them on a server that holds them: never analyzed (or
    -- analyzed while empty), the planner found a directory entry by its id through the (account, schema, city)
    -- index, 3,000 rows for one (2 ms instead of 0.05, for every get_directory_entry of a demo turn).
    IF (SELECT reltuples FROM pg_class WHERE oid = '"{DEMO_TABLES[-1].name}"'::regclass)
        < (expected->>'{DEMO_TABLES[-1].name}')::real THEN
      ANALYZE {', '.join(f'"{t.name}"' for t in DEMO_TABLES)};
    END IF;
  ELSIF keep_demo THEN
    kept := copy_xid;
  END IF;
  PERFORM {setvals};
  RETURN kept;
END
$fn$"""


class TableReset:
    """The state the runtime tables are in, as far as this process has seen it, and the work to reset them."""

    def __init__(self) -> None:
        self._copy_xid: str | None = None  # the transaction that copied the demo rows now in place, if any
        self._snapshot_rows: dict[str, int] = {}
        self._function = False  # `reset_tables` is in place

    async def take_snapshot(self) -> None:
        """Seed the demo data once and keep a copy of it in `SNAPSHOT_SCHEMA`."""
        names = ', '.join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'TRUNCATE {names} RESTART IDENTITY CASCADE'))
            await seed_demo_data(session=session)
            await session.execute(text(f'CREATE SCHEMA IF NOT EXISTS {SNAPSHOT_SCHEMA}'))
            for table in DEMO_TABLES:
                columns = _stored_columns(table)
                await session.execute(text(f'DROP TABLE IF EXISTS {SNAPSHOT_SCHEMA}."{table.name}"'))
                await session.execute(
                    text(f'CREATE TABLE {SNAPSHOT_SCHEMA}."{table.name}" AS SELECT {columns} FROM "{table.name}"')
                )
                count = await session.scalar(text(f'SELECT count(*) FROM {SNAPSHOT_SCHEMA}."{table.name}"'))
                self._snapshot_rows[table.name] = int(count or 0)
        self._copy_xid = None  # seeded, not copied: the first test that wants the demo rows copies them

    async def drop_snapshot(self) -> None:
        if not (self._snapshot_rows or self._function):
            return
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'DROP SCHEMA IF EXISTS {SNAPSHOT_SCHEMA} CASCADE'))

    async def reset(self, *, demo: bool) -> None:
        """Empty every runtime table, then (with `demo`) have exactly the demo rows in place."""
        if not self._function:
            async with get_db_session(account=Unscoped.OWNER) as session:
                await session.execute(text(f'CREATE SCHEMA IF NOT EXISTS {SNAPSHOT_SCHEMA}'))
                await session.execute(text(_reset_function(await owned_sequences(session))))
            self._function = True
        if demo and not self._snapshot_rows:
            await self.take_snapshot()  # once, when the first test wants the demo data
        # The login role (the owner, `Unscoped.OWNER`) on an autocommit connection: the call is its own transaction.
        async with get_engine().connect() as conn:
            await conn.execution_options(isolation_level='AUTOCOMMIT')
            self._copy_xid = await conn.scalar(
                text(f'SELECT {SNAPSHOT_SCHEMA}.reset_tables(:demo, :copy, CAST(:expected AS jsonb))'),
                {'demo': demo, 'copy': self._copy_xid, 'expected': json.dumps(self._snapshot_rows)},
            )
