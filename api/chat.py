"""`POST /api/v1/chat`: a streamed chat turn in the Vercel AI data-stream protocol (what the AI SDK's `useChat` speaks).

pydantic-ai's `VercelAIAdapter` does the protocol. This module adds what the product needs around it: the caller's
account from its API key, the turn set up as `simple_chat` sets it up (`set_up_turn`: tenant, model, limits, the
account's `PostgresConversationStore`), history held on the server (the body's `id` names a conversation of the
caller's account; the client may send only its new message), post-turn work once the turn is saved, and an error
event that carries a message and an error id, never the exception's own text.

A client that disconnects cancels the run at once: the ledger records the cut-off request as `cancelled`, and the
turn is not saved. No database session is held while the model runs or the response streams.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

from fastapi import APIRouter, Query, Request
from pydantic_ai import Agent
from pydantic_ai.models import Model
from pydantic_ai.run import AgentRunResult
from pydantic_ai.ui.vercel_ai import VercelAIAdapter, VercelAIEventStream
from pydantic_ai.ui.vercel_ai.request_types import RequestData, TextUIPart
from pydantic_ai.ui.vercel_ai.response_types import BaseChunk
from starlette.responses import Response

from agentrt.agents.chat_turn import TurnSetup, schedule_after_turn, set_up_turn
from agentrt.api.auth import ChatCaller
from agentrt.api.errors import stream_error
from agentrt.api.schemas import ERROR_RESPONSES
from agentrt.api.turn_input import check_conversation_id, check_new_message, parse_run_input
from agentrt.db.errors import InvalidInputError
from agentrt.tools.dependencies import SessionDependencies

router = APIRouter(prefix='/api/v1', tags=['chat'])

_TRIGGERS = frozenset({'submit-message', 'regenerate-message'})

AGENT_QUERY = Query(None, min_length=1, max_length=64, description="One of the account's agents; its first if omitted.")


@dataclass(frozen=True)
class ChatConfig:
    """What the app's chat routes run: the agent and the model (None: `AGENTRT_MODEL`)."""

    agent: Agent[SessionDependencies, str]
    model: Model | str | None = None


def chat_config(request: Request) -> ChatConfig:
    """The chat configuration `create_app` stored on the app."""
    config: ChatConfig = request.app.state.agentrt_chat
    return config


class SafeVercelStream(VercelAIEventStream[SessionDependencies, str]):
    """The Vercel event stream with an error event that says what the client may know, and an error id."""

    async def on_error(self, error: Exception) -> AsyncIterator[BaseChunk]:
        """Replace the exception's text (which could quote SQL, hosts or a provider's body) by a public message."""
        async for chunk in super().on_error(Exception(stream_error(error).stream_text())):
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


# The body is read by the adapter, not by FastAPI: described here for OpenAPI only.
_CHAT_BODY = {
    'required': True,
    'content': {
        'application/json': {
            'schema': {
                'type': 'object',
                'required': ['id', 'messages'],
                'properties': {
                    'trigger': {'enum': ['submit-message', 'regenerate-message'], 'default': 'submit-message'},
                    'id': {'type': 'string', 'maxLength': 200, 'description': 'The conversation (the chat id).'},
                    'messages': {
                        'type': 'array',
                        'description': "AI SDK UI messages `{id, role, parts}`; the last user message is the turn's.",
                        'items': {'type': 'object'},
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

    Body: the AI SDK's `{trigger, id, messages}` (`Content-Type: application/json`). History is held on the server
    in the caller's account: the client may send its whole history or only the new message. The conversation is
    created on first use.
    """
    run_input = parse_run_input(request, await request.body(), ChatAdapter.build_run_input, tags=_TRIGGERS)
    conversation_id = check_conversation_id(run_input.id)
    check_new_message(_new_message_text(run_input), field='messages')
    setup = await _set_up(request, conversation_id, caller.account_slug, agent)
    return await ChatAdapter.dispatch_request(
        request,
        agent=setup.agent,
        sdk_version=cast(Literal[5, 6, 7], sdk_version),
        model=setup.model,
        deps=setup.deps,
        usage_limits=setup.usage_limits,
        conversation_store=setup.store,
        on_complete=after_saved(setup.deps),
    )


def _new_message_text(run_input: RequestData) -> str:
    """The text of the message this turn answers: the last user message of the body."""
    users = [message for message in run_input.messages if message.role == 'user']
    if not users:
        raise InvalidInputError('the request has no user message', field='messages')
    return ''.join(part.text for part in users[-1].parts if isinstance(part, TextUIPart))


async def _set_up(request: Request, conversation_id: str, account: str, agent: str | None) -> TurnSetup:
    config = chat_config(request)
    return await set_up_turn(config.agent, conversation_id, account, agent, config.model)


def after_saved(deps: SessionDependencies) -> Callable[[AgentRunResult[Any]], Awaitable[None]]:
    """The adapters' `on_complete`: called after the turn is saved; schedules post-turn work on this event loop."""

    async def on_complete(result: AgentRunResult[Any]) -> None:
        schedule_after_turn(deps, result.run_id)

    return on_complete
