"""Whether a database is at the packaged schema head, answered without importing Alembic.

Alembic, and the migration scripts it loads to find the head, cost about 0.5 s of CPU to import: every process that
started the runtime (each CLI command, each server and worker) paid it only to learn that there was nothing to do.
Here the head is read from the migration files' own `revision` and `down_revision` lines, and the database's from its
`alembic_version` table. Anything this cannot be sure of (a file it cannot read that way, not exactly one head, a
database elsewhere) answers "not at head", and `agentrt.db.migrate.upgrade_if_behind` (Alembic) decides.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).parent / 'migrations'

# `revision: str = '0001_foundation'` and `down_revision: str | None = None` (the annotation optional), one of each
# per file; a tuple of parents (a merge) or any other form is not recognised, and leaves the answer to Alembic.
_REVISION = re.compile(r"""^revision(?:\s*:[^=\n]*)?\s*=\s*['"]([^'"\n]+)['"]\s*$""", re.MULTILINE)
_DOWN_REVISION = re.compile(r"""^down_revision(?:\s*:[^=\n]*)?\s*=\s*(None|['"][^'"\n]+['"])\s*$""", re.MULTILINE)


@cache
def packaged_head() -> str | None:
    """The newest packaged migration, from the files' text; `None` when that text does not say it for certain."""
    return head_of(MIGRATIONS_DIR / 'versions')


def head_of(versions: Path) -> str | None:
    """The one revision of `versions/*.py` that no other names as its `down_revision`, or `None` if unsure."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in versions.glob('*.py'):
        if path.name == '__init__.py':
            continue
        source = path.read_text(encoding='utf-8')
        revision, down = _REVISION.findall(source), _DOWN_REVISION.findall(source)
        if len(revision) != 1 or len(down) != 1:
            return None
        revisions.add(revision[0])
        if down[0] != 'None':
            parents.add(down[0][1:-1])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 and parents <= revisions else None


async def at_packaged_head(engine: AsyncEngine) -> bool:
    """Whether the database `engine` reaches records exactly the packaged head as its schema's revision."""
    head = packaged_head()
    if head is None:
        return False
    try:
        async with engine.connect() as connection:
            table = text("SELECT to_regclass('alembic_version') IS NOT NULL")
            if not (await connection.execute(table)).scalar_one():
                return False
            versions = (await connection.execute(text('SELECT version_num FROM alembic_version'))).scalars().all()
    except SQLAlchemyError:
        return False  # Alembic's path meets the same problem, and says what it is
    return list(versions) == [head]
