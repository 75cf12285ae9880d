"""`POST /api/v1/chat/ag-ui`: the same streamed turn as `/api/v1/chat`, in the AG-UI protocol (CopilotKit, ...).

Registered only when `ag-ui-protocol` is installed (the `agui` extra). The body's `threadId` names the conversation
of the caller's account and its last message, the user's, is the turn; everything else (the turn of
`simple_chat_stream`, server-held history, safe error events) is as in `agentrt.api.chat`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ag_ui.core import BaseEvent, RunAgentInput
from fastapi import APIRouter, Request
from pydantic import ValidationError
from pydantic_ai.ui.ag_ui import AGUIAdapter, AGUIEventStream
from pydantic_core import PydanticCustomError
from starlette.responses import Response

from agentrt.agents.turn_input import validate_protocol_id
from agentrt.api.auth import ChatCaller
from agentrt.api.chat import AGENT_QUERY, CONVERSATION_ID_SCHEMA
from agentrt.api.errors import stream_error
from agentrt.api.schemas import BODY_RESPONSES, BUSY_CONVERSATION_RESPONSE, ERROR_RESPONSES
from agentrt.api.turn_input import check_http_turn, read_run_input
from agentrt.api.turn_stream import chat_config, stream_turn
from agentrt.db.errors import InvalidInputError
from agentrt.tools.dependencies import SessionDependencies

router = APIRouter(prefix='/api/v1', tags=['chat'])

AGUI_ROLES = ('activity', 'assistant', 'developer', 'reasoning', 'system', 'tool', 'user')
"""The roles of ag_ui.core's messages (`RunAgentInput.messages`), for OpenAPI."""


class SafeAGUIStream(AGUIEventStream[SessionDependencies, str]):
    """The AG-UI event stream with a `RUN_ERROR` that says what the client may know, and an error id."""

    async def on_error(self, error: Exception) -> AsyncIterator[BaseEvent]:
        """Replace the exception's text by a public message."""
        async for event in super().on_error(Exception(stream_error(error).stream_text())):
            yield event


@dataclass
class AGUIChatAdapter(AGUIAdapter[SessionDependencies, str]):
    """`AGUIAdapter` with `SafeAGUIStream`."""

    def build_event_stream(self) -> SafeAGUIStream:
        """The event stream, with the safe error event."""
        return SafeAGUIStream(
            self.run_input,
            accept=self.accept,
            ag_ui_version=self.ag_ui_version,
            include_usage=self.include_usage,
            manage_system_prompt=self.manage_system_prompt,
            preserve_file_data=self.preserve_file_data,
        )


def build_run_input(body: bytes) -> RunAgentInput:
    """`AGUIAdapter.build_run_input`, refusing what it would skip: a role, a content type or a media source the
    installed ag-ui-protocol does not know, which pydantic-ai's adapter skips with a `UserWarning` (a 500 under
    `-W error`; in a server, a warning on stderr and a turn run without what was skipped). The body is the user's
    message alone (`parse_run_input`), so what was skipped is part of the turn.

    Raises:
        ValidationError: the body does not validate, or holds such content (at `messages.0`).
    """
    try:
        return RunAgentInput.model_validate_json(body)  # what the adapter tries first: then nothing is skipped
    except ValidationError:
        pass
    # Only a body that failed to validate reaches the adapter's skipping, so only then are warnings caught (the filters
    # are the process's: not on every request).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        run_input = AGUIChatAdapter.build_run_input(body)
    for warning in caught:
        skipped = _SKIPPED_CONTENT.search(str(warning.message))
        if skipped is None:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            continue
        raise ValidationError.from_exception_data(
            'RunAgentInput',
            [
                {
                    'type': PydanticCustomError(
                        'agui_unsupported',
                        "AG-UI content this server cannot read ({skipped}); a turn is the user's message, as text",
                        {'skipped': skipped[1]},
                    ),
                    'loc': ('messages', 0),
                    'input': None,
                }
            ],
        )
    return run_input


_SKIPPED_CONTENT = re.compile(r'^AG-UI content .* does not support \((.*)\) was skipped')
"""pydantic-ai's warning for what `AGUIAdapter.build_run_input` skipped (`role='...'`, a content `type`)."""


@router.post(
    '/chat/ag-ui',
    summary='Stream a chat turn (AG-UI protocol)',
    response_class=Response,
    responses={
        200: {'description': 'AG-UI events.', 'content': {'text/event-stream': {}}},
        **BUSY_CONVERSATION_RESPONSE,
        **BODY_RESPONSES,
        **ERROR_RESPONSES,
    },
    openapi_extra={
        'requestBody': {
            'required': True,
            'content': {
                'application/json': {
                    'schema': {
                        'type': 'object',
                        'description': 'AG-UI `RunAgentInput`; `threadId` names the conversation.',
                        'required': ['threadId', 'runId', 'messages'],
                        # The types of what is required (ag_ui.core's model has the rest): a body with a null or a
                        # number there read as valid against this document, and was refused (422).
                        'properties': {
                            'threadId': {**CONVERSATION_ID_SCHEMA, 'description': 'The conversation id.'},
                            'runId': {**CONVERSATION_ID_SCHEMA, 'description': 'The run id, echoed by the stream.'},
                            # What each of ag_ui.core's message kinds requires, and the roles it tells them by.
                            'messages': {
                                'type': 'array',
                                'minItems': 1,  # the new message is the last: an empty list is refused (422)
                                'items': {
                                    'type': 'object',
                                    'required': ['id', 'role'],
                                    'properties': {'id': {'type': 'string'}, 'role': {'enum': list(AGUI_ROLES)}},
                                },
                            },
                        },
                    }
                }
            },
        }
    },
)
async def chat_ag_ui(request: Request, caller: ChatCaller, agent: str | None = AGENT_QUERY) -> Response:
    """One turn of the conversation named by the body's `threadId`, streamed as AG-UI events.

    The `threadId` follows the conversation id's rule (1-200 letters, digits and `. _ : @ -`), and so does the
    `runId`, which the stream echoes back.
    """
    run_input = await read_run_input(request, build_run_input)
    validate_protocol_id(run_input.run_id, field='runId', name='run id')  # echoed on RUN_STARTED and RUN_FINISHED
    turn_input = check_http_turn(
        _new_message_text(run_input),
        conversation_id=run_input.thread_id,
        account=caller.account_slug,
        account_id=caller.account_id,
        agent=agent,
        id_field='threadId',
        message_field='messages',
    )
    adapter = AGUIChatAdapter(
        agent=chat_config(request).agent, run_input=run_input, accept=request.headers.get('accept')
    )
    return await stream_turn(request, adapter, turn_input)


def _new_message_text(run_input: RunAgentInput) -> str:
    """The text of the last message, which must be the user's."""
    if not run_input.messages or run_input.messages[-1].role != 'user':
        raise InvalidInputError("the last message of the request must be the user's new message", field='messages')
    content = getattr(run_input.messages[-1], 'content', '')
    if isinstance(content, str):
        return content
    if any(getattr(item, 'type', None) != 'text' for item in content):
        raise InvalidInputError('only text content is served in a user message', field='messages')
    return ''.join(str(getattr(item, 'text', '')) for item in content)
