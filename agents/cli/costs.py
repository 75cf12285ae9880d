"""`agentrt costs`: requests, tokens and cost per account, agent, model or day, from the rollup or the ledger."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import TYPE_CHECKING

import typer

from agentrt.agents.cli.filters import (
    ACCOUNT_OPTION,
    AGENT_OPTION,
    CSV_OPTION,
    JSON_OPTION,
    MODEL_OPTION,
    SINCE_OPTION,
    UNTIL_OPTION,
    check_account,
    check_agent,
    ledger_filters,
    money,
    one_output_format,
    with_named_account,
)
from agentrt.agents.cli.output import print_csv, text_cells
from agentrt.agents.cli.support import EXIT_USAGE, console, fail, print_json, run

if TYPE_CHECKING:
    from agentrt.services.ledger import CostGrouping, CostSummary, LedgerFilters

# services.ledger.COST_GROUPINGS, not imported here (`costs --help` stays fast; a test checks they agree).
COST_GROUPINGS = ('account', 'agent', 'model', 'day')
COST_SOURCES = ('rollup', 'ledger')


def costs(
    by: str = typer.Option('account', '--by', help=f'Group by {"|".join(COST_GROUPINGS)}.'),
    account: str | None = ACCOUNT_OPTION,
    agent: str | None = AGENT_OPTION,
    model: str | None = MODEL_OPTION,
    since: str | None = SINCE_OPTION,
    until: str | None = UNTIL_OPTION,
    source: str = typer.Option(
        'rollup',
        '--source',
        help=(
            'rollup: the daily usage rollup kept after each chat turn (the ledger when --model, or a time within a '
            'day, needs it); ledger: scan the ledger.'
        ),
    ),
    as_json: bool = JSON_OPTION,
    as_csv: bool = CSV_OPTION,
) -> None:
    """Sum model requests, tokens and cost (USD, from genai-prices) per account, agent, model or day."""
    if by not in COST_GROUPINGS:
        fail(f'--by must be one of {", ".join(COST_GROUPINGS)}, got {by!r}', EXIT_USAGE)
    if source not in COST_SOURCES:
        fail(f'--source must be one of {", ".join(COST_SOURCES)}, got {source!r}', EXIT_USAGE)
    one_output_format(as_json=as_json, as_csv=as_csv)
    filters = ledger_filters(account, agent, model, since, until)
    rows = run(_cost_rows, by, filters, source)
    render_costs(by, rows, as_json=as_json, as_csv=as_csv)


async def _cost_rows(by: CostGrouping, filters: LedgerFilters, source: str) -> list[CostSummary]:
    """Read the rollup when it can answer the question (whole UTC days, no success filter), else the ledger.

    Post-turn work keeps the rollup current for chat turns; every ledger row not counted yet (an agent of one's own,
    a roll-up a process's end dropped) is rolled up here first (for a few seconds: the ledger answers when rows are
    left queued), each counted once however often this runs.
    """
    from agentrt.db.engine import close_database, init_database
    from agentrt.db.session import Unscoped, get_read_only_session
    from agentrt.services.ledger import RollupCannotAnswer, catch_up_rollup, summarise_costs

    await init_database()
    try:
        if source == 'rollup' and not await catch_up_rollup():
            # Rows still queued (another roll-up is taking them, a backlog outlasted the read's few seconds) or a
            # recompute rebuilding the rollup: the rollup would leave them out, so the ledger answers now.
            source = 'ledger'
        async with get_read_only_session(account=Unscoped.ADMIN) as session:  # the operator: every account
            filters = await with_named_account(session, filters)
            rows = None
            if source == 'rollup':
                try:
                    rows = await summarise_costs(session=session, by=by, filters=filters, source='rollup')
                except RollupCannotAnswer:
                    pass
            if rows is None:
                rows = await summarise_costs(session=session, by=by, filters=filters)
            if not rows:
                await check_account(session, filters.account)
                await check_agent(session, filters)
            return rows
    finally:
        await close_database()


def render_costs(by: str, rows: list[CostSummary], *, as_json: bool, as_csv: bool = False) -> None:
    """Print cost totals per group as a table, as JSON, or as CSV (`key` named after the grouping)."""
    if as_json:
        print_json({'by': by, 'groups': [asdict(row) for row in rows]})
        return
    if as_csv:
        from agentrt.services.ledger import CostSummary

        names = [field.name for field in fields(CostSummary)]
        print_csv(
            [{by if k == 'key' else k: v for k, v in asdict(row).items()} for row in rows],
            columns=[by if name == 'key' else name for name in names],
        )
        return
    from rich.table import Table

    table = Table(title=f'costs by {by}', title_justify='left')
    for column in (by, 'requests', 'failed', 'cancelled', 'tokens in', 'tokens out', 'cost USD', 'unpriced'):
        table.add_column(column, justify='left' if column == by else 'right', overflow='fold')
    for row in rows:
        table.add_row(
            *text_cells(
                row.key,
                f'{row.requests:,}',
                f'{row.failed:,}',
                f'{row.cancelled:,}',
                f'{row.input_tokens:,}',
                f'{row.output_tokens:,}',
                money(row.total_cost),
                f'{row.unpriced:,}',
            )
        )
    console.print(table)
