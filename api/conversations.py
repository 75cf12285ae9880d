"""Conversations of the caller's account: list them, read one's messages, delete one, and run a non-streamed turn.

Every route reaches only the caller's account's conversations (`PostgresConversationStore(account_id)` and the
listing filter by account), so another account's conversation id is simply not found.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from pydantic_ai.conversation_store import ConversationConflict
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.responses import Response

from agentrt.agents.simple_chat import run_checked_turn
from agentrt.api.auth import ChatCaller, ChatKeyBeforeBody, ReadCaller
from agentrt.api.conversation_body import messages_body
from agentrt.api.cursors import (
    MAX_CURSOR_CHARS,
    Listing,
    decode_cursor,
    decode_message_cursor,
    encode_cursor,
    encode_message_cursor,
)
from agentrt.api.disconnect import ClientDisconnected, unless_disconnected
from agentrt.api.errors import ApiError
from agentrt.api.filters import Cursor
from agentrt.api.schemas import (
    BODY_RESPONSES,
    BUSY_CONVERSATION_RESPONSE,
    ERROR_RESPONSES,
    NOT_FOUND_RESPONSE,
    BudgetExceededOut,
    ConversationMessages,
    ConversationOut,
    ConversationPage,
    ErrorOut,
    TurnRequest,
    TurnResponse,
    UsageOut,
)
from agentrt.api.turn_input import check_conversation_id, check_http_turn, parse_json_off_loop, require_utf8_json
from agentrt.api.turn_stream import chat_config
from agentrt.db.errors import InvalidInputError
from agentrt.db.session import get_read_only_session
from agentrt.services.conversations import (
    MAX_CONVERSATIONS_PAGE,
    ConversationOrder,
    PostgresConversationStore,
    UnknownPositionError,
    list_conversations,
    load_page,
    off_loop_taking,
)

MAX_MESSAGES_PAGE = 100_000
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that closed the connection before the answer

router = APIRouter(prefix='/api/v1/conversations', tags=['conversations'], responses=ERROR_RESPONSES)

ConversationId = Annotated[str, Path(min_length=1, max_length=200, description='The conversation id.')]


class _StoredIdConvertor(StringConvertor):
    """A path segment that may hold a `/`: an agentrt from before 2026-12-01 took any text as a session id
    (`team/alice`), and such a conversation is listed, so it must open and delete (`check_conversation_id`). The
    AI SDK and the web UI send it percent-encoded (`team%2Falice`), which the server decodes before routing."""

    # Any character, a newline too (as `str`'s `[^/]+`: an id with control characters is refused in words, not
    # missed by the router); `<id>/turns` stays the turn route's (POST only: a GET there is still a 405). Said as a
    # lookahead from the id's start: a lookbehind `(?<!/turns)` also saw the `/` before the id, so the id `turns`
    # matched no route (its conversation could be created but never opened, continued or deleted).
    regex = '(?s:(?!.+/turns$).+)'


class _TurnOwnerConvertor(StringConvertor):
    """The conversation of the turn route (`<id>/turns`): any id `_StoredIdConvertor` takes, `turns` included (the
    route's own `/turns` follows it)."""

    regex = '(?s:.+)'


register_url_convertor('stored_id', _StoredIdConvertor())
register_url_convertor('turn_owner_id', _TurnOwnerConvertor())


@router.get('', summary='List conversations, newest first')
async def list_all(
    caller: ReadCaller,
    limit: Annotated[int, Query(ge=1, le=MAX_CONVERSATIONS_PAGE, description='At most this many.')] = 50,
    cursor: Cursor = None,
    order: Annotated[
        ConversationOrder,
        Query(
            description='`created` (default): newest first by when each began; a walk with `next_cursor` lists each '
            'conversation once. `updated`: most recently updated first; a conversation updated between two pages is '
            'not on a later page.'
        ),
    ] = 'created',
) -> ConversationPage:
    """The account's conversations with their titles, summaries and usage; follow `next_cursor` for more."""
    # The cursor of each order is its own listing: a position by creation means nothing by update, and back.
    listing: Listing = 'conversations-created' if order == 'created' else 'conversations'
    after = decode_cursor(cursor, listing=listing, account_id=caller.account_id) if cursor is not None else None
    async with get_read_only_session(account=caller.account_id) as session:
        items = await list_conversations(
            session=session, account_id=caller.account_id, limit=limit, after=after, order=order
        )
    last = items[-1] if len(items) == limit else None
    return ConversationPage(
        items=[ConversationOut.of(item) for item in items],
        next_cursor=(
            encode_cursor(
                last.created_at if order == 'created' else last.updated_at,
                last.conversation_id,
                listing=listing,
                account_id=caller.account_id,
            )
            if last is not None
            else None
        ),
    )


_ETAG_HEADER = {
    'ETag': {
        'description': "The conversation's revision and title, for `If-None-Match` here and `If-Match` on DELETE.",
        'schema': {'type': 'string'},
    }
}
# Declared, so a generated client expects them (OpenAPI had neither; only the parameter's description named the 304).
CONDITIONAL_READ_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {'headers': _ETAG_HEADER},
    304: {'description': '`If-None-Match` names the current `ETag`: no body.', 'headers': _ETAG_HEADER},
}


