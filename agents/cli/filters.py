"""The options that pick ledger rows (`--account --agent --model --since --until`) and their parsing."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, overload

import typer

from agentrt.agents.cli.support import EXIT_USAGE, fail

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from agentrt.services.ledger import LedgerFilters

JSON_OPTION = typer.Option(False, '--json', help='Print JSON for scripts instead of a table.')
CSV_OPTION = typer.Option(False, '--csv', help='Print CSV (every column, a header line first) instead of a table.')
ACCOUNT_OPTION = typer.Option(None, '--account', help='Account slug or id (id:N is always the id N).')
AGENT_OPTION = typer.Option(None, '--agent', help='Agent instance slug or agent name.')
MODEL_OPTION = typer.Option(None, '--model', help='Model name (requested or reported).')
SINCE_OPTION = typer.Option(None, '--since', help='Started at or after (ISO date or time, UTC unless given).')
UNTIL_OPTION = typer.Option(None, '--until', help='Started before (ISO date or time, UTC unless given).')


def ledger_filters(
    account: str | None,
    agent: str | None,
    model: str | None,
    since: str | None,
    until: str | None,
    *,
    success: bool | None = None,
    chat_session_id: str | None = None,
) -> LedgerFilters:
    """The filters the options name; a usage error (exit 2) for a time that does not parse."""
    from agentrt.services.ledger import LedgerFilters

    for flag, value in (('--agent', agent), ('--model', model), ('--session', chat_session_id)):
        if value is not None and not value.strip():  # it matched nothing: an empty page, read as "no activity"
            fail(f'{flag} is blank; leave it out to match every value', EXIT_USAGE)
    start, end = parse_time(since, '--since'), parse_time(until, '--until')
    if start is not None and end is not None and start >= end:
        fail('--since must be before --until', EXIT_USAGE)  # as the HTTP API says, rather than an empty answer
    return LedgerFilters(
        account=account,  # as given: `with_named_account` reads it (an id, or a slug) in the command's session
        agent=agent,
        model=model,
        since=start,
        until=end,
        success=success,
        chat_session_id=chat_session_id,
    )


def one_output_format(*, as_json: bool, as_csv: bool) -> None:
    """A usage error (exit 2) when both `--json` and `--csv` are given."""
    if as_json and as_csv:
        fail('--json and --csv exclude each other', EXIT_USAGE)


@overload
async def named_account(session: AsyncSession, account: str, *, ledger: bool = False) -> str | int: ...
@overload
async def named_account(
    session: AsyncSession, account: str | int | None, *, ledger: bool = False
) -> str | int | None: ...
async def named_account(session: AsyncSession, account: str | int | None, *, ledger: bool = False) -> str | int | None:
    """`--account` (an account's slug or id) as the services take it, read as `account_slug_or_id` does.

    Only the accounts tell which an all-digit value is (slugs may be all digits): a usage error (exit 2) for the slug
    of one account that is the id of another; with `ledger` (a command that reads or prunes ledger rows) also of a
    deleted one that has ledger rows. Budget commands leave `ledger` out: a deleted account has no budget.
    """
    from agentrt.services.tenancy import account_slug_or_id

    if not isinstance(account, str):
        return account
    return await account_slug_or_id(account, session=session, ledger=ledger)


async def with_named_account(session: AsyncSession, filters: LedgerFilters) -> LedgerFilters:
    """`filters` (of `ledger_filters`, whose `--account` is as given) with the account `named_account` reads (as the
    ledger's: a deleted account's id is one too)."""
    return dataclasses.replace(filters, account=await named_account(session, filters.account, ledger=True))


async def check_account(session: AsyncSession, account: str | int | None) -> None:
    """Raise `UnknownTenantError` (a usage error, listing the accounts) when `--account` names no account.

    Listings call it when they found nothing: an empty answer for a misspelt account read as "no activity". Ledger
    rows outlive their account (the ledger keeps its slug), so a deleted account's rows are still listed.
    """
    from agentrt.services.tenancy import get_account

    if account is not None:
        await get_account(account, session=session)


async def check_agent(session: AsyncSession, filters: LedgerFilters) -> None:
    """Raise `UnknownTenantError` (a usage error, listing the agents) when `--agent` names no agent: no agent instance
    has that slug and no model request that agent (of `--account`, when given).

    Listings call it when they found nothing: an empty page for a misspelt agent read as "no activity", where a
    misspelt account is an error. An agent of the user's own (its name on ledger rows, no instance) is known by its
    rows.
    """
    from agentrt.services.ledger import agent_is_known, agent_slugs
    from agentrt.services.tenancy import UnknownTenantError

    if filters.agent is None or await agent_is_known(session=session, agent=filters.agent, account=filters.account):
        return
    known = ', '.join(await agent_slugs(session=session, account=filters.account)) or 'none'
    where = '' if filters.account is None else f' for account {filters.account!r}'
    raise UnknownTenantError(
        f'unknown agent {filters.agent!r}{where} (no agent instance has that slug, no model request was made by an '
        f'agent of that name); agent instances: {known}',
        what='agent',
    )


def parse_time(value: str | None, option: str) -> datetime | None:
    """An ISO date or time in UTC (UTC unless it says otherwise); a usage error (exit 2) naming `option` if it is
    not one, or if it is outside the times UTC can represent (9999-12-31T23:00-05:00)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(f'{option} must be an ISO date or time (e.g. 2026-03-01 or 2026-03-01T12:00), got {value!r}', EXIT_USAGE)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        # In UTC here: converted later (the rollup's day, the driver's parameter), an overflow was an internal error.
        return parsed.astimezone(UTC)
    except OverflowError:
        fail(f'{option} {value} is out of range: in UTC it falls outside years 1 to 9999', EXIT_USAGE)


_AGE = re.compile(r'(\d+)([hdw])', re.ASCII)
_AGE_UNITS = {'h': 'hours', 'd': 'days', 'w': 'weeks'}
"""No `m`: minutes to one reader, months to another, and an age that cuts too late deletes what was meant to stay
(QA: `--before 6m` meant six months and pruned all but the last six minutes)."""


def parse_time_or_age(value: str | None, option: str, *, now: datetime | None = None) -> datetime | None:
    """`parse_time`, or an age counted back from now: a number and a unit (`h`ours, `d`ays, `w`eeks), e.g. `90d` for
    90 days ago; a usage error (exit 2) naming `option` for anything else."""
    if value is None:
        return None
    text = value.strip()
    found = _AGE.fullmatch(text.lower())
    if found is None:
        shown = shown_age(text)
        if text[-1:].isalpha() and text[:-1].isdigit():  # `90y`, `6m`: an age, of a unit not taken
            fail(
                f'{option} takes an age in hours, days or weeks (h, d, w: e.g. 90d; m is not taken, minutes or '
                f'months), or an ISO date or time; got {shown!r}',
                EXIT_USAGE,
            )
        try:
            datetime.fromisoformat(value)
        except ValueError:
            fail(
                f'{option} must be an ISO date or time (e.g. 2026-03-01 or 2026-03-01T12:00) or an age (e.g. 90d, '
                f'12h, 2w), got {shown!r}',
                EXIT_USAGE,
            )
        return parse_time(value, option)
    try:
        return (now or datetime.now(UTC)) - timedelta(**{_AGE_UNITS[found.group(2)]: int(found.group(1))})
    except (OverflowError, ValueError):  # ValueError: more digits than `int()` converts
        fail(f'{option} {shown_age(text)} is out of range: it reaches before year 1', EXIT_USAGE)


def shown_age(text: str) -> str:
    """An age as an error line shows it: at most 40 characters (QA: a 5,000-digit age printed in full)."""
    return text if len(text) <= 40 else text[:40] + '...'


def money(value: Decimal | None) -> str:
    """A cost for a table cell: six decimals, or `-` when unpriced."""
    return '-' if value is None else f'{value:.6f}'


def dash(value: Any) -> str:
    """A value for a table cell, `-` for None."""
    return '-' if value is None else str(value)
