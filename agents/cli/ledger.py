"""`agentrt audit ...`, `agentrt costs` and `agentrt ledger replay`: reading and repairing the LLM ledger."""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from agentrt.agents.cli.support import EXIT_FAILURE, EXIT_USAGE, console, err_console, fail, run
from agentrt.db.engine import close_database, init_database
from agentrt.db.models.ledger import LLMRequestRow
from agentrt.db.session import get_read_only_session
from agentrt.services.ledger._config import LedgerConfig
from agentrt.services.ledger._costs import RollupCannotAnswer, summarise_costs_from_rollup
from agentrt.services.ledger._queries import (
    COST_GROUPINGS,
    AmbiguousRequestIdError,
    CostSummary,
    LedgerDetail,
    LedgerFilters,
    LedgerPage,
    get_request,
    list_requests,
    summarise_costs,
)
from agentrt.services.ledger._rollups import roll_up_pending
from agentrt.services.ledger._tracker import LLMRequestTracker

COST_SOURCES = ('rollup', 'ledger')
ROLLUP_CATCH_UP = timedelta(days=7)

audit_app = typer.Typer(
    help='The audit trail: every model request, with its prompt and response.', no_args_is_help=True
)
ledger_app = typer.Typer(help='The LLM ledger: replay rows spooled while the database was down.', no_args_is_help=True)

_JSON = typer.Option(False, '--json', help='Print JSON for scripts instead of a table.')
_ACCOUNT = typer.Option(None, '--account', help='Account slug or id.')
_AGENT = typer.Option(None, '--agent', help='Agent instance slug or agent name.')
_MODEL = typer.Option(None, '--model', help='Model name (requested or reported).')
_SINCE = typer.Option(None, '--since', help='Started at or after (ISO date or time, UTC unless given).')
_UNTIL = typer.Option(None, '--until', help='Started before (ISO date or time, UTC unless given).')
_SPOOL = typer.Option(None, '--spool', help='Spool file (default: AGENTRT_LEDGER_SPOOL or beside the data dir).')


@audit_app.command('list')
def audit_list(
    failed: bool = typer.Option(False, '--failed', help='Only failed or cancelled requests.'),
    succeeded: bool = typer.Option(False, '--succeeded', help='Only successful requests.'),
    account: str | None = _ACCOUNT,
    agent: str | None = _AGENT,
    model: str | None = _MODEL,
    chat_session: str | None = typer.Option(None, '--session', help='Chat session id.'),
    since: str | None = _SINCE,
    until: str | None = _UNTIL,
    page: int = typer.Option(1, '--page', min=1, help='Page number, from 1.'),
    page_size: int = typer.Option(20, '--page-size', min=1, max=100, help='Rows per page (at most 100).'),
    as_json: bool = _JSON,
) -> None:
    """List model requests, newest first."""
    if failed and succeeded:
        fail('--failed and --succeeded exclude each other', EXIT_USAGE)
    success = False if failed else True if succeeded else None
    filters = _filters(account, agent, model, since, until, success=success, chat_session_id=chat_session)
    result = run(
        _with_session, lambda session: list_requests(session=session, filters=filters, page=page, page_size=page_size)
    )
    render_page(result, as_json=as_json)


@audit_app.command('show')
def audit_show(
    request_id: str = typer.Argument(..., help='The request id, or at least its first 8 hex digits.'),
    as_json: bool = _JSON,
) -> None:
    """Show one model request with its stored prompt, response or error."""
    try:
        detail = run(_with_session, lambda session: get_request(session=session, request_id=request_id))
    except (ValueError, AmbiguousRequestIdError) as exc:
        fail(str(exc), EXIT_USAGE)
    if detail is None:
        fail(f'no model request {request_id}', EXIT_FAILURE)
    render_detail(detail, as_json=as_json)


def costs(
    by: str = typer.Option('account', '--by', help=f'Group by {"|".join(COST_GROUPINGS)}.'),
    account: str | None = _ACCOUNT,
    agent: str | None = _AGENT,
    model: str | None = _MODEL,
    since: str | None = _SINCE,
    until: str | None = _UNTIL,
    source: str = typer.Option(
        'rollup', '--source', help='rollup: the daily usage rollup kept after each chat turn; ledger: scan the ledger.'
    ),
    as_json: bool = _JSON,
) -> None:
    """Sum model requests, tokens and cost (USD, from genai-prices) per account, agent, model or day."""
    if by not in COST_GROUPINGS:
        fail(f'--by must be one of {", ".join(COST_GROUPINGS)}, got {by!r}', EXIT_USAGE)
    if source not in COST_SOURCES:
        fail(f'--source must be one of {", ".join(COST_SOURCES)}, got {source!r}', EXIT_USAGE)
    filters = _filters(account, agent, model, since, until)
    rows = run(_cost_rows, by, filters, source)
    render_costs(by, rows, as_json=as_json)


async def _cost_rows(by: Any, filters: LedgerFilters, source: str) -> list[CostSummary]:
    """Read the rollup when it can answer the question (whole UTC days, no success filter), else the ledger.

    Post-turn work keeps the rollup current for chat turns; ledger rows written by other agents are caught up
    here first (the last `ROLLUP_CATCH_UP`), each counted once however often this runs.
    """
    await init_database()
    try:
        if source == 'rollup':
            await roll_up_pending(datetime.now(UTC) - ROLLUP_CATCH_UP)
        async with get_read_only_session() as session:
            if source == 'rollup':
                try:
                    return await summarise_costs_from_rollup(session=session, by=by, filters=filters)
                except RollupCannotAnswer:
                    pass
            return await summarise_costs(session=session, by=by, filters=filters)
    finally:
        await close_database()


