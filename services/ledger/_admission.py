"""Admission of a model request by its account's budget, before it is sent (the ledger capability calls it).

Order: the ledger id is minted → (a model the provider counts tokens for: is there a budget at all? the count is a
provider call) → the request's most cost is estimated (input tokens bounded, output tokens the
request's `max_tokens` or `AGENTRT_BUDGET_MAX_OUTPUT_TOKENS`) → one conditional statement holds it (`reserve`) → the
request's `max_tokens` is set to what the hold pays for, never above what its settings ask and never below
`AGENTRT_BUDGET_MIN_OUTPUT_TOKENS` (a request that cannot afford those is refused) → the request is sent. A refusal
raises `BudgetExceededError` before anything is sent.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from pydantic_ai.messages import ModelMessage
from pydantic_ai.models import ModelRequestContext
from pydantic_ai.settings import ModelSettings

from agentrt.db.errors import BudgetExceededError
from agentrt.services.budgets import (
    BudgetConfig,
    Hold,
    Refusal,
    RequestSizes,
    has_budget,
    open_window,
    pricer_for,
    reserve,
    supports_count_tokens,
    sweep_reservations,
    sweep_soon,
)
from agentrt.services.ledger._identity import LedgerIdentity

logger = logging.getLogger('agentrt.budgets')


async def admit(
    identity: LedgerIdentity,
    request_context: ModelRequestContext,
    request_id: uuid.UUID,
    at: datetime,
    sizes: RequestSizes,
    config: BudgetConfig,
    messages: Sequence[ModelMessage] | None = None,
) -> Hold | None:
    """Hold what the request can cost of its account's budget and cap its `max_tokens` to it.

    Args:
        identity: whose request it is.
        request_context: the request (its `max_tokens` is set here).
        request_id: the ledger id, the hold's id.
        at: when it starts (picks the window).
        sizes: the run's message sizes.
        config: the budget knobs.
        messages: the messages the request will send, when hooks that run after this one change them (a turn's
            context window); `request_context.messages` when None.

    Returns:
        The hold, or None when nothing is held (budgets off, no account, no budget, an unpriced model counted).

    Raises:
        BudgetExceededError: the budget refused the request; nothing was sent.
        DatabaseUnavailableError: the budget could not be checked; nothing was sent.
    """
    account_id = identity.account_id
    if not config.enabled or account_id is None:
        return None
    model = request_context.model
    pricer = pricer_for(model)
    if pricer is None:
        if config.unpriced == 'refuse' and await has_budget(account_id):
            raise BudgetExceededError(
                f'model {model.model_name!r} has no price (genai-prices), and account '
                f'{_account(identity)} has a budget that AGENTRT_BUDGET_UNPRICED=refuse applies to; the request was '
                f'not sent. Use a priced model, or set AGENTRT_BUDGET_UNPRICED=count to send it (its tokens are '
                f'counted, it costs 0 against the limit)',
                reason='unpriced',
                account_id=account_id,
            )
        if config.unpriced == 'count':
            # Counted, not held: its window still gets its row (once), or every budget read summed the window's
            # ledger (1.2 s for a 365-day window of a million rows) until a priced request came.
            await open_window(account_id, at)
        return None
    counting = config.count_tokens and supports_count_tokens(model)
    if counting and not await has_budget(account_id):
        return None  # the provider is asked to count only for an account with a budget (it is a request too)
    sent = request_context.messages if messages is None else messages
    input_tokens = await _input_tokens(request_context, sent, sizes, counting)
    settings: dict[str, Any] = dict(request_context.model_settings or {})
    configured = settings.get('max_tokens')
    wanted = configured if isinstance(configured, int) and configured > 0 else config.max_output_tokens
    least = min(config.min_output_tokens, wanted)
    full = pricer.cost(input_tokens, wanted, at)
    minimum = pricer.cost(input_tokens, least, at)
    arguments: dict[str, Any] = {
        'request_id': request_id,
        'account_id': account_id,
        'full_usd': full,
        'minimum_usd': minimum,
        'input_usd': pricer.cost(input_tokens, 0, at),
        'at': at,
        'ttl_seconds': config.reservation_ttl_seconds,
    }
    result = await reserve(**arguments)
    if result is None:
        return None
    if isinstance(result, Refusal) and result.reserved_usd and await _swept():
        # Refused with holds on the window: some may be a dead process's (a `kill -9` of a server mid-turn), which the
        # background sweep gave back only after this refusal, or not at all on an idle server (QA: a 429 naming
        # "requests in flight" that were gone). Swept now, once, and asked again (its refusal counted once).
        result = await reserve(**arguments, again=True)
        if result is None:
            return None
    sweep_soon(config.sweep_interval_seconds)  # (now and then) holds a dead process left are given back
    if isinstance(result, Refusal):
        raise _refused(identity, result, minimum, least)
    output = wanted
    if result.amount_usd < full:
        affordable = pricer.output_tokens_for(input_tokens, result.amount_usd, at)
        output = wanted if affordable is None else max(min(affordable, wanted), 1)
    settings['max_tokens'] = output
    request_context.model_settings = cast(ModelSettings, settings)
    return result


async def _swept() -> bool:
    """Sweep now (dead processes' and expired holds), or wait for the sweep under way: whether either ended well.

    Not whether this sweep gave anything back: of requests refused together, one sweeps and finds the dead holds; the
    others kept refusals naming the same holds, gone by then (QA: 16 of 20 concurrent chats after a `kill -9`
    refused). Each asks again once a sweep has committed; they wait for it side by side, holding no lock of the
    sweep's own, so a flood of refusals does not line up behind one sweep after another."""
    try:
        await sweep_reservations(wait=True)
    except Exception as exc:  # the refusal stands as it was; the background sweep tries again
        logger.warning('budget: the sweep before a refusal failed (%s: %s)', type(exc).__name__, exc)
        return False
    return True


async def _input_tokens(
    request_context: ModelRequestContext, messages: Sequence[ModelMessage], sizes: RequestSizes, counting: bool
) -> int:
    """The provider's count of `messages` where the model has one (and it is wanted), else the byte-length bound."""
    model = request_context.model
    if counting:
        try:
            usage = await model.count_tokens(
                list(messages),
                request_context.model_settings,
                request_context.model_request_parameters,
            )
            if usage.input_tokens > 0:
                return usage.input_tokens
        except Exception as exc:  # the provider could not count: the byte bound holds all the same
            logger.debug('budgets: %s could not count tokens (%s); using the size bound', model.model_name, exc)
    return sizes.input_tokens_bound(messages, request_context.model_request_parameters)


def _refused(identity: LedgerIdentity, refusal: Refusal, needed: Decimal, least: int) -> BudgetExceededError:
    # Six decimals, or the limit's own when it has more: the limit as set (`$0.000000000001`, not `$0.000001`, a
    # million times it, QA), and every amount beside it to the places that compare with it.
    places = max(USD_PLACES, -min(0, int(refusal.limit_usd.normalize().as_tuple().exponent)))
    held = f' and {usd(refusal.reserved_usd, places)} held by requests in flight' if refusal.reserved_usd else ''
    spent = usd(refusal.spent_usd, places) if refusal.spent_usd is not None else 'what was spent'
    return BudgetExceededError(
        f'the budget of account {_account(identity)} does not cover this model request: {spent} spent{held} of its '
        f'{usd(refusal.limit_usd, places)} limit for the period {_when(refusal.period_start)} to '
        f'{_when(refusal.period_end)} UTC, and the request needs at least {usd(needed, places)} (its input and '
        f'{least} output tokens); it was not sent. Raise the limit (agentrt budget set) or wait for the next period',
        reason='limit',
        account_id=identity.account_id,
        limit_usd=refusal.limit_usd,
        spent_usd=refusal.spent_usd,
        reserved_usd=refusal.reserved_usd,
        needed_usd=needed,
        period_start=refusal.period_start,
        period_end=refusal.period_end,
    )


USD_PLACES = 6
"""The decimals a refusal shows its amounts to, unless its limit has more (a limit has at most 12)."""


def usd(amount: Decimal | None, places: int = USD_PLACES) -> str:
    """`$12.50`, `$0.000123`: at least cents, at most `places` decimals (rounded up, as a hold is: a request's need,
    what was spent and held, never shown under what they are; a limit has no more decimals than `places`)."""
    if amount is None:
        return '-'
    text = f'{amount.quantize(Decimal(1).scaleb(-places), rounding="ROUND_CEILING"):f}'.rstrip('0')
    whole, _, cents = text.partition('.')
    return f'${whole}.{cents.ljust(2, "0")}'


def _account(identity: LedgerIdentity) -> str:
    return repr(identity.account_slug) if identity.account_slug else str(identity.account_id)


def _when(moment: datetime) -> str:
    return moment.strftime(f'{moment.year:04d}-%m-%d %H:%M')  # glibc's `%Y` does not pad a year before 1000
