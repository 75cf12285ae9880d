"""Searching an account's directories (providers, suppliers, ...) with full-text ranking and allowlisted filters."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import ColumnElement, Float, Row, Select, exists, func, literal, null, select
from sqlalchemy.dialects.postgresql import REGCONFIG
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.errors import AgentRuntimeError
from agentrt.db.models import DirectoryEntry

MAX_RESULTS = 25
"""Hard cap on the rows one search returns, whatever the caller asks for."""

_TS_CONFIG = literal('english', type_=REGCONFIG)  # must match the config of the generated search_vector column
# Only what results show: not search_text or the tsvector, which nobody reads back.
_SUMMARY_COLUMNS = (
    DirectoryEntry.id,
    DirectoryEntry.name,
    DirectoryEntry.category,
    DirectoryEntry.city,
    DirectoryEntry.attributes,
)
_DETAIL_COLUMNS = (*_SUMMARY_COLUMNS, DirectoryEntry.schema_name, DirectoryEntry.external_id)
_TRUE_WORDS = {'true', 'yes', 'y', '1'}
_FALSE_WORDS = {'false', 'no', 'n', '0'}


class DirectoryError(AgentRuntimeError):
    """A directory request that cannot be answered as asked; the message says what is valid."""


class UnknownSchemaError(DirectoryError):
    """The account has no directory with this schema name."""

    def __init__(self, schema_name: str, valid: Collection[str]) -> None:
        self.schema_name = schema_name
        self.valid = sorted(valid)
        super().__init__(f'unknown directory {schema_name!r}; valid directories: {_listing(self.valid)}')


class UnknownFilterError(DirectoryError):
    """One or more filter names are not in the schema's allowlist."""

    def __init__(self, schema_name: str, unknown: Collection[str], valid: Collection[str]) -> None:
        self.schema_name = schema_name
        self.unknown = sorted(unknown)
        self.valid = sorted(valid)
        super().__init__(
            f'unknown filter(s) {", ".join(map(repr, self.unknown))} for {schema_name!r}; '
            f'valid filters: {_listing(self.valid)}'
        )


class InvalidFilterValueError(DirectoryError):
    """A filter value of the wrong kind (e.g. not a yes/no answer for a boolean filter)."""


class InvalidQueryError(DirectoryError):
    """Search text PostgreSQL cannot take (a NUL character)."""


@dataclass(frozen=True)
class FilterSpec:
    """How one allowlisted filter name is applied.

    Attributes:
        kind: 'column' compares a column case-insensitively; 'list' tests that a JSON list attribute
            contains the value; 'flag' compares a JSON boolean attribute.
        target: the column name (`city`, `category`) or the key inside `attributes`.
        help: a short description of the accepted values, shown in tool docstrings and errors.
    """

    kind: str
    target: str
    help: str = ''


@dataclass(frozen=True)
class SchemaSpec:
    """The filters of one directory schema and the attributes a search hit shows."""

    filters: Mapping[str, FilterSpec]
    summary_attributes: tuple[str, ...] | None = None  # None: show every attribute


_CITY = FilterSpec('column', 'city', 'city name, e.g. "Seattle"')

# The allowlist: the only filter names (and so the only columns/keys) a caller can reach. Names map to
# fixed columns and JSON keys here; values from callers are always bound parameters.
SCHEMAS: dict[str, SchemaSpec] = {
    'medical_providers': SchemaSpec(
        filters={
            'city': _CITY,
            'specialty': FilterSpec('column', 'category', 'medical specialty, e.g. "Cardiology"'),
            'category': FilterSpec('column', 'category', 'alias of specialty'),
            'insurance': FilterSpec('list', 'insurance', 'accepted insurance plan, exact spelling, e.g. "Medicare"'),
            'language': FilterSpec('list', 'languages', 'spoken language, exact spelling, e.g. "Spanish"'),
            'accepting_new_patients': FilterSpec('flag', 'accepting_new_patients', 'true or false'),
        },
        summary_attributes=('insurance', 'languages', 'accepting_new_patients', 'rating'),
    ),
    'produce_suppliers': SchemaSpec(
        filters={
            'city': _CITY,
            'category': FilterSpec('column', 'category', 'produce category, e.g. "Berries"'),
            'certification': FilterSpec('list', 'certifications', 'certification, exact spelling, e.g. "USDA Organic"'),
            'delivery_day': FilterSpec('list', 'delivery_days', 'delivery day: Mon, Tue, Wed, Thu, Fri or Sat'),
        },
        summary_attributes=('certifications', 'delivery_days', 'min_order_usd', 'rating'),
    ),
}
DEFAULT_SCHEMA = SchemaSpec(filters={'city': _CITY, 'category': FilterSpec('column', 'category', 'category name')})
"""Used for a schema an account has rows for but that has no entry in `SCHEMAS` yet."""


