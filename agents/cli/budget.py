"""`agentrt budget set|show|remove|sweep`: per-account spend limits (README, "Budgets")."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from agentrt.agents.cli.filters import JSON_OPTION, named_account, parse_time
from agentrt.agents.cli.output import plain_decimal, text_cells, utc_text
from agentrt.agents.cli.support import console, err_console, operator_session, print_json, run

if TYPE_CHECKING:  # the runtime is imported when a command runs, so `agentrt budget --help` stays fast
    from sqlalchemy.ext.asyncio import AsyncSession

    from agentrt.services.budgets import BudgetStatus, SweepReport


budget_app = typer.Typer(
    help='Spend limits per account (USD per month, week, day or a custom window), held before every model request.',
    no_args_is_help=True,
)

_ACCOUNT = typer.Option(..., '--account', help='Account slug or id (id:N is always the id N).')


@budget_app.command('set')
def budget_set(
    account: str = _ACCOUNT,
    limit: str = typer.Option(..., '--limit', help='The limit in USD per period, e.g. 50 or 12.50.'),
    period: str = typer.Option(
        'month', '--period', help='month, week or day (UTC), or a custom window such as 7d, 12h or 90m.'
    ),
    anchor: str | None = typer.Option(
        None, '--anchor', help="Where a custom window's periods are counted from (ISO time; default: today 00:00 UTC)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Set or change an account's budget; every process applies it from its next model request."""
    from agentrt.services.budgets import Period, parse_limit, set_budget

    limit_usd = parse_limit(limit)
    window = Period.parse(period)
    anchored = parse_time(anchor, '--anchor')

    async def set_it(session: AsyncSession) -> BudgetStatus:
        who = await named_account(session, account)
        return await set_budget(
            session=session, account=who, limit_usd=limit_usd, period=window, window_anchor=anchored
        )

    status: BudgetStatus = run(operator_session, set_it)
    _render([status], as_json=as_json)


@budget_app.command('show')
def budget_show(
    account: str | None = typer.Option(
        None, '--account', help='Only this account (slug or id; id:N is always the id N).'
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show budgets and their current period: limit, spent, held by requests in flight, remaining."""
    statuses: list[BudgetStatus] = run(operator_session, lambda s: _statuses(s, account))
    if account is not None and not statuses and not as_json:
        err_console.print(f'account {account!r} has no budget (no limit)', highlight=False)
        return
    _render(statuses, as_json=as_json)


@budget_app.command('remove')
def budget_remove(account: str = _ACCOUNT, as_json: bool = JSON_OPTION) -> None:
    """Remove an account's budget: its requests are no longer limited."""
    from agentrt.services.budgets import remove_budget

    async def remove_it(session: AsyncSession) -> bool:
        return await remove_budget(session=session, account=await named_account(session, account))

    removed: bool = run(operator_session, remove_it)
    if as_json:
        print_json({'account': account, 'removed': removed})
        return
    console.print(f'budget of account {account!r} removed' if removed else f'account {account!r} had no budget')


@budget_app.command('sweep')
def budget_sweep(as_json: bool = JSON_OPTION) -> None:
    """Release the holds of processes on this host that died holding them, and every expired hold."""
    report: SweepReport = run(_sweep)
    if as_json:
        print_json(asdict(report))
        return
    console.print(
        f'released {report.released_dead} hold(s) of {report.dead_holders} dead process(es) and '
        f'{report.released_expired} expired hold(s): ${report.released_usd}',
        highlight=False,
    )


async def _statuses(session: AsyncSession, account: str | None) -> list[BudgetStatus]:
    from agentrt.services.budgets import account_budget_status, budget_statuses

    who = await named_account(session, account)
    if who is None:
        return await budget_statuses(session=session)
    status = await account_budget_status(session=session, account=who)
    return [] if status is None else [status]


async def _sweep() -> SweepReport:
    from agentrt.db.engine import close_database, init_database
    from agentrt.services.budgets import sweep_reservations

    await init_database()
    try:
        return await sweep_reservations()
    finally:
        await close_database()


def _render(statuses: list[BudgetStatus], *, as_json: bool) -> None:
    if as_json:
        print_json([_as_dict(status) for status in statuses])
        return
    table = Table(title=f'budgets ({len(statuses)})', title_justify='left')
    for column in (
        'account',
        'limit USD',
        'period',
        'current period (UTC)',
        'spent',
        'held',
        'remaining',
        'over limit',
    ):
        table.add_column(
            column,
            justify='left' if column in ('account', 'period', 'current period (UTC)') else 'right',
            overflow='fold',
        )
    for status in statuses:
        table.add_row(
            *text_cells(
                status.account_slug,
                plain_decimal(status.limit_usd, places=2, grouped=True),  # as set: a limit under a cent is no 0.00
                status.period,
                f'{_when(status.period_start)} to {_when(status.period_end)}',
                # Grouped as the limit is: 12,345.678900 spent of a 20,000.00 limit, not 12345.678900.
                plain_decimal(status.spent_usd, places=6, grouped=True),
                f'{plain_decimal(status.reserved_usd, places=6, grouped=True)} ({status.holds:,})',
                plain_decimal(status.remaining_usd, places=6, grouped=True),
                f'{status.refused_requests:,}',
            )
        )
    console.print(table)


def _as_dict(status: BudgetStatus) -> dict[str, Any]:
    return asdict(status)


def _when(moment: datetime) -> str:
    return utc_text(moment, '%Y-%m-%d %H:%M')
