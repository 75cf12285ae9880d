"""The LLM audit: `GET /api/v1/llm-audit/interactions` (a page of model requests) and `.../{id}` (one, with its
stored prompt, response or error). Every model request is there, failed, cancelled and budget-refused
ones included (`success=false`), and only the caller's account's."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query

from agentrt.api.auth import ReadCaller
from agentrt.api.cursors import decode_uuid_cursor, encode_cursor
from agentrt.api.errors import ApiError
from agentrt.api.filters import AgentFilter, ConversationFilter, Cursor, ModelFilter, Since, Until, time_range
from agentrt.api.schemas import (
    ERROR_RESPONSES,
    NOT_FOUND_RESPONSE,
    ContentOut,
    InteractionDetail,
    InteractionOut,
    InteractionPage,
)
from agentrt.db.errors import InvalidInputError
from agentrt.db.session import get_read_only_session
from agentrt.services.ledger import MAX_PAGE_SIZE, LedgerFilters, get_request, list_requests

router = APIRouter(prefix='/api/v1/llm-audit', tags=['audit'], responses=ERROR_RESPONSES)

MAX_PAGE = 1_000_000
"""Pages beyond this are refused (422): an offset that large is never a real request."""


@router.get('/interactions', summary='List model requests, newest first')
async def list_interactions(
    caller: ReadCaller,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE, description='Page number, from 1.')] = 1,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description='Rows per page, at most 100.')] = 20,
    success: Annotated[
        bool | None,
        Query(
            description=(
                'Only successful (true), or those that did not succeed (false): failed, cancelled, or refused by a '
                'budget (`status` says which).'
            )
        ),
    ] = None,
    model: ModelFilter = None,
    agent: AgentFilter = None,
    conversation_id: ConversationFilter = None,
    since: Since = None,
    until: Until = None,
    cursor: Cursor = None,
) -> InteractionPage:
    """A page of the account's model requests with the total the filters match.

    Page with `page` (1, 2, ...), or follow `next_cursor` (with `page` left at 1), which stays stable while new
    requests arrive.
    """
    start, end = time_range(since, until)
    after = decode_uuid_cursor(cursor, listing='audit', account_id=caller.account_id) if cursor is not None else None
    if after is not None and page != 1:
        raise InvalidInputError('give page or cursor, not both', field='cursor')
    filters = LedgerFilters(
        success=success,
        account=caller.account_id,
        agent=agent,
        model=model,
        chat_session_id=conversation_id,
        since=start,
        until=end,
    )
    async with get_read_only_session(account=caller.account_id) as session:
        result = await list_requests(session=session, filters=filters, page=page, page_size=page_size, after=after)
    items = [InteractionOut.of(row) for row in result.items]
    last = result.items[-1] if len(result.items) == page_size else None
    return InteractionPage(
        items=items,
        page=page,
        page_size=page_size,
        # Counted: list_requests counts unless told not to (the CLI's walk by --after does).
        total=result.total or 0,
        total_pages=result.pages or 1,
        next_cursor=(
            encode_cursor(last.started_at, last.id, listing='audit', account_id=caller.account_id)
            if last is not None
            else None
        ),
    )


@router.get(
    '/interactions/{interaction_id}',
    summary='One model request with its prompt and response',
    responses=NOT_FOUND_RESPONSE,
)
async def get_interaction(
    caller: ReadCaller, interaction_id: Annotated[uuid.UUID, Path(description='The request id.')]
) -> InteractionDetail:
    """The request, with its stored prompt, response or error (secrets redacted when they were stored)."""
    async with get_read_only_session(account=caller.account_id) as session:
        detail = await get_request(session=session, request_id=interaction_id, account_id=caller.account_id)
    if detail is None:  # another account's request is not found either
        raise ApiError(404, 'not_found', f'no model request {interaction_id}')
    return InteractionDetail(
        **InteractionOut.of(detail.request).model_dump(), contents=[ContentOut.of(c) for c in detail.contents]
    )