@router.get(
    '/{conversation_id:stored_id}',
    summary="One conversation's messages",
    response_model=ConversationMessages,
    responses={**NOT_FOUND_RESPONSE, **CONDITIONAL_READ_RESPONSES},
)
async def messages(
    caller: ReadCaller,
    conversation_id: ConversationId,
    format: Annotated[
        Literal['vercel', 'pydantic'],
        Query(description="`vercel`: AI SDK UI messages (for `useChat`); `pydantic`: pydantic-ai's messages."),
    ] = 'vercel',
    limit: Annotated[
        int | None,
        Query(
            ge=1,
            le=MAX_MESSAGES_PAGE,
            description='Only the latest messages (or the latest before `before`): at most this many (pydantic-ai '
            'messages), from the start of a turn; `earlier` says whether older ones were left out, `earlier_cursor` '
            "reads them. A turn longer than `limit` is cut before one of the model's responses (one more message "
            'when needed), never between a tool call and its result.',
        ),
    ] = None,
    before: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_CURSOR_CHARS,
            description="Only the messages before this position: a previous page's `earlier_cursor`, passed back "
            'unchanged. Positions stay valid while the conversation goes on.',
        ),
    ] = None,
    if_none_match: Annotated[
        str | None,
        Header(
            max_length=2000,
            description='An `ETag` read before: 304 with no body while the conversation (its revision and title) is '
            'still as it was.',
        ),
    ] = None,
) -> Response:
    """The conversation's stored messages, in order (with `limit`, only the latest; with `before`, the ones before a
    page read earlier): page back with `limit` and `earlier_cursor` until `earlier` is false.

    Without `limit` every message is read and sent: a conversation of several hundred turns is megabytes, which the
    server takes about a second of CPU to read and encode (in a worker thread: other requests go on meanwhile).
    """
    conversation_id = check_conversation_id(conversation_id, account=caller.account_slug)
    entry_id = (
        decode_message_cursor(before, conversation_id=conversation_id, account_id=caller.account_id)
        if before is not None
        else None
    )
    store = PostgresConversationStore(caller.account_id)
    try:
        page = await load_page(store, conversation_id, limit=limit, before=entry_id)
    except UnknownPositionError as exc:
        raise InvalidInputError(
            'this position is not in the conversation (deleted or branched away since, or never one of its '
            'messages): read its latest messages again',
            field='before',
        ) from exc
    if page is None:
        raise ApiError(404, 'not_found', f'no conversation {conversation_id!r}')
    earlier_cursor = (
        encode_message_cursor(page.earlier, conversation_id=conversation_id, account_id=caller.account_id)
        if page.earlier is not None
        else None
    )
    # Megabytes for a long conversation: dumped and encoded off the event loop (`conversation_body`), the same bytes
    # FastAPI made of the `ConversationMessages` this route returned; the page goes along, to be freed there too.
    # The entity tag (`entity_tag`) names the revision too, for a conditional DELETE (`If-Match`) without the body.
    tag = entity_tag(page.revision, page.title) if page.revision is not None else None
    headers = {'ETag': f'"{tag}"'} if tag is not None else None
    # A client polling a conversation it holds gets 304 instead of megabytes: a revision's messages never change, the
    # title is in the tag (it changes without a new revision), and the rest of the body follows from the URL (format,
    # limit, before), which the client's cache is keyed by.
    if tag is not None and if_none_match is not None and _none_match(if_none_match, tag):
        return Response(status_code=304, headers=headers)
    encoding = off_loop_taking(
        functools.partial(messages_body, conversation_id=conversation_id, format=format, earlier_cursor=earlier_cursor),
        page,
    )
    del page
    return Response(await encoding, media_type='application/json', headers=headers)


UNCONDITIONAL_DELETE_ATTEMPTS = 5
"""Reads and deletes a DELETE without If-Match makes while turns keep saving the conversation in between."""


