"""The models and the migrations describe the same tables, and the per-test reset rewinds every sequence they own."""

from __future__ import annotations

from pprint import pformat
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection

from agentrt.db.engine import get_engine
from agentrt.db.models import Base
from agentrt.db.session import Unscoped, get_db_session
from tests.table_reset import TableReset, owned_sequences

# procrastinate's tables (migration 0011 runs its own schema, `db/migrations/sql/`): the job queue's, not modelled.
# alembic leaves its own version table out by itself. What compare_metadata never sees needs no exception here:
# row-level security and its policies, grants and roles (migration 0012 on; tests/db/test_row_level_security.py).
NOT_MODELLED_PREFIX = 'procrastinate_'


def _modelled(name: str | None, type_: str, parent_names: Any) -> bool:
    if type_ == 'table':
        return not (name or '').startswith(NOT_MODELLED_PREFIX)
    return not (parent_names.get('table_name') or '').startswith(NOT_MODELLED_PREFIX)


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={'compare_type': True, 'compare_server_default': True, 'include_name': _modelled},
    )
    return list(compare_metadata(context, Base.metadata))


async def test_the_migrated_database_is_what_the_models_describe() -> None:
    # A column, index or table added to a model without its migration (or the reverse) shows up here, rather than as
    # an UndefinedColumnError in the first turn of a fresh install.
    async with get_engine().connect() as connection:
        differences = await connection.run_sync(_differences)
    assert differences == [], f'models and migrations disagree (write the migration):\n{pformat(differences)}'


async def test_the_reset_rewinds_every_sequence_a_table_owns() -> None:
    # Read from the catalog, not from the models' `autoincrement` (a model written with the default says 'auto'):
    # a sequence left where the last test moved it gave the next test ids it did not expect.
    async with get_db_session(account=Unscoped.OWNER) as session:
        sequences = await owned_sequences(session)
        assert {table for table, _, _ in sequences} >= {'accounts', 'agent_instances', 'directory_entries', 'api_keys'}
        for _, _, sequence in sequences:
            await session.execute(text(f'SELECT setval({sequence}, 41)'))
    await TableReset().reset(demo=False)
    async with get_db_session(account=Unscoped.OWNER) as session:
        moved = {
            sequence: position
            for _, _, sequence in sequences
            if (position := tuple(await session.execute(text(f'SELECT last_value, is_called FROM {sequence[1:-1]}'))))
            != ((1, False),)
        }
    assert moved == {}
