"""`Period.parse`: calendar periods and custom windows, and what it refuses."""

from __future__ import annotations

import pytest

from agentrt.db.errors import InvalidInputError
from agentrt.services.budgets import Period


@pytest.mark.parametrize(
    ('text', 'kind', 'seconds'),
    [
        ('month', 'month', None),
        (' Weekly ', 'week', None),
        ('7d', 'window', 604_800),
        ('12H', 'window', 43_200),
        ('2D', 'window', 172_800),
        ('90m', 'window', 5_400),
        (' 1 m ', 'window', 60),
    ],
)
def test_calendar_periods_and_windows(text: str, kind: str, seconds: int | None) -> None:
    assert Period.parse(text) == Period(kind, seconds)


@pytest.mark.parametrize('text', ['1M', '12M', ' 3 M '])
def test_an_upper_case_m_is_refused_months_to_most_readers(text: str) -> None:
    # `1M` was a 1-minute window, its limit renewed every minute, exit 0 (QA).
    with pytest.raises(InvalidInputError) as refused:
        Period.parse(text)
    assert refused.value.field == 'period'
    said = str(refused.value)
    assert 'months or minutes' in said and 'month for the calendar month' in said and 'lower-case m (e.g. 90m)' in said
