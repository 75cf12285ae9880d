"""`directory_toolset`: search and read the account's directories, each call in its own read-only session."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, StrictBool, StringConstraints
from pydantic_ai import FunctionToolset, ModelRetry, RunContext
from pydantic_ai.tools import ToolDefinition

from agentrt.db.session import get_read_only_session
from agentrt.services import directory_service as directory
from agentrt.services.directory_service import DirectoryEntryDetail, DirectorySearchResult
from agentrt.services.pg_text import preview
from agentrt.services.tenancy import configured_schemas
from agentrt.tools.dependencies import SessionDependencies

MAX_QUERY_LENGTH = 200
MAX_FILTERS = 8
MAX_FILTER_VALUE_LENGTH = 100
MAX_ENTRY_ID = 2**63 - 1  # BIGINT: a larger id would be a database error, not "not found"


# Argument types: pydantic-ai validates the model's arguments against these before the tool runs and
# turns a violation into a retry prompt, so oversized or mistyped input never reaches the database.
def _no_nul(value: str) -> str:
    if '\x00' in value:
        raise ValueError('must not contain NUL characters')
    return value


Query = Annotated[str, StringConstraints(max_length=MAX_QUERY_LENGTH), AfterValidator(_no_nul)]
SchemaName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r'^\w+$')]
FilterName = Annotated[
    str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1, max_length=40, pattern=r'^\w+$')
]
FilterValue = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_FILTER_VALUE_LENGTH),
    AfterValidator(_no_nul),
]


def _one_name_each(filters: object) -> object:
    """Refuse two names that are one filter once stripped and lower-cased (`FilterName`).

    Lower-cased after the JSON was parsed, `{"CITY": "Seattle", "city": "Boston"}` became one key and the search ran
    on Boston alone, the other criterion dropped without a word (QA).
    """
    if isinstance(filters, dict):
        seen: dict[str, str] = {}
        for name in filters:
            if not isinstance(name, str):
                continue
            key = name.strip().lower()
            if key in seen:
                raise ValueError(f'{preview(seen[key])} and {preview(name)} are the same filter; give it once')
            seen[key] = name
    return filters


Filters = Annotated[
    dict[FilterName, FilterValue | StrictBool], Field(max_length=MAX_FILTERS), BeforeValidator(_one_name_each)
]
Limit = Annotated[int, Field(ge=1, le=directory.MAX_RESULTS)]
EntryId = Annotated[int, Field(ge=1, le=MAX_ENTRY_ID)]


async def _describe_filters(ctx: RunContext[SessionDependencies], tool_def: ToolDefinition) -> ToolDefinition:
    """Append the filters of the agent's own directories to the description the model reads."""
    schemas = configured_schemas(ctx.deps.config)
    names = sorted(directory.SCHEMAS) if schemas is None else sorted(schemas)
    lines = ['Directories and their filters:']
    for name in names:
        filters = directory.schema_spec(name).filters
        lines.append(f'- {name}: ' + '; '.join(f'{key} ({spec.help})' for key, spec in filters.items()))
    return replace(tool_def, description=f'{tool_def.description}\n\n' + '\n'.join(lines))


directory_toolset = FunctionToolset[SessionDependencies](docstring_format='google', id='directory')


@directory_toolset.tool(prepare=_describe_filters)
async def search_directory(
    ctx: RunContext[SessionDependencies],
    query: Query | None,
    schema_name: SchemaName,
    filters: Filters | None = None,
    limit: Limit = 10,
) -> DirectorySearchResult:
    """Search a directory of this account (e.g. medical providers) and return the best matches.

    Use `filters` for structured criteria (city, specialty, insurance, ...) and `query` for free-text
    keywords. Results are ranked by text relevance when there is a query, else by rating.
    `total_matches` counts every match, even beyond `limit`; narrow the search if it is large.

    Args:
        query: keywords matched against name, category, city and listed attributes; every word must
            match ("quoted phrase", -excluded word, or). Null to list by rating.
        schema_name: the directory to search, e.g. "medical_providers".
        filters: exact-match filters, filter name to value, e.g. {"city": "Seattle", "insurance": "Medicare"}.
            City and category/specialty ignore case; list-valued filters (insurance, language, ...) must
            be spelled as they appear in results; yes/no filters take true or false.
        limit: how many results to return, 1 to 25.
    """
    allowed = configured_schemas(ctx.deps.config)
    try:
        async with get_read_only_session(account=ctx.deps.account_id) as session:
            if allowed is not None and schema_name not in allowed:
                raise directory.UnknownSchemaError(
                    schema_name, await directory.list_schemas(ctx.deps.account_id, session=session)
                )
            return await directory.search_directory(
                ctx.deps.account_id,
                query=query,
                schema_name=schema_name,
                filters=filters or {},
                limit=limit,
                session=session,
            )
    except directory.UnknownSchemaError as exc:
        valid = [name for name in exc.valid if allowed is None or name in allowed]
        raise ModelRetry(f'unknown directory {schema_name!r}; valid directories: {", ".join(valid) or "none"}') from exc
    except directory.DirectoryError as exc:
        raise ModelRetry(str(exc)) from exc


@directory_toolset.tool
async def get_directory_entry(ctx: RunContext[SessionDependencies], entry_id: EntryId) -> DirectoryEntryDetail:
    """Return every detail of one directory entry (phone, all insurance plans, languages, ...).

    Args:
        entry_id: the `id` of an entry from search_directory results.
    """
    async with get_read_only_session(account=ctx.deps.account_id) as session:
        entry = await directory.get_directory_entry(
            ctx.deps.account_id, entry_id, schema_names=configured_schemas(ctx.deps.config), session=session
        )
    if entry is None:
        raise ModelRetry(f'no entry with id {entry_id} in this directory; use an id from search_directory results')
    return entry
