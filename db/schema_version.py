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


@cache
def packaged_revisions() -> frozenset[str]:
    """Every packaged migration's revision, from the files' text (empty when a file does not say it for certain)."""
    revisions: set[str] = set()
    for path in (MIGRATIONS_DIR / 'versions').glob('*.py'):
        if path.name != '__init__.py':
            found = _REVISION.findall(path.read_text(encoding='utf-8'))
            if len(found) != 1:
                return frozenset()
            revisions.add(found[0])
    return frozenset(revisions)


async def revision_behind(engine: AsyncEngine) -> str | None:
    """The database's schema revision when it is behind the packaged head (`'none'`: never migrated); None at the
    head, ahead of it (a revision this version does not know, as in a rolling upgrade), or when it cannot tell."""
    head = packaged_head()
    if head is None:
        return None
    try:
        async with engine.connect() as connection:
            if not (await connection.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL"))).scalar_one():
                return 'none'
            versions = (await connection.execute(text('SELECT version_num FROM alembic_version'))).scalars().all()
    except SQLAlchemyError:
        return None  # the command's own statements meet the same problem, and say what it is
    if not versions:
        return 'none'
    behind = [version for version in versions if version != head and version in packaged_revisions()]
    return behind[0] if behind and head not in versions else None


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