class DirectoryHit(BaseModel):
    """One search result: enough to choose an entry; `get_directory_entry` gives the rest."""

    id: int
    name: str
    category: str
    city: str
    attributes: dict[str, Any]
    rank: float | None = None  # full-text relevance; None when the search had no query


class DirectorySearchResult(BaseModel):
    """The first `len(results)` of `total_matches` rows, best first."""

    total_matches: int
    results: list[DirectoryHit]


class DirectoryEntryDetail(BaseModel):
    """Every field of one directory entry."""

    id: int
    schema_name: str
    external_id: str
    name: str
    category: str
    city: str
    attributes: dict[str, Any]


def schema_spec(schema_name: str) -> SchemaSpec:
    """The filter allowlist and summary attributes for `schema_name` (`DEFAULT_SCHEMA` if not listed)."""
    return SCHEMAS.get(schema_name, DEFAULT_SCHEMA)


async def list_schemas(account_id: int, *, session: AsyncSession) -> list[str]:
    """Return the distinct directory schema names the account has entries in, sorted.

    Args:
        account_id: the account whose directories to list.
        session: an open session; the caller's block owns the transaction.
    """
    query = select(DirectoryEntry.schema_name).where(DirectoryEntry.account_id == account_id).distinct()
    return sorted((await session.execute(query)).scalars().all())


async def search_directory(
    account_id: int,
    *,
    query: str | None,
    schema_name: str,
    filters: Mapping[str, str | bool] | None = None,
    limit: int = 10,
    session: AsyncSession,
) -> DirectorySearchResult:
    """Search one of the account's directories, ranked by full-text relevance, then rating and name.

    `query` uses web-search syntax (`websearch_to_tsquery('english', ...)`: all words must match,
    "quoted phrases", `-excluded`, `or`); a query with no searchable words (blank, only stop words)
    matches everything. Column filters (`city`, `category`/`specialty`) compare case-insensitively;
    list filters (`insurance`, `certification`, ...) use JSONB containment, so the value must be
    spelled exactly as stored; flag filters take a bool or true/false/yes/no.

    Args:
        account_id: the account to search; every row returned belongs to it.
        query: free text, or None to list by rating.
        schema_name: which of the account's directories to search.
        filters: filter name to value; names come from the schema's allowlist (`SCHEMAS`).
        limit: rows to return, clamped to 1..`MAX_RESULTS`.
        session: an open session; the caller's block owns the transaction.

    Returns:
        The total number of matching rows and the best `limit` of them.

    Raises:
        UnknownSchemaError: the account has no entries in `schema_name` (lists the ones it has).
        UnknownFilterError: a filter name is not allowed for the schema (lists the valid ones).
        InvalidFilterValueError: a flag filter got something other than a yes/no value, another filter true or
            false, or a value has NUL.
        InvalidQueryError: the query contains a NUL character.
    """
    if query is not None and '\x00' in query:
        raise InvalidQueryError('query must not contain NUL characters')
    if '\x00' in schema_name:  # PostgreSQL rejects NUL in text; no directory can have such a name
        raise UnknownSchemaError(schema_name, await list_schemas(account_id, session=session))
    spec = schema_spec(schema_name)
    conditions = [_filter_condition(name, value, spec, schema_name) for name, value in (filters or {}).items()]

    total = func.count().over().label('total_matches')
    rating = DirectoryEntry.attributes['rating'].astext.cast(Float)
    stmt: Select[Any]
    if query is not None and query.strip():
        tsquery = func.websearch_to_tsquery(_TS_CONFIG, query)
        rank = func.ts_rank(DirectoryEntry.search_vector, tsquery).label('rank')
        stmt = select(*_SUMMARY_COLUMNS, rank, total).where(
            # numnode() = 0: the query had no lexemes (only stop words); treat it as no query at all.
            (func.numnode(tsquery) == 0) | DirectoryEntry.search_vector.bool_op('@@')(tsquery)
        )
        order: list[Any] = [rank.desc()]
    else:
        stmt = select(*_SUMMARY_COLUMNS, null().cast(Float).label('rank'), total)
        order = []
    order += [rating.desc().nulls_last(), DirectoryEntry.name, DirectoryEntry.id]
    stmt = (
        stmt.where(DirectoryEntry.account_id == account_id, DirectoryEntry.schema_name == schema_name, *conditions)
        .order_by(*order)
        .limit(max(1, min(limit, MAX_RESULTS)))
    )
    rows = (await session.execute(stmt)).all()
    if not rows:
        # Whether the schema exists is asked only when nothing matched: a hit proves it (no query per search).
        await _require_schema(account_id, schema_name, session=session)
    hits = [_hit(row, spec) for row in rows]
    return DirectorySearchResult(total_matches=rows[0].total_matches if rows else 0, results=hits)


