"""`POST /api/v1/chat`: a streamed chat turn in the Vercel AI data-stream protocol (what the AI SDK's `useChat` speaks).

The turn is `simple_chat_stream`'s (`agentrt.api.turn_stream`): the caller's account from its API key, the input
checked, the conversation claimed and its history held on the server (the body's `id` names a conversation of the
caller's account; the client may send its whole history or only the new message), per-turn limits, the bounded
context, saved before the stream says it finished, post-turn work after. pydantic-ai's `VercelAIAdapter` turns the
run's events into the protocol's, with an error event that carries a message and an error id, never the
exception's own text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, cast

from fastapi import APIRouter, Query, Request
from pydantic_ai.ui.vercel_ai import VercelAIAdapter, VercelAIEventStream
from pydantic_ai.ui.vercel_ai.request_types import RequestData, TextUIPart
from pydantic_ai.ui.vercel_ai.response_types import BaseChunk, FinishStepChunk
from starlette.responses import Response

from agentrt.agents.turn_input import SESSION_ID, SESSION_ID_MAX_CHARS
from agentrt.api.auth import ChatCaller
from agentrt.api.errors import stream_error
from agentrt.api.message_schemas import UI_MESSAGE, schema_ref
from agentrt.api.schemas import BODY_RESPONSES, BUSY_CONVERSATION_RESPONSE, ERROR_RESPONSES
from agentrt.api.turn_input import check_http_turn, read_run_input
from agentrt.api.turn_stream import chat_config, stream_turn
from agentrt.db.errors import InvalidInputError
from agentrt.tools.dependencies import SessionDependencies

router = APIRouter(prefix='/api/v1', tags=['chat'])

_TRIGGERS = frozenset({'submit-message', 'regenerate-message'})

AGENT_QUERY = Query(None, min_length=1, max_length=64, description="One of the account's agents; its first if omitted.")


class SafeVercelStream(VercelAIEventStream[SessionDependencies, str]):
    """The Vercel event stream with an error event that says what the client may know, and an error id; and no
    `finish-step` closing a step that never started."""

    _stepped = False
    """Whether a model response started a step (`start-step`)."""

    async def on_error(self, error: Exception) -> AsyncIterator[BaseChunk]:
        """Replace the exception's text (which could quote SQL, hosts or a provider's body) by a public message."""
        async for chunk in super().on_error(Exception(stream_error(error).stream_text())):
            yield chunk

    async def before_response(self) -> AsyncIterator[BaseChunk]:
        """pydantic-ai's step chunks, noting that a step started."""
        self._stepped = True
        async for chunk in super().before_response():
            yield chunk

    async def after_stream(self) -> AsyncIterator[BaseChunk]:
        """pydantic-ai's end of stream, without its `finish-step` when no step started: a turn refused (its budget)
        or failed before its first model response streamed `start`, `error`, `finish-step`, a step closed unopened."""
        async for chunk in super().after_stream():
            if self._stepped or not isinstance(chunk, FinishStepChunk):
                yield chunk


@dataclass
class ChatAdapter(VercelAIAdapter[SessionDependencies, str]):
    """`VercelAIAdapter` with `SafeVercelStream`."""

    def build_event_stream(self) -> SafeVercelStream:
        """The event stream, with the safe error event."""
        return SafeVercelStream(
            self.run_input,
            accept=self.accept,
            sdk_version=self.sdk_version,
            server_message_id=self.server_message_id,
            manage_system_prompt=self.manage_system_prompt,
        )


CONVERSATION_ID_SCHEMA = {'type': 'string', 'maxLength': SESSION_ID_MAX_CHARS, 'pattern': f'^{SESSION_ID.pattern}$'}
"""A conversation id in a chat body, for OpenAPI: the rule a turn's input is checked by (`agents/turn_input.py`)."""

# The body is read by the adapter, not by FastAPI: described here for OpenAPI only.
_CHAT_BODY = {
    'required': True,
    'content': {
        'application/json': {
            'schema': {
                'type': 'object',
                'required': ['id', 'messages'],
                'properties': {
                    'trigger': {'enum': ['submit-message'], 'default': 'submit-message'},
                    'id': {**CONVERSATION_ID_SCHEMA, 'description': 'The conversation (the chat id).'},
                    'messages': {
                        'type': 'array',
                        'description': "AI SDK UI messages `{id, role, parts}`; the last, the user's, is the turn.",
                        'minItems': 1,
                        # pydantic-ai's `UIMessage`, its parts' kinds included (`document_messages`).
                        'items': schema_ref(UI_MESSAGE),
                    },
                },
            }
        }
    },
}


@router.post(
    '/chat',
    summary='Stream a chat turn (Vercel AI data-stream protocol)',
    response_class=Response,
    openapi_extra={'requestBody': _CHAT_BODY},
    responses={
        200: {
            'description': 'Server-sent events, `x-vercel-ai-ui-message-stream: v1`.',
            'content': {'text/event-stream': {}},
        },
        **BUSY_CONVERSATION_RESPONSE,
        **BODY_RESPONSES,
        **ERROR_RESPONSES,
    },
)
async def chat(
    request: Request,
    caller: ChatCaller,
    agent: str | None = AGENT_QUERY,
    sdk_version: int = Query(5, ge=5, le=7, description='The AI SDK major version of the client: 5, 6 or 7.'),
) -> Response:
    """One turn of the conversation named by the body's `id` (the AI SDK's chat id), streamed as it runs.

    Body: the AI SDK's `{trigger, id, messages}` (`Content-Type: application/json`); the last user message is the
    turn's. The conversation is created on first use. Only `submit-message` is served: the conversation's history
    is the server's, so regenerating or editing an earlier message is not (send a new message instead).
    """
    run_input = await read_run_input(
        request,
        ChatAdapter.build_run_input,
        tags=_TRIGGERS,
        tag_field='trigger',
        tag_default='submit-message',
    )
    if run_input.trigger != 'submit-message':
        raise InvalidInputError(
            f"{run_input.trigger} is not served: the history is the server's; send the message again", field='trigger'
        )
    turn_input = check_http_turn(
        _new_message_text(run_input),
        conversation_id=run_input.id,
        account=caller.account_slug,
        account_id=caller.account_id,
        agent=agent,
        id_field='id',
        message_field='messages',
    )
    adapter = ChatAdapter(
        agent=chat_config(request).agent,
        run_input=run_input,
        accept=request.headers.get('accept'),
        sdk_version=cast(Literal[5, 6, 7], sdk_version),
    )
    return await stream_turn(request, adapter, turn_input)


def _new_message_text(run_input: RequestData) -> str:
    """The text of the message this turn answers: the last message of the body, which must be the user's."""
    if not run_input.messages or run_input.messages[-1].role != 'user':
        raise InvalidInputError("the last message of the request must be the user's new message", field='messages')
    parts = run_input.messages[-1].parts
    if any(not isinstance(part, TextUIPart) for part in parts):
        raise InvalidInputError('only text parts are served in a user message', field='messages')
    return ''.join(part.text for part in parts if isinstance(part, TextUIPart))
