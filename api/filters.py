"""Query parameters shared by the read routes, validated so that a bad value is a 422 naming it, never a 500."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Query

from agentrt.db.errors import InvalidInputError

# No control characters: a NUL would reach PostgreSQL as text it refuses.
_PRINTABLE = r'^[^\x00-\x1f\x7f]+$'

ModelFilter = Annotated[
    str | None, Query(min_length=1, max_length=200, pattern=_PRINTABLE, description='Requested or reported model.')
]
AgentFilter = Annotated[
    str | None, Query(min_length=1, max_length=200, pattern=_PRINTABLE, description='Agent slug or agent name.')
]
ConversationFilter = Annotated[
    str | None, Query(min_length=1, max_length=200, pattern=_PRINTABLE, description='Conversation id.')
]
Since = Annotated[
    datetime | None, Query(description='From this time, inclusive (ISO 8601; without an offset it is UTC).')
]
Until = Annotated[datetime | None, Query(description='Before this time (ISO 8601; without an offset it is UTC).')]
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