async def get_directory_entry(
    account_id: int, entry_id: int, *, schema_names: Collection[str] | None = None, session: AsyncSession
) -> DirectoryEntryDetail | None:
    """Return one entry of the account, or None.

    None covers both "no such id" and "the id belongs to another account" on purpose, so a caller
    cannot probe which ids exist elsewhere.

    Args:
        account_id: the account the entry must belong to.
        entry_id: the entry's id, as returned in search results.
        schema_names: if given, the entry must also be in one of these directories.
        session: an open session; the caller's block owns the transaction.
    """
    stmt = select(*_DETAIL_COLUMNS).where(DirectoryEntry.id == entry_id, DirectoryEntry.account_id == account_id)
    if schema_names is not None:
        stmt = stmt.where(DirectoryEntry.schema_name.in_(list(schema_names)))
    row = (await session.execute(stmt)).one_or_none()
    return DirectoryEntryDetail.model_validate(row._asdict()) if row is not None else None


async def _require_schema(account_id: int, schema_name: str, *, session: AsyncSession) -> None:
    present = exists().where(DirectoryEntry.account_id == account_id, DirectoryEntry.schema_name == schema_name)
    if not (await session.execute(select(present))).scalar_one():
        raise UnknownSchemaError(schema_name, await list_schemas(account_id, session=session))


def _filter_condition(name: str, value: str | bool, spec: SchemaSpec, schema_name: str) -> ColumnElement[bool]:
    filter_spec = spec.filters.get(name)
    if filter_spec is None:
        raise UnknownFilterError(schema_name, [name], spec.filters)
    if isinstance(value, str) and '\x00' in value:
        raise InvalidFilterValueError(f'filter {name!r}: values must not contain NUL characters')
    if isinstance(value, bool) and filter_spec.kind != 'flag':
        # Compared as the text 'True', it matched nothing and the search said so: no providers, no retry (QA).
        raise InvalidFilterValueError(
            f'filter {name!r} takes a text value ({filter_spec.help}), not {str(value).lower()}; '
            'only yes/no filters take true or false'
        )
    return _APPLY[filter_spec.kind](filter_spec, name, value)


def _column_condition(spec: FilterSpec, name: str, value: str | bool) -> ColumnElement[bool]:
    column = getattr(DirectoryEntry, spec.target)
    return func.lower(column) == func.lower(str(value).strip())


def _list_condition(spec: FilterSpec, name: str, value: str | bool) -> ColumnElement[bool]:
    # `attributes @> '{"key": ["value"]}'` with the whole document bound: served by the GIN index.
    return DirectoryEntry.attributes.contains({spec.target: [str(value).strip()]})


def _flag_condition(spec: FilterSpec, name: str, value: str | bool) -> ColumnElement[bool]:
    return DirectoryEntry.attributes.contains({spec.target: _as_bool(name, value)})


_APPLY: dict[str, Callable[[FilterSpec, str, str | bool], ColumnElement[bool]]] = {
    'column': _column_condition,
    'list': _list_condition,
    'flag': _flag_condition,
}


def _as_bool(name: str, value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    word = value.strip().lower()
    if word in _TRUE_WORDS or word in _FALSE_WORDS:
        return word in _TRUE_WORDS
    raise InvalidFilterValueError(f'filter {name!r} takes true or false, not {value!r}')


def _hit(row: Row[Any], spec: SchemaSpec) -> DirectoryHit:
    keys, attributes = spec.summary_attributes, row.attributes
    return DirectoryHit(
        id=row.id,
        name=row.name,
        category=row.category,
        city=row.city,
        attributes=dict(attributes) if keys is None else {k: attributes[k] for k in keys if k in attributes},
        rank=round(row.rank, 6) if row.rank is not None else None,
    )


def _listing(names: Collection[str]) -> str:
    return ', '.join(names) if names else 'none'
