"""`agentrt audit list` and `agentrt audit show`: the audit trail of model requests, with prompts and responses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any, TypeVar

import typer
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.agents.cli.filters import (
    ACCOUNT_OPTION,
    AGENT_OPTION,
    JSON_OPTION,
    MODEL_OPTION,
    SINCE_OPTION,
    UNTIL_OPTION,
    dash,
    ledger_filters,
    money,
)
from agentrt.agents.cli.support import EXIT_FAILURE, EXIT_USAGE, console, fail, print_json, run
from agentrt.db.engine import close_database, init_database
from agentrt.db.models.ledger import LLMRequestRow
from agentrt.db.session import get_read_only_session
from agentrt.services.ledger import AmbiguousRequestIdError, LedgerDetail, LedgerPage, get_request, list_requests

T = TypeVar('T')

MAX_PAGE = (2**63 - 1) // 100  # the row offset of the last page still fits a bigint

audit_app = typer.Typer(
    help='The audit trail: every model request, with its prompt and response.', no_args_is_help=True
)


@audit_app.command('list')
def audit_list(
    failed: bool = typer.Option(False, '--failed', help='Only failed or cancelled requests.'),
    succeeded: bool = typer.Option(False, '--succeeded', help='Only successful requests.'),
    account: str | None = ACCOUNT_OPTION,
    agent: str | None = AGENT_OPTION,
    model: str | None = MODEL_OPTION,
    chat_session: str | None = typer.Option(None, '--session', help='Chat session id.'),
    since: str | None = SINCE_OPTION,
    until: str | None = UNTIL_OPTION,
    page: int = typer.Option(1, '--page', min=1, max=MAX_PAGE, help='Page number, from 1.'),
    page_size: int = typer.Option(20, '--page-size', min=1, max=100, help='Rows per page (at most 100).'),
    as_json: bool = JSON_OPTION,
) -> None:
    """List model requests, newest first."""
    if failed and succeeded:
        fail('--failed and --succeeded exclude each other', EXIT_USAGE)
    success = False if failed else True if succeeded else None
    filters = ledger_filters(account, agent, model, since, until, success=success, chat_session_id=chat_session)
    result = run(
        _with_session, lambda session: list_requests(session=session, filters=filters, page=page, page_size=page_size)
    )
    render_page(result, as_json=as_json)


@audit_app.command('show')
def audit_show(
    request_id: str = typer.Argument(..., help='The request id, or at least its first 8 hex digits.'),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show one model request with its stored prompt, response or error."""
    try:
        detail = run(_with_session, lambda session: get_request(session=session, request_id=request_id))
    except (ValueError, AmbiguousRequestIdError) as exc:
        fail(str(exc), EXIT_USAGE)
    if detail is None:
        fail(f'no model request {request_id}', EXIT_FAILURE)
    render_detail(detail, as_json=as_json)


def render_page(result: LedgerPage, *, as_json: bool) -> None:
    """Print one page of requests as a table, or as JSON (decimals as strings, so they stay exact)."""
    if as_json:
        payload = {'page': result.page, 'page_size': result.page_size, 'total': result.total, 'pages': result.pages}
        print_json({**payload, 'items': [_row_dict(item) for item in result.items]})
        return
    title = f'model requests: page {result.page} of {result.pages} ({result.total:,} in all)'
    table = Table(title=title, title_justify='left')
    for column in ('id', 'started (UTC)', 'account', 'agent', 'model', 'status', 'tokens in/out', 'cost USD', 'ms'):
        table.add_column(column, no_wrap=column == 'id')
    for item in result.items:
        table.add_row(
            str(item.id),
            item.started_at.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S'),
            item.account_slug or dash(item.account_id),
            item.agent_instance_slug or item.agent_name or '-',
            item.model + (' (stream)' if item.streamed else ''),
            item.status if item.success or not item.error_type else f'{item.status}: {item.error_type}',
            f'{item.input_tokens:,}/{item.output_tokens:,}',
            money(item.total_cost),
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
        print_json({**_row_dict(detail.request), 'contents': contents})
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


async def _with_session(query: Callable[[AsyncSession], Awaitable[T]]) -> T:
    await init_database()
    try:
        async with get_read_only_session() as session:
            return await query(session)
    finally:
        await close_database()


def _row_dict(row: LLMRequestRow) -> dict[str, Any]:
    return {column.key: getattr(row, column.key) for column in LLMRequestRow.__table__.columns}
