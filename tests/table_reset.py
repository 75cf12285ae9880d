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
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, text

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


def _id_sequence(table: Table) -> str | None:
    """`pg_get_serial_sequence(...)` for a table with an integer identity `id`, else None."""
    column = table.columns.get('id')
    if column is None or not column.primary_key or column.autoincrement is not True:
        return None
    return f"pg_get_serial_sequence('\"{table.name}\"', 'id')"


# Every session here runs as the login role (`Unscoped.OWNER`): deleting, copying, DDL and sequences are the
# owner's (the test server's superuser), whatever row-level security allows the runtime's roles.


class TableReset:
    """The state the runtime tables are in, as far as this process has seen it, and the work to reset them."""

    def __init__(self) -> None:
        self._copy_xid: str | None = None  # the transaction that copied the demo rows now in place, if any
        self._snapshot_rows: dict[str, int] = {}

    async def take_snapshot(self) -> None:
        """Seed the demo data once and keep a copy of it in `SNAPSHOT_SCHEMA`."""
        names = ', '.join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'TRUNCATE {names} RESTART IDENTITY CASCADE'))
            await seed_demo_data(session=session)
            await session.execute(text(f'DROP SCHEMA IF EXISTS {SNAPSHOT_SCHEMA} CASCADE'))
            await session.execute(text(f'CREATE SCHEMA {SNAPSHOT_SCHEMA}'))
            for table in DEMO_TABLES:
                columns = _stored_columns(table)
                await session.execute(
                    text(f'CREATE TABLE {SNAPSHOT_SCHEMA}."{table.name}" AS SELECT {columns} FROM "{table.name}"')
                )
                count = await session.scalar(text(f'SELECT count(*) FROM {SNAPSHOT_SCHEMA}."{table.name}"'))
                self._snapshot_rows[table.name] = int(count or 0)
        self._copy_xid = None  # seeded, not copied: the first test that wants the demo rows copies them

    async def drop_snapshot(self) -> None:
        if not self._snapshot_rows:
            return
        async with get_db_session(account=Unscoped.OWNER) as session:
            await session.execute(text(f'DROP SCHEMA IF EXISTS {SNAPSHOT_SCHEMA} CASCADE'))

    async def reset(self, *, demo: bool) -> None:
        """Empty every runtime table, then (with `demo`) have exactly the demo rows in place."""
        if demo and not self._snapshot_rows:
            await self.take_snapshot()  # once, when the first test wants the demo data
        state = await self._inspect(demo)
        keep_demo = demo and self._demo_intact(state)
        emptied = [
            table
            for table in reversed(Base.metadata.sorted_tables)  # children first: no foreign key in the way
            if state[f'{table.name}:rows'] and not (keep_demo and table.name in _DEMO_NAMES)
        ]
        copy_demo = demo and not keep_demo
        sequences = [(table, _id_sequence(table)) for table in Base.metadata.sorted_tables]
        async with get_db_session(account=Unscoped.OWNER) as session:
            if emptied:
                # A role bound by a row-level security policy would delete only the rows it sees and leave the
                # rest to the next test: with row security off, such a DELETE fails instead (superusers and table
                # owners without FORCE ROW LEVEL SECURITY are not bound: no change for them).
                await session.execute(text('SET LOCAL row_security = off'))
            for table in emptied:
                await session.execute(text(f'DELETE FROM "{table.name}"'))
            if copy_demo:
                for table in DEMO_TABLES:
                    columns = _stored_columns(table)
                    await session.execute(
                        text(
                            f'INSERT INTO "{table.name}" ({columns}) '
                            f'SELECT {columns} FROM {SNAPSHOT_SCHEMA}."{table.name}"'
                        )
                    )
                xid = await session.scalar(text(f'SELECT xmin::text FROM "{DEMO_TABLES[0].name}" LIMIT 1'))
            # As TRUNCATE ... RESTART IDENTITY and seeding leave them: 1 for an empty table, the highest id for the
            # demo tables (a rolled-back insert moved the sequence on without leaving a row).
            setvals = [
                f'setval({sequence}, (SELECT max(id) FROM "{table.name}"))'
                if demo and table.name in _DEMO_NAMES
                else f'setval({sequence}, 1, false)'
                for table, sequence in sequences
                if sequence is not None
            ]
            await session.execute(text(f'SELECT {", ".join(setvals)}'))
        if copy_demo:
            self._copy_xid = str(xid)
        elif not keep_demo:
            self._copy_xid = None

    async def _inspect(self, demo: bool) -> dict[str, Any]:
        """One query: does each table hold a row; for the demo tables, how many rows, and how many written since
        the copy."""
        columns = []
        for table in Base.metadata.sorted_tables:
            if table.name in _DEMO_NAMES and demo and self._copy_xid is not None:
                columns.append(f'(SELECT count(*) FROM "{table.name}") AS "{table.name}:rows"')
                columns.append(
                    f'(SELECT count(*) FROM "{table.name}" WHERE xmin::text <> :copy) AS "{table.name}:changed"'
                )
            else:
                columns.append(f'EXISTS (SELECT FROM "{table.name}") AS "{table.name}:rows"')
        params = {'copy': self._copy_xid} if demo and self._copy_xid is not None else {}
        async with get_db_session(account=Unscoped.OWNER) as session:
            row = (await session.execute(text(f'SELECT {", ".join(columns)}'), params)).one()
        return dict(row._mapping)

    def _demo_intact(self, state: dict[str, Any]) -> bool:
        if self._copy_xid is None:
            return False
        return all(
            state[f'{name}:rows'] == self._snapshot_rows[name] and state[f'{name}:changed'] == 0 for name in _DEMO_NAMES
        )
