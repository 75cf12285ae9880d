"""The app's exception handlers (`install_error_handlers`): every error a request can raise answered through
`public_error` (`errors.py`, which says which status each error gets and what a client may read of it), FastAPI's and
Starlette's own (a body it could not read, a validation error, a method not allowed) in the same body.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic_ai.exceptions import AgentRunError, UserError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from agentrt.agents.errors import AgentRuntimeError
from agentrt.api.errors import ApiError, client_text, new_error_id, public_error
from agentrt.api.head_requests import methods_served
from agentrt.api.lone_surrogates import is_key_of, lone_surrogate_message
from agentrt.db.errors import validation_message
from agentrt.services.log_redaction import loggable

logger = logging.getLogger('agentrt.api')  # redacted by the filter `errors.py` installs

_FASTAPI_UNPARSED_BODY = 'There was an error parsing the body'
_UNPARSED_BODY = 'the body is not JSON this server can read: send UTF-8 text nested at most a few hundred levels deep'


def _unparsed_body(cause: BaseException | None) -> str:
    """What is wrong with a JSON body Python's parser could not read (FastAPI's 400 for the JSON turn)."""
    if isinstance(cause, UnicodeDecodeError):
        where = f'byte {cause.start} (0x{cause.object[cause.start]:02X})' if cause.start < len(cause.object) else 'it'
        return f'the body is not UTF-8 text: {where} is not UTF-8; send the JSON in UTF-8'
    if isinstance(cause, RecursionError):
        return 'the body nests deeper than this server reads JSON (a few hundred levels); send it less deeply nested'
    if isinstance(cause, ValueError) and 'integer string conversion' in str(cause):
        limit = sys.get_int_max_str_digits()
        return f'the body has a number of more than {limit:,} digits, longer than this server reads; send it as text'
    return _UNPARSED_BODY


def _where(request: Request) -> str:
    """The request's method and path as it asked, for the log line (to escape: `loggable`). The scope's path, not
    `request.url.path`, from which Starlette's URL parsing drops newlines, CRs and tabs: `/a%0AINFO:...` was logged
    as `/aINFO:...`, not the path requested."""
    return f'{request.method} {request.scope["path"]}'


def install_error_handlers(app: FastAPI) -> None:
    """Route every error a request can raise through `public_error`, so none answers with internal text."""

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        error = public_error(exc, where=_where(request))  # escaped there
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers())

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        # FastAPI's 400 for a body it could not read: none came (ClientDisconnect), or reading it was refused (the
        # body limit's 413, raised by its `receive` while the body was read without a Content-Length).
        if isinstance(exc.__cause__, ClientDisconnect | ApiError):
            return await on_error(request, exc.__cause__)
        error_id = new_error_id()
        where = loggable(_where(request))  # the client's characters: escaped
        logger.info('%s %s %d %s', error_id, where, exc.status_code, loggable(str(exc.detail)))
        body = {'detail': exc.detail, 'type': _http_type(exc.status_code), 'error_id': error_id}
        headers = exc.headers
        allowed = _allowed_methods(request) if exc.status_code == 405 else []
        if allowed:  # Starlette's names the methods of the first route of the path, not of them all
            headers = {**(headers or {}), 'Allow': ', '.join(allowed)}
        if exc.status_code == 400 and exc.detail == _FASTAPI_UNPARSED_BODY:
            # FastAPI's words for a JSON body that is not UTF-8 or nests deeper than Python's parser goes.
            body.update(detail=_unparsed_body(exc.__cause__), field='body')
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        error_id = new_error_id()
        # The input values are left out: they can be huge, or hold what the client should not see echoed.
        errors = [
            {
                # A location names the keys of the body as sent, so a secret pasted as a key is in it.
                'loc': [client_text(part) if isinstance(part, str) else part for part in error.get('loc', ())],
                'msg': client_text(_validation_message(error, exc.body)),
                'type': error.get('type'),
            }
            for error in exc.errors()[:20]
        ]
        # The errors go in as their repr, which escapes what is not printable already (a body key's ESC as `\x1b`).
        logger.info('%s %s 422 %s', error_id, loggable(_where(request)), errors)
        body: dict[str, Any] = {'detail': errors, 'type': 'invalid_request', 'error_id': error_id}
        if errors:
            # Where the first error is, as the runtime's own 422s name it (`messages.1.role`), so a client reads `field`
            # from every 422 alike (QA: FastAPI's had only its list of locations).
            loc = errors[0]['loc']
            if errors[0]['type'] == 'json_invalid':  # FastAPI's location is ('body', <character offset>)
                loc = loc[:1]
            body['field'] = '.'.join(str(part) for part in (loc[1:] if len(loc) > 1 else loc))
        return JSONResponse(body, status_code=422)

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    # Handlers of these classes (and their subclasses) answer and the request ends there. The one for `Exception`
    # runs in Starlette's outermost middleware, which answers with it and then re-raises, so the server logs it too.
    # ClientDisconnect: the chat routes read their body themselves, and a client that hung up while sending it was a 500
    # with two tracebacks in the log.
    for known in (ApiError, ClientDisconnect, AgentRuntimeError, AgentRunError, UserError, SQLAlchemyError, Exception):
        app.add_exception_handler(known, on_error)


def _allowed_methods(request: Request) -> list[str]:
    """The methods the routes of the request's path serve (the conversation's `GET` and `DELETE` are two routes);
    `HEAD` with `GET`, which every `GET` route answers (`HeadAsGet`)."""
    methods = methods_served(request.app.router.routes, request.scope)
    if 'GET' in methods:
        methods.add('HEAD')
    return sorted(methods, key=lambda method: (_METHOD_ORDER.index(method) if method in _METHOD_ORDER else 99, method))


_METHOD_ORDER = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS', 'TRACE', 'CONNECT']


def _validation_message(error: dict[str, Any], body: Any) -> str:
    """A validation error's message; for a lone surrogate escape, one that says so (pydantic's says only that it was
    "unable to parse raw data as a unicode string"); for a body that is not JSON, with the parser's reason."""
    text = error.get('input')
    reason = (error.get('ctx') or {}).get('error')
    if error.get('type') == 'json_invalid' and isinstance(reason, str):  # FastAPI's "JSON decode error" alone
        position = error.get('loc', ())[-1:]
        if reason.endswith(' at') and position and isinstance(position[0], int):
            # Python's reason leaves the place to its own message ("Invalid control character at: line 1 column 15
            # (char 14)"), which FastAPI drops: alone it read as cut off. The location holds it (`["body", 14]`).
            reason = f'{reason} position {position[0]}'
        return f'{error.get("msg", "JSON decode error")}: {reason}'
    context = error.get('ctx') or {}
    if error.get('type') in ('too_long', 'too_short') and isinstance(text, str):
        # A text parameter bounded beside a validator of its own (`FilterText | None`): pydantic checks the bound on
        # the union, and says "items", as of a list.
        bound = context.get('max_length') if error.get('type') == 'too_long' else context.get('min_length')
        most = 'at most' if error.get('type') == 'too_long' else 'at least'
        return f'should have {most} {bound} characters, not {len(text):,}'
    if error.get('type') == 'string_unicode' and isinstance(text, str):
        where, *location = error.get('loc', ()) or ('',)
        return lone_surrogate_message(text, in_key=where == 'body' and is_key_of(body, tuple(location), text))
    return validation_message(error, '')


def _http_type(status: int) -> str:
    return {
        401: 'unauthorized',
        403: 'forbidden',
        404: 'not_found',
        405: 'method_not_allowed',
        409: 'conflict',
        413: 'body_too_large',
        415: 'unsupported_media_type',
    }.get(status, 'http_error')