@router.delete(
    '/{conversation_id:stored_id}',
    status_code=204,
    summary='Delete a conversation',
    responses={
        404: {'model': ErrorOut, 'description': 'No such conversation.'},
        409: {'model': ErrorOut, 'description': 'It changed meanwhile (`If-Match` names another revision).'},
    },
)
async def delete(
    request: Request,
    caller: ChatCaller,
    conversation_id: ConversationId,
    if_match: Annotated[
        str | None,
        Header(
            max_length=_HEADER_CHARS, description='Delete only if the revision is still this one (or one of a list).'
        ),
    ] = None,
) -> Response:
    """Delete the conversation and the messages no other conversation of the account shares."""
    lines = request.headers.getlist('if-match')
    if len(lines) > 1:  # several lines are one list (RFC 9110 5.3): only the first was read, the others lost (QA)
        # Empty lines add nothing to the list: all of them empty is the empty header refused below (it read ',').
        if_match = ', '.join(line for line in lines if line.strip())
        if len(if_match) > _HEADER_CHARS:
            raise InvalidInputError(
                f'If-Match is {len(if_match):,} characters long, its lines together; the limit is {_HEADER_CHARS:,}',
                field='If-Match',
            )
    conversation_id = check_conversation_id(conversation_id, account=caller.account_slug)
    store = PostgresConversationStore(caller.account_id)
    if if_match is not None and not if_match.strip():  # a condition meant and lost on the way: it deleted whatever
        raise InvalidInputError(
            'If-Match is empty: send a revision this API returned, or * to delete whatever revision is there',
            field='If-Match',
        )
    malformed = _malformed_tag(if_match)
    if malformed == '*':
        raise InvalidInputError(
            'If-Match: * (whatever revision is there) stands alone, not in a list of entity tags: send * by itself, '
            'or the revisions',
            field='If-Match',
        )
    if malformed is not None:  # a 409 ("changed meanwhile") sent a client to retry what could never match
        raise InvalidInputError(
            f'If-Match: {malformed!r} is not an entity tag: send a revision this API returned, in double quotes',
            field='If-Match',
        )
    named = [revision_of(tag) for tag in _revisions(if_match)]  # a GET's ETag names its revision
    # Without If-Match (or with `*`) whatever revision is there is deleted: a turn saved between the read and the
    # delete is read again, not a 409 the caller (who named no revision) could only answer by sending the same again.
    for attempt in range(1 if named else UNCONDITIONAL_DELETE_ATTEMPTS):
        record = await store.read_record(conversation_id)
        if record is None:
            raise ApiError(404, 'not_found', f'no conversation {conversation_id!r}')
        revision = record.revision if not named or record.revision in named else named[0]
        try:
            await store.delete_record(conversation_id, expected_revision=revision)
        except ConversationConflict as exc:
            if named or attempt == UNCONDITIONAL_DELETE_ATTEMPTS - 1:
                raise ApiError(409, 'conflict', 'the conversation changed meanwhile; read it again and retry') from exc
            continue
        except InvalidInputError as exc:  # the store's words named its own argument, expected_revision
            if exc.field != 'expected_revision':
                raise
            message = str(exc).replace('the expected_revision', 'the revision', 1)
            raise InvalidInputError(
                f'If-Match: {message}; send a revision this API returned', field='If-Match'
            ) from exc
        break
    return Response(status_code=204)


async def run_turn(
    request: Request,
    caller: ChatCaller,
    json_body: Annotated[None, Depends(require_utf8_json)],  # after the key: 401 before 415
    conversation_id: ConversationId,
    body: TurnRequest,
) -> TurnResponse | Response:
    """Run one turn of the conversation (created on first use) and return the answer: `simple_chat` over HTTP.

    A turn started while another runs on the same conversation answers 409 and runs nothing; one whose
    conversation was saved by another meanwhile stops before its next model request, answers 409, saves nothing.
    A model request the account's budget refuses answers 429 (`budget_exceeded`, with the budget's figures) and
    saves nothing. A client that disconnects stops its turn, as a streamed one does: nothing saved, the conversation
    free at once, the model request cut off recorded `cancelled`.
    """
    turn_input = check_http_turn(
        body.message,
        conversation_id=conversation_id,
        account=caller.account_slug,
        account_id=caller.account_id,
        agent=body.agent,
        id_field='conversation_id',
        message_field='message',
    )
    config = chat_config(request)
    turn = run_checked_turn(turn_input, model=config.model, agent=config.agent)
    try:
        result = await unless_disconnected(request, turn)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it: the connection is gone
    usage = result.usage
    return TurnResponse(
        output=result.output,
        conversation_id=result.session_id,
        run_id=result.run_id,
        model_name=result.model_name,
        usage=UsageOut(
            requests=usage.requests,
            tool_calls=usage.tool_calls,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            # Said apart, as `agentrt chat` says "tokens unknown": a provider that reported no usage read as 0 tokens.
            unmeasured_requests=getattr(usage, 'unmeasured_requests', 0),
        ),
        cost=result.cost,
        duration_s=result.duration_s,
        finish_reason=result.finish_reason,
    )