def render_page(result: LedgerPage, *, as_json: bool) -> None:
    """Print one page of requests as a table, or as JSON (decimals as strings, so they stay exact)."""
    if as_json:
        payload = {'page': result.page, 'page_size': result.page_size, 'total': result.total, 'pages': result.pages}
        _print_json({**payload, 'items': [_row_dict(item) for item in result.items]})
        return
    title = f'model requests: page {result.page} of {result.pages} ({result.total:,} in all)'
    table = Table(title=title, title_justify='left')
    for column in ('id', 'started (UTC)', 'account', 'agent', 'model', 'status', 'tokens in/out', 'cost USD', 'ms'):
        table.add_column(column, no_wrap=column == 'id')
    for item in result.items:
        table.add_row(
            str(item.id),
            item.started_at.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S'),
            item.account_slug or _none(item.account_id),
            item.agent_instance_slug or item.agent_name or '-',
            item.model + (' (stream)' if item.streamed else ''),
            item.status if item.success or not item.error_type else f'{item.status}: {item.error_type}',
            f'{item.input_tokens:,}/{item.output_tokens:,}',
            _money(item.total_cost),
            f'{item.latency_ms:,.0f}',
        )
    console.print(table)


def render_detail(detail: LedgerDetail, *, as_json: bool) -> None:
    """Print one request: its columns, then each stored body in full."""
    contents = [
        {
            'kind': c.kind,
            'size_bytes': c.size_bytes,
            'truncated': c.truncated,
            'redactions': c.redactions,
            'body': c.body,
        }
        for c in detail.contents
    ]
    if as_json:
        _print_json({**_row_dict(detail.request), 'contents': contents})
        return
    table = Table(title=f'model request {detail.request.id}', show_header=False, title_justify='left')
    table.add_column(style='bold')
    table.add_column()
    for name, value in _row_dict(detail.request).items():
        table.add_row(name, '-' if value is None else str(value))
    console.print(table)
    for content in contents:
        note = ' (truncated)' if content['truncated'] else ''
        console.rule(f'{content["kind"]}: {content["size_bytes"]:,} bytes, {content["redactions"]} redacted{note}')
        console.print(content['body'], markup=False, highlight=False, soft_wrap=True)


def render_costs(by: str, rows: list[CostSummary], *, as_json: bool) -> None:
    """Print cost totals per group as a table, or as JSON."""
    if as_json:
        _print_json({'by': by, 'groups': [asdict(row) for row in rows]})
        return
    table = Table(title=f'costs by {by}', title_justify='left')
    for column in (by, 'requests', 'failed', 'tokens in', 'tokens out', 'cost USD', 'unpriced'):
        table.add_column(column, justify='left' if column == by else 'right')
    for row in rows:
        table.add_row(
            row.key,
            f'{row.requests:,}',
            f'{row.failed:,}',
            f'{row.input_tokens:,}',
            f'{row.output_tokens:,}',
            _money(row.total_cost),
            f'{row.unpriced:,}',
        )
    console.print(table)


@ledger_app.command('replay')
def replay(
    spool: Path | None = _SPOOL,
    as_json: bool = _JSON,
) -> None:
    """Write rows spooled while the database was unreachable; each row is written once, however often this runs."""
    report = run(_replay, spool)
    if as_json:
        _print_json(asdict(report))
    elif report.skipped:
        console.print('another replay is running; nothing done')
    else:
        console.print(
            f'replayed {report.files} spool file(s): {report.rows:,} row(s), {report.inserted:,} new, '
            f'{report.duplicates:,} already there, {report.contents:,} content row(s), {report.rejected:,} rejected'
        )


async def _replay(spool: Path | None) -> Any:
    await init_database()
    try:
        config = LedgerConfig.from_env()
        tracker = LLMRequestTracker(replace(config, spool_path=spool or config.spool_path))
        report = await tracker.replay_spool()
        if report.inserted:
            # Replayed rows may be days old: fold every not-yet-rolled-up row into the usage rollup.
            try:
                await roll_up_pending(datetime(1970, 1, 1, tzinfo=UTC))
            except Exception as exc:  # the replay itself succeeded; the rollup can be repaired later
                err_console.print(f'warning: rows replayed, but the usage rollup was not updated: {exc}')
        return report
    finally:
        await close_database()


async def _with_session(query: Any) -> Any:
    await init_database()
    try:
        async with get_read_only_session() as session:
            return await query(session)
    finally:
        await close_database()


def _filters(
    account: str | None,
    agent: str | None,
    model: str | None,
    since: str | None,
    until: str | None,
    **extra: Any,
) -> LedgerFilters:
    return LedgerFilters(
        account=int(account) if account and account.isdigit() else account,
        agent=agent,
        model=model,
        since=_time(since, '--since'),
        until=_time(until, '--until'),
        **extra,
    )


def _time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(f'{option} must be an ISO date or time (e.g. 2026-03-01 or 2026-03-01T12:00), got {value!r}', EXIT_USAGE)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _row_dict(row: LLMRequestRow) -> dict[str, Any]:
    return {column.key: getattr(row, column.key) for column in LLMRequestRow.__table__.columns}


def _money(value: Decimal | None) -> str:
    return '-' if value is None else f'{value:.6f}'


def _none(value: Any) -> str:
    return '-' if value is None else str(value)


def _print_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, default=_json_default, indent=2))


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)  # a string keeps the exact decimal
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f'not JSON serialisable: {type(value).__name__}')
