"""`agentrt audit list`, `show` and `prune`: the audit trail of model requests, with prompts and responses, and
their stored bodies removed (billing rows kept)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

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
    dash,
    ledger_filters,
    money,
    named_account,
    one_output_format,
    parse_time_or_age,
    with_named_account,
)
from agentrt.agents.cli.output import Column, fitted_table, print_csv, text_cells, utc_text
from agentrt.agents.cli.support import EXIT_FAILURE, EXIT_USAGE, console, fail, operator_session, print_json, run

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from agentrt.db.models.ledger import LLMRequestRow
    from agentrt.services.ledger import LedgerDetail, LedgerPage, PruneReport


MAX_PAGE = (2**63 - 1) // 100  # the row offset of the last page still fits a bigint
TRACE_URL_ENV = 'AGENTRT_TRACE_URL'

audit_app = typer.Typer(
    help='The audit trail: every model request, with its prompt and response.', no_args_is_help=True
)


@audit_app.command('list')
def audit_list(
    failed: bool = typer.Option(
        False,
        '--failed',
        help='Only requests that did not succeed: failed, cancelled, or refused by a budget (see the status column).',
    ),
    succeeded: bool = typer.Option(False, '--succeeded', help='Only successful requests.'),
    account: str | None = ACCOUNT_OPTION,
    agent: str | None = AGENT_OPTION,
    model: str | None = MODEL_OPTION,
    chat_session: str | None = typer.Option(None, '--session', help='Chat session id.'),
    since: str | None = SINCE_OPTION,
    until: str | None = UNTIL_OPTION,
    page: int = typer.Option(1, '--page', min=1, max=MAX_PAGE, help='Page number, from 1.'),
    page_size: int = typer.Option(20, '--page-size', min=1, max=100, help='Rows per page (at most 100).'),
    after: str | None = typer.Option(
        None,
        '--after',
        help='Only requests older than this one (its id, or 8+ hex digits of it): the page after one whose last row '
        'it is (the footer and --json name it), found without reading the rows before it or counting them all.',
    ),
    as_json: bool = JSON_OPTION,
    as_csv: bool = CSV_OPTION,
) -> None:
    """List model requests, newest first (the columns that fit the terminal, all in a pipe; or --json, --csv)."""
    from agentrt.services.ledger import AmbiguousRequestIdError

    if failed and succeeded:
        fail('--failed and --succeeded exclude each other', EXIT_USAGE)
    if after is not None and page != 1:
        fail('--after and --page exclude each other: --after names where the page starts', EXIT_USAGE)
    one_output_format(as_json=as_json, as_csv=as_csv)
    success = False if failed else True if succeeded else None
    filters = ledger_filters(account, agent, model, since, until, success=success, chat_session_id=chat_session)

    async def query(session: AsyncSession) -> LedgerPage:
        from agentrt.db.errors import InvalidInputError
        from agentrt.services.ledger import list_requests, request_position

        named = await with_named_account(session, filters)
        position = None
        if after is not None:
            try:
                position = await request_position(session=session, request_id=after)
            except ValueError as exc:  # AmbiguousRequestIdError is a LookupError: said as it is below
                raise InvalidInputError(str(exc), field='after') from exc
            if position is None:
                raise InvalidInputError(f'--after: no model request {after}', field='after')
        # An offset (--page 45000) reads and sorts every row before its page, and the total counts every row: a walk
        # by --after reads only its page, so it skips the count too (a year of ledger is a million rows).
        found = await list_requests(
            session=session, filters=named, page=page, page_size=page_size, after=position, count=position is None
        )
        if not found.items:
            await check_account(session, named.account)
            await check_agent(session, named)
        return found

    try:
        result = run(operator_session, query, read_only=True)
    except AmbiguousRequestIdError as exc:
        fail(f'--after: {exc}', EXIT_USAGE)
    render_page(result, as_json=as_json, as_csv=as_csv)


@audit_app.command('show')
def audit_show(
    request_id: str = typer.Argument(..., help='The request id, or at least its first 8 hex digits.'),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show one model request: its columns, then its prompt, response or error as a conversation."""
    from agentrt.services.ledger import AmbiguousRequestIdError

    check_trace_template()

    async def query(session: AsyncSession) -> LedgerDetail | None:
        from agentrt.services.ledger import get_request

        return await get_request(session=session, request_id=request_id)

    try:
        detail = run(operator_session, query, read_only=True)
    except (ValueError, AmbiguousRequestIdError) as exc:
        fail(str(exc), EXIT_USAGE)
    if detail is None:
        fail(f'no model request {request_id}', EXIT_FAILURE)
    render_detail(detail, as_json=as_json)


