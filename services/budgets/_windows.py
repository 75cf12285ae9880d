"""Budget periods: parsing `--period`, describing a window, and the SQL that finds the window a moment falls in.

Calendar periods are in UTC: a month from the 1st, an ISO week from Monday, a day from midnight. A custom window
(`7d`, `12h`, `90m`) repeats every `window_seconds` from an anchor (UTC midnight of the day it was set, unless
given), so its windows never drift.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from agentrt.db.errors import InvalidInputError

_WINDOW = re.compile(r'^\s*(\d{1,7})\s*([mhd])\s*$', re.IGNORECASE)
_UNIT_SECONDS = {'m': 60, 'h': 3600, 'd': 86_400}
MAX_WINDOW_SECONDS = 366 * 86_400
CALENDAR_PERIODS = ('month', 'week', 'day')


@dataclass(frozen=True)
class Period:
    """What a budget's limit applies to: a calendar period, or a custom window of `window_seconds`."""

    kind: str
    """`month`, `week`, `day` or `window`."""
    window_seconds: int | None = None

    @classmethod
    def parse(cls, text: str) -> Period:
        """`month`, `week`, `day`, or a custom window: a number and a unit (`m`inutes, `h`ours, `d`ays), e.g. `7d`.

        Raises:
            InvalidInputError: anything else (field `period`), an upper-case `M` too (months or minutes).
        """
        value = text.strip().lower()
        if value in CALENDAR_PERIODS:
            return cls(value)
        if value in ('monthly', 'weekly', 'daily'):
            return cls({'monthly': 'month', 'weekly': 'week', 'daily': 'day'}[value])
        found = _WINDOW.match(text)
        if found and found.group(2) == 'M':
            # A month to most readers, a minute to the parser: `1M` was a 1-minute window, its limit renewed every
            # minute (QA). `H` and `D` mean one thing each, so they stay taken.
            raise InvalidInputError(
                f'the period {text.strip()!r} is ambiguous, months or minutes: give month for the calendar month, '
                f"or a window's minutes with a lower-case m (e.g. 90m)",
                field='period',
            )
        if found:
            seconds = int(found.group(1)) * _UNIT_SECONDS[found.group(2).lower()]
            if 60 <= seconds <= MAX_WINDOW_SECONDS:
                return cls('window', seconds)
        raise InvalidInputError(
            f'the period must be month, week, day or a window such as 7d, 12h or 90m (at least 1m, at most 366d), '
            f'got {text!r}',
            field='period',
        )

    def describe(self) -> str:
        """`month`, `week`, `day`, or the window as `7d`, `12h`, `90m`."""
        if self.kind != 'window' or self.window_seconds is None:
            return self.kind
        for unit in ('d', 'h', 'm'):
            if self.window_seconds % _UNIT_SECONDS[unit] == 0:
                return f'{self.window_seconds // _UNIT_SECONDS[unit]}{unit}'
        return f'{self.window_seconds}s'  # pragma: no cover - set through `parse`, always whole minutes


def default_anchor(now: datetime | None = None) -> datetime:
    """The anchor of a custom window set without one: UTC midnight of today."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def window_sql(budget: str, at: str) -> tuple[str, str]:
    """SQL for the start and the end of the window of budget row `budget` (an alias) that moment `at` falls in.

    Calendar arithmetic runs on UTC wall time (`AT TIME ZONE 'UTC'`), so the session's time zone plays no part.
    """
    utc = f"({at} AT TIME ZONE 'UTC')"
    calendar = f'date_trunc({budget}.period, {utc})'
    step = (
        f"CASE {budget}.period WHEN 'month' THEN interval '1 month' WHEN 'week' THEN interval '1 week' "
        "ELSE interval '1 day' END"
    )
    index = f'floor(extract(epoch FROM {at} - {budget}.window_anchor) / {budget}.window_seconds)'
    window_start = f"{budget}.window_anchor + ({index} * {budget}.window_seconds) * interval '1 second'"
    start = f"CASE WHEN {budget}.period = 'window' THEN {window_start} ELSE {calendar} AT TIME ZONE 'UTC' END"
    end = (
        f"CASE WHEN {budget}.period = 'window' THEN {window_start} + {budget}.window_seconds * interval '1 second' "
        f"ELSE ({calendar} + {step}) AT TIME ZONE 'UTC' END"
    )
    return start, end