class _JsonTurnRoute(ChatKeyBeforeBody):
    """The JSON turn's route: the key checked before the body is read, and a large body parsed off the event loop."""

    async def after_key(self, request: Request) -> None:
        """Parse a large body in a worker thread (`parse_json_off_loop`), before FastAPI would on the loop."""
        await parse_json_off_loop(request)


router.add_api_route(
    '/{conversation_id:turn_owner_id}/turns',
    run_turn,
    methods=['POST'],
    route_class_override=_JsonTurnRoute,  # the key checked before the body is read
    summary='Run one turn, not streamed',
    response_model=TurnResponse,
    responses={
        **BUSY_CONVERSATION_RESPONSE,
        **BODY_RESPONSES,
        429: {'model': BudgetExceededOut, 'description': "The account's budget refused a model request; none sent."},
        502: {'model': ErrorOut, 'description': 'The model provider failed, or its answer could not be used.'},
    },
)


_HEADER_CHARS = 2000
"""The longest `If-Match` taken (a list of a few dozen tags)."""


def _malformed_tag(header: str | None) -> str | None:
    """The first tag of an `If-Match` list whose double quotes do not enclose it (`"abc`, `W/abc`, `a"b`), or a `*`
    in a list, or None.

    A tag without quotes is taken as the revision it spells (lenient, as before); one with a quote must be quoted.
    """
    tags = [tag.strip() for tag in (header or '').split(',')]
    if header is not None and header.strip() and not any(tags):
        return header.strip()  # a list of no tag at all (`,`): nothing it could match
    listed = [tag for tag in tags if tag]  # empty elements of a list are ignored (RFC 9110 5.6.1): `*,` is `*`
    for tag in tags:
        if tag == '*' and len(listed) > 1:
            return tag  # `*` stands alone (RFC 9110): in a list it was taken for a revision `*`, a 409 for ever (QA)
        quoted = tag.removeprefix('W/')
        if (tag.startswith('W/') or '"' in quoted) and not (
            len(quoted) >= 2 and quoted[0] == quoted[-1] == '"' and '"' not in quoted[1:-1]
        ):
            return tag
    return None


_TITLE_MARK = '.t'
"""Between the revision and the title's digest in an entity tag (a revision, pydantic-ai's UUID, holds no dot)."""


def entity_tag(revision: str, title: str | None) -> str:
    """The `ETag` of a conversation's messages (unquoted): its revision, and a digest of its title, which is in the body
    and changes without a new revision (`update(title=...)`, a title made in the background): with the revision alone,
    a renamed conversation was a 304 (QA)."""
    digest = hashlib.sha256((title or '').encode('utf-8', 'surrogatepass')).hexdigest()[:8]
    return f'{revision}{_TITLE_MARK}{digest}'


def revision_of(tag: str) -> str:
    """The revision an entity tag names: an `entity_tag`'s, or a bare revision (the body's `revision`) as it is."""
    head, mark, digest = tag.rpartition(_TITLE_MARK)
    return head if mark and len(digest) == 8 and all(c in '0123456789abcdef' for c in digest) else tag


def _none_match(if_none_match: str, tag: str) -> bool:
    """Whether an `If-None-Match` header names `tag` (RFC 9110: weak comparison, so `W/"..."` names it too; `*`
    names any current one)."""
    return if_none_match.strip() == '*' or tag in _revisions(if_none_match)


def _revisions(if_match: str | None) -> list[str]:
    """The revisions an `If-Match` header names: its entity tags (RFC 9110: a comma-separated list, any of which
    matches), each quoted or not, weak (`W/"..."`) or strong; none for no header or `*` (any current revision), which
    deletes whatever revision is there (an empty header is refused before)."""
    value = (if_match or '').strip()
    tags = [tag.strip() for tag in value.split(',')]  # a revision never holds a comma
    if value == '' or [tag for tag in tags if tag] == ['*']:  # `*`, alone among empty elements too (`*,`)
        return []
    # An empty tag (and a header of commas only) matches no revision.
    return [tag.removeprefix('W/').strip('"') or '""' for tag in tags if tag] or ['""']