@audit_app.command('prune')
def audit_prune(
    before: str | None = typer.Option(
        None,
        '--before',
        help='Requests started before this: an ISO date or time (UTC unless given), or an age such as 90d, 12h, 2w.',
    ),
    conversation: str | None = typer.Option(
        None, '--conversation', help="A conversation's id: its requests only (a deleted conversation's too)."
    ),
    account: str | None = typer.Option(
        None,
        '--account',
        help=(
            'Account slug or id (id:N is always the id N): its requests only (required with --conversation when '
            'there are several accounts).'
        ),
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete stored prompts, responses and errors, keeping each request's billing row (tokens, cost, status)."""
    if before is None and conversation is None:
        fail('give --before, --conversation, or both: which stored prompts and responses to remove', EXIT_USAGE)
    if conversation is not None and not conversation.strip():
        fail('--conversation is blank', EXIT_USAGE)
    cut = parse_time_or_age(before, '--before')
    if cut is not None and cut > datetime.now(UTC):
        fail(f'--before {before} is in the future: it would remove bodies of requests not made yet', EXIT_USAGE)
    report = run(_prune, cut, account, conversation)
    if as_json:
        print_json(
            {
                'bodies': report.bodies,
                'bytes': report.bytes,
                'requests': report.requests,
                'before': cut,
                'account': account,
                'conversation': conversation,
            }
        )
        return
    console.print(
        f'removed {report.bodies:,} stored bodies ({report.bytes:,} bytes) of {report.requests:,} model '
        'requests; their billing rows are kept',
        highlight=False,
    )


async def _prune(before: datetime | None, account: str | None, conversation: str | None) -> PruneReport:
    """Check what the options name (nothing is deleted when one is wrong), then prune as the operator."""
    from agentrt.db.engine import close_database, init_database
    from agentrt.db.session import Unscoped, get_read_only_session
    from agentrt.services.ledger import prune_contents

    await init_database()
    try:
        async with get_read_only_session(account=Unscoped.ADMIN) as session:
            named = await named_account(session, account, ledger=True)
            await _check_prune_target(session, named, conversation)
        return await prune_contents(before=before, account=named, conversation=conversation)
    finally:
        await close_database()


async def _check_prune_target(session: AsyncSession, account: str | int | None, conversation: str | None) -> None:
    from agentrt.db.errors import InvalidInputError
    from agentrt.services.ledger import account_count, conversation_accounts, ledger_knows_account

    # A deleted account's ledger rows are kept with its slug: they can still be pruned by it.
    if account is not None and not await ledger_knows_account(session=session, account=account):
        await check_account(session, account)
    if conversation is None:
        return
    accounts = await conversation_accounts(session=session, conversation=conversation, account=account)
    where = '' if account is None else f' of account {account!r}'
    if not accounts:
        raise InvalidInputError(
            f'no model request of conversation {conversation!r}{where} in the ledger', field='conversation'
        )
    # A conversation id is unique within its account only: without --account, another tenant's conversation of the
    # same id could be the one pruned.
    if account is None and (len(accounts) > 1 or await account_count(session=session) > 1):
        raise InvalidInputError(
            f'--account is required with --conversation when there are several accounts (conversation '
            f'{conversation!r} has model requests of {", ".join(accounts)})',
            field='account',
        )


def _status(item: LLMRequestRow, *, full: bool) -> str:
    return f'{item.status}: {item.error_type}' if full and not item.success and item.error_type else item.status


# In the order they are shown. The table keeps the essential ones at any width and adds the others, richest
# variant first, as far as the terminal allows (80 columns: id prefix, time, account, model, status, cost; 120:
# tokens, latency and the error type too); --json and --csv have every column.
LIST_COLUMNS: tuple[Column[LLMRequestRow], ...] = (
    # Ids are time-ordered (UUID version 7): 16 hex digits are the millisecond and 12 random bits, so they tell rows
    # apart but for one pair in 4,096 of a millisecond's (`audit show` then asks for more of the id).
    Column('id', (lambda r: str(r.id), lambda r: r.id.hex[:16]), essential=True, rank=9),
    Column(
        'started (UTC)',
        (
            lambda r: utc_text(r.started_at),
            lambda r: utc_text(r.started_at, '%m-%d %H:%M'),
        ),
        essential=True,
        rank=7,
    ),
    Column('account', (lambda r: r.account_slug or dash(r.account_id),), rank=1),
    Column('agent', (lambda r: r.agent_instance_slug or r.agent_name or '-',), rank=5),
    Column('model', (lambda r: r.model + (' (stream)' if r.streamed else ''), lambda r: r.model), essential=True),
    Column('status', (lambda r: _status(r, full=True), lambda r: _status(r, full=False)), essential=True, rank=4),
    Column('tokens in/out', (lambda r: f'{r.input_tokens:,}/{r.output_tokens:,}',), rank=2, right=True),
    Column('cost USD', (lambda r: money(r.total_cost),), essential=True, right=True),
    Column('ms', (lambda r: f'{r.latency_ms:,.0f}',), rank=3, right=True),
)


def render_page(result: LedgerPage, *, as_json: bool, as_csv: bool = False) -> None:
    """Print one page of requests as a table as wide as the terminal, as JSON (decimals as strings, so they stay
    exact) or as CSV (every column, a header line first)."""
    older = next_after(result)
    if as_json:
        payload = {'page': result.page, 'page_size': result.page_size, 'total': result.total, 'pages': result.pages}
        print_json({**payload, 'next_after': older, 'items': [row_dict(item) for item in result.items]})
        return
    if as_csv:  # the last row's id is the next page's --after
        print_csv([row_dict(item) for item in result.items], columns=ledger_columns())
        return
    if result.total is None:  # a walk by --after: not counted, so no "page N of M"
        title = f'model requests: {len(result.items)} older than --after' + ('' if older else ' (the oldest)')
    elif result.pages is not None and result.page > result.pages:  # not an empty table under "page 5 of 1"
        console.print(
            f'model requests: page {result.page} is past the last, page {result.pages} '
            f'({result.total:,} in all at {result.page_size} a page)',
            highlight=False,
        )
        return
    else:
        title = f'model requests: page {result.page} of {result.pages} ({result.total:,} in all)'
    console.print(fitted_table(title, LIST_COLUMNS, result.items, width=console.table_room))
    if older:
        console.print(f'older: --after {older}', highlight=False)


def next_after(result: LedgerPage) -> str | None:
    """The `--after` of the page after `result` (its last row's id), or None when `result` is the last page."""
    if len(result.items) < result.page_size or (result.pages is not None and result.page >= result.pages):
        return None
    return str(result.items[-1].id)


def render_detail(detail: LedgerDetail, *, as_json: bool) -> None:
    """Print one request: its columns, its trace, then each stored body as a conversation (JSON: bodies as JSON
    values, `format` saying `json`, or `text` for a body that is not JSON, such as one cut at the size cap)."""
    from rich.table import Table

    from agentrt.agents.cli.transcript import parse_body, render_body

    row = row_dict(detail.request)
    if as_json:
        contents = []
        for c in detail.contents:
            body, is_json = parse_body(c.body, truncated=c.truncated)
            contents.append(
                {
                    'kind': c.kind,
                    'size_bytes': c.size_bytes,
                    'truncated': c.truncated,
                    'redactions': c.redactions,
                    'format': 'json' if is_json else 'text',
                    'body': body,
                }
            )
        print_json({**row, 'trace_url': trace_url(detail.request.trace_id), 'contents': contents})
        return
    table = Table(title=f'model request {detail.request.id}', show_header=False, title_justify='left')
    table.add_column(style='bold', no_wrap=True)
    table.add_column(overflow='fold')
    for name, value in row.items():
        table.add_row(*text_cells(name, '-' if value is None else str(value), one_line=False))
    if (link := trace_url(detail.request.trace_id)) is not None:
        table.add_row('trace', link)
    console.print(table)
    if not detail.contents:  # not stored (AGENTRT_LEDGER_STORE_CONTENT=false), or removed since
        console.print('no prompt, response or error is stored for this request', highlight=False)
    for content in detail.contents:
        note = ' (truncated)' if content.truncated else ''
        console.rule(f'{content.kind}: {content.size_bytes:,} bytes, {content.redactions} redacted{note}')
        console.print(render_body(content.kind, content.body, truncated=content.truncated), highlight=False)


def check_trace_template() -> None:
    """Fail (exit 2) when `AGENTRT_TRACE_URL` is set without `{trace_id}`: every request's link was that text as it
    is, one address for every trace (`{trace}`, `{traceId}`: a typo of the placeholder), said nowhere."""
    from agentrt.db.flags import shown_value

    template = os.environ.get(TRACE_URL_ENV, '').strip()
    if template and '{trace_id}' not in template:
        fail(
            f"{TRACE_URL_ENV}={shown_value(template)} has no {{trace_id}}: give the trace's address with {{trace_id}} "
            'where its id goes, e.g. http://localhost:16686/trace/{trace_id}',
            EXIT_USAGE,
        )


def trace_url(trace_id: str | None) -> str | None:
    """The trace's address in a tracing backend, from `AGENTRT_TRACE_URL` (e.g. `http://jaeger:16686/trace/{trace_id}`)."""
    template = os.environ.get(TRACE_URL_ENV, '').strip()
    if not trace_id or not template:
        return None
    return template.replace('{trace_id}', trace_id)


def ledger_columns() -> list[str]:
    """The columns of a ledger row, in table order."""
    from agentrt.db.models.ledger import LLMRequestRow

    return [column.key for column in LLMRequestRow.__table__.columns]


def row_dict(row: LLMRequestRow) -> dict[str, Any]:
    """A ledger row as a dict of its columns."""
    return {key: getattr(row, key) for key in ledger_columns()}
