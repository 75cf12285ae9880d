"""The options of a `LedgerCapability`, checked when it is built: a wrong one would otherwise show only in a run.

A NaN or negative `ack_timeout` would make every run stop waiting for its rows at once, and a truthy string for a
flag would be taken as `True`: neither fails, both silently do something else than asked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic_ai.capabilities import AbstractCapability

from agentrt.db.errors import InvalidInputError, check_seconds
from agentrt.services.budgets import BudgetConfig
from agentrt.services.ledger._tracker import LLMRequestTracker

_FLAGS = ('store_content', 'wait_for_durable', 'measure_time_to_first_token', 'stands_in', 'defer_loading')
_TEXTS = ('id', 'description')


def check_option_names(names: Iterable[str], known: Iterable[str]) -> None:
    """Refuse an option `ledger_capability()` does not have (a misspelt one, or a private field).

    Raises:
        InvalidInputError: naming the first unknown option and listing the known ones.
    """
    public = sorted(name for name in known if not name.startswith('_'))
    for name in names:
        if name not in public:
            raise InvalidInputError(
                f'ledger_capability() has no option {name!r}; its options are {", ".join(public)}', field=name
            )


def check_options(capability: Any) -> None:
    """Check the type and value of each option of a `LedgerCapability`.

    Raises:
        InvalidInputError: naming the first option of the wrong type or value.
    """
    for name in _FLAGS:
        value = getattr(capability, name)
        if not isinstance(value, bool):
            raise InvalidInputError.wrong_type(name, 'True or False', value)
    for name in _TEXTS:
        value = getattr(capability, name)
        if value is not None and not isinstance(value, str):
            raise InvalidInputError.wrong_type(name, 'text or None', value)
    check_seconds(capability.ack_timeout, 'ack_timeout')
    if capability.tracker is not None and not isinstance(capability.tracker, LLMRequestTracker):
        raise InvalidInputError.wrong_type('tracker', 'an LLMRequestTracker or None', capability.tracker)
    if capability.budget is not None and not isinstance(capability.budget, BudgetConfig):
        raise InvalidInputError.wrong_type('budget', 'a BudgetConfig or None', capability.budget)
    riders = capability.riders
    if not (isinstance(riders, tuple) and all(isinstance(rider, AbstractCapability) for rider in riders)):
        raise InvalidInputError.wrong_type('riders', 'a tuple of pydantic-ai capabilities', riders)
