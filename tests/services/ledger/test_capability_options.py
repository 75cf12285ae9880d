"""`ledger_capability()` refuses a wrong option when it is built, naming it, rather than in a run."""

from __future__ import annotations

import math
from typing import Any

import pytest

from agentrt.db.errors import InvalidInputError
from agentrt.services.budgets import BudgetConfig
from agentrt.services.ledger import ledger_capability
from agentrt.services.ledger._capability import LedgerCapability


@pytest.mark.parametrize(
    ('options', 'field', 'says'),
    [
        ({'ack_timeout': -1}, 'ack_timeout', 'ack_timeout must be a finite number of seconds, 0 or more, not -1'),
        ({'ack_timeout': math.nan}, 'ack_timeout', 'not nan'),
        ({'ack_timeout': math.inf}, 'ack_timeout', 'not inf'),
        ({'ack_timeout': '10'}, 'ack_timeout', 'ack_timeout must be a number of seconds, not str'),
        ({'ack_timeout': True}, 'ack_timeout', 'ack_timeout must be a number of seconds, not bool'),
        ({'store_content': 'yes'}, 'store_content', 'store_content must be True or False, not str'),
        ({'wait_for_durable': 1}, 'wait_for_durable', 'wait_for_durable must be True or False, not int'),
        ({'measure_time_to_first_token': None}, 'measure_time_to_first_token', 'True or False, not NoneType'),
        ({'defer_loading': 'no'}, 'defer_loading', 'defer_loading must be True or False, not str'),
        ({'tracker': 'default'}, 'tracker', 'tracker must be an LLMRequestTracker or None, not str'),
        ({'budget': {'enabled': False}}, 'budget', 'budget must be a BudgetConfig or None, not dict'),
        ({'riders': [object()]}, 'riders', 'riders must be a tuple of pydantic-ai capabilities, not list'),
        ({'riders': (object(),)}, 'riders', 'riders must be a tuple of pydantic-ai capabilities, not tuple'),
        ({'id': 7}, 'id', 'id must be text or None, not int'),
        ({'description': b'x'}, 'description', 'description must be text or None, not bytes'),
        ({'ack_timeuot': 1}, 'ack_timeuot', "ledger_capability() has no option 'ack_timeuot'; its options are "),
        ({'_run': None}, '_run', "ledger_capability() has no option '_run'"),
    ],
)
def test_a_wrong_option_is_refused_when_the_capability_is_built(options: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(InvalidInputError) as refused:
        ledger_capability(**options)
    assert says in str(refused.value)
    assert refused.value.field == field


def test_the_class_checks_its_fields_too() -> None:
    with pytest.raises(InvalidInputError, match='store_content must be True or False, not str'):
        LedgerCapability(store_content='yes')  # type: ignore[arg-type]


def test_the_unknown_option_message_lists_the_known_ones() -> None:
    with pytest.raises(InvalidInputError) as refused:
        ledger_capability(ack_timeuot=1)
    assert 'ack_timeout' in str(refused.value) and 'store_content' in str(refused.value)
    assert '_run' not in str(refused.value)


@pytest.mark.parametrize('ack_timeout', [0, 0.5, 10])
def test_good_options_are_kept(ack_timeout: float) -> None:
    budget = BudgetConfig(enabled=False)
    capability = ledger_capability(
        ack_timeout=ack_timeout, store_content=False, wait_for_durable=False, budget=budget, id='agentrt.ledger'
    )
    assert capability.ack_timeout == ack_timeout
    assert (capability.store_content, capability.wait_for_durable) == (False, False)
    assert capability.budget is budget and capability.id == 'agentrt.ledger'
