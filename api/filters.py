"""Query parameters shared by the read routes, validated so that a bad value is a 422 naming it, never a 500."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Query
from pydantic import AfterValidator, BeforeValidator

from agentrt.db.errors import InvalidInputError

_NUMBER = re.compile(r'[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?')
_CONTROL = re.compile(r'[\x00-\x1f\x7f]')


def _filter_text(value: str) -> str:
    """A filter's text, refused when blank (it matched nothing, a 200 with an empty page) or when it holds a control
    character (a NUL would reach PostgreSQL as text it refuses; no name holds one)."""
    found = _CONTROL.search(value)
    if found is not None:
        raise ValueError(
            f'has a control character (U+{ord(found.group()):04X}) at position {found.start()}; no name holds one'
        )
    if not value.strip():
        raise ValueError('is blank; leave the parameter out to match every value')
    return value


def _iso_time(value: object) -> object:
    """Refuse a bare number for a time: pydantic reads one as a Unix time (`-1` was 1969-12-31T23:59:59Z, `1.5`
    a second and a half into 1970), which this API neither documents nor means."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        raise ValueError(
            'is a number, not a time: give an ISO 8601 date or time, e.g. 2026-03-01 or 2026-03-01T12:00:00Z'
        )
    return value


FilterText = Annotated[str, AfterValidator(_filter_text)]

ModelFilter = Annotated[
    FilterText | None, Query(min_length=1, max_length=200, description='Requested or reported model.')
]
AgentFilter = Annotated[FilterText | None, Query(min_length=1, max_length=200, description='Agent slug or agent name.')]
ConversationFilter = Annotated[FilterText | None, Query(min_length=1, max_length=200, description='Conversation id.')]
IsoTime = Annotated[datetime, BeforeValidator(_iso_time)]
Since = Annotated[
    IsoTime | None, Query(description='From this time, inclusive (ISO 8601; without an offset it is UTC).')
]
Until = Annotated[IsoTime | None, Query(description='Before this time (ISO 8601; without an offset it is UTC).')]
Cursor = Annotated[str | None, Query(min_length=1, max_length=600, description="A previous page's `next_cursor`.")]


def time_range(since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    """`since` and `until` in UTC (a time without an offset is taken as UTC).

    Raises:
        InvalidInputError: `since` is not before `until`.
    """
    since, until = _utc(since, 'since'), _utc(until, 'until')
    if since is not None and until is not None and since >= until:
        raise InvalidInputError('since must be before until', field='since')
    return since, until


def _utc(moment: datetime | None, field: str) -> datetime | None:
    if moment is None:
        return None
    try:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError as exc:  # e.g. 9999-12-31T23:00-05:00 is past the last representable moment
        raise InvalidInputError(f'{field} is out of range', field=field) from exc
