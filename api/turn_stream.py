"""A streamed chat turn over HTTP: the turn of `simple_chat_stream`, in a UI protocol's events.

The turn is the in-process one (`agentrt.agents.chat_turn`): input checked (`check_turn_input`), then `open_turn`
(tenant, model, the conversation claimed so one turn runs at a time, its recent history loaded, per-turn usage
limits, the bounded context and the race guard), the run, and `finish_turn` (saved, post-turn work scheduled) before
the client hears that the run finished. pydantic-ai's UI adapters (`VercelAIAdapter`, `AGUIAdapter`) only turn the
run's events into the protocol's; the conversation is the server's, so a client may send its whole history or just
its new message.

The turn is opened before the response starts, so a refusal (bad input, an unknown agent, a conversation another
turn holds, no database) is an HTTP status, not an event; `TurnStreamingResponse` closes it when the response ends,
however it ends. A client that disconnects cancels the run at once: the ledger records the request it cut off as
`cancelled`, nothing is saved, and the claim is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from asyncio import CancelledError
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import anyio
from opentelemetry.trace import Span
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import AgentStreamEvent
from pydantic_ai.models import Model
from pydantic_ai.run import AgentRunResultEvent
from pydantic_ai.ui import UIAdapter, UIEventStream
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from agentrt.agents.chat_turn import Turn, finish_turn, open_turn
from agentrt.agents.observability import start_turn_span, within_turn_span
from agentrt.agents.run_errors import documented_errors
from agentrt.agents.turn_input import TurnInput
from agentrt.api.cut_off import STOPPED
from agentrt.api.errors import ApiError
from agentrt.services.pg_text import storable_text
from agentrt.tools.dependencies import SessionDependencies

NativeEvent = AgentStreamEvent | AgentRunResultEvent[Any]


KEEPALIVE = b': keepalive\n\n'
"""An SSE comment: every SSE parser skips it (the AI SDK's, AG-UI's, a browser's `EventSource`)."""
DEFAULT_KEEPALIVE_SECONDS = 15.0
DEFAULT_SEND_TIMEOUT_SECONDS = 30.0

logger = logging.getLogger('agentrt.api')


@dataclass(frozen=True)
class ChatConfig:
    """What the app's chat routes run: the agent and the model (None: the agent's own, else `AGENTRT_MODEL`)."""

    agent: Agent[SessionDependencies, str]
    model: Model | str | None = None
    keepalive_seconds: Callable[[], float] = lambda: DEFAULT_KEEPALIVE_SECONDS
    """How long a streamed turn may send nothing before it sends `KEEPALIVE` (0: never); read for each turn
    (`AGENTRT_HTTP_STREAM_KEEPALIVE_SECONDS`)."""
    send_timeout_seconds: Callable[[], float] = lambda: DEFAULT_SEND_TIMEOUT_SECONDS
    """How long one piece of a streamed turn may wait to be sent before the client is taken for gone; read for each
    turn (`AGENTRT_STREAM_SEND_TIMEOUT_SECONDS`)."""


def chat_config(request: Request) -> ChatConfig:
    """The chat configuration `create_app` stored on the app."""
    config: ChatConfig = request.app.state.agentrt_chat
    return config


class TurnStreamingResponse(StreamingResponse):
    """A streaming response that closes the turn (its claim on the conversation) by the time the response is over.

    The run closes it first, when it ends (`_run`); this is for a response whose stream never started (the client
    left before the first byte), whose generator has no `finally` to run. Closing twice is harmless.

    A cancellation (the client gone, the server's shutdown) that lands while the response waits in `send` (a slow
    client, the keepalive's lock) rather than in the stream leaves the stream's generators suspended, the run going
    on in its own task with nobody to pull its events: `stream` (outermost first) is closed before the turn, so the
    run is cancelled, and its cut-off request handed to the ledger, before the claim is released (what a stopping
    server waits for before it closes the ledger and the pool).

    A stream the server's shutdown cancels (still running when `--shutdown-seconds` ran out) ends with `stopped`, the
    protocol's error and end events: the connection was cut mid-stream, which a client could only take for a network
    failure ("incomplete chunked read"), with no error id and nothing saying that it may send the turn again.

    While a slow tool or model request runs the run has no event to send: after `keepalive_seconds` of silence an SSE
    comment (`KEEPALIVE`) is sent, between two events (each chunk of the stream is whole events), so a client can
    tell a slow turn from a stalled connection and an idle-timeout proxy does not cut it. Only for an SSE stream.

    A client that keeps its connection open but reads nothing (the socket's buffers full) left every `send` waiting
    for ever, and the turn with it: its claim on the conversation, its place in the pool, its budget hold. A message
    (a piece of the stream, a keepalive) not sent within `send_timeout_seconds` ends the response as a hang-up does:
    the stream's work is cancelled, the run's cut-off request goes to the ledger as `cancelled`, nothing is saved and
    the claim is released. The server's connection itself is the server's to close (uvicorn closes it once the
    response is over, logging that it was not complete).
    """

    def __init__(
        self,
        content: AsyncIterator[str | bytes],
        turn: AsyncExitStack,
        *,
        headers: Mapping[str, str] | None,
        media_type: str,
        stopped: Callable[[], Awaitable[bytes]] | None = None,
        keepalive_seconds: float = 0,
        send_timeout_seconds: float = DEFAULT_SEND_TIMEOUT_SECONDS,
        stream: Sequence[AsyncGenerator[Any, None]] = (),
    ) -> None:
        super().__init__(content, headers=headers, media_type=media_type)
        self._turn = turn
        self._send_timeout = send_timeout_seconds
        self._stream = stream
        self._stopped = stopped
        self._keepalive = keepalive_seconds if media_type.startswith('text/event-stream') else 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the stream; then, or when the client has gone, close the turn."""
        started = False
        ended = False
        # The loop's clock, which `anyio.current_time()` reads too: that looks the async backend up on each call, and
        # a send reads the clock twice (about 1 us each, 178 events in a demo turn).
        clock = asyncio.get_running_loop().time
        last_sent = clock()
        # A keepalive never goes out in the middle of another message's send. asyncio's lock, not anyio's: taken
        # uncontended (every send but one racing a keepalive) it returns at once, where anyio's goes once round the
        # event loop in a shielded cancel scope (7 us against 0.5 a message).
        sending = asyncio.Lock()
        # Cancelled when a message could not be sent in time: what Starlette's own cancellation on a hang-up does.
        stall = anyio.CancelScope()

        sending_since: float | None = None  # when the send in progress began, its wait for the lock included

        async def watched_send(message: Message) -> None:
            nonlocal started, ended, last_sent, sending_since
            sending_since = clock()  # `watch_sends` ends the response if this send takes too long
            try:
                async with sending:
                    started = started or message['type'] == 'http.response.start'
                    await send(message)
                    last_sent = clock()
                    ended = ended or (message['type'] == 'http.response.body' and not message.get('more_body', False))
            except BaseException:
                # Stopped here (a hang-up, the stall, the shutdown), the stream's generators wait at a `yield`:
                # closed in this task, whose context they ran in (the turn span's context is reset there; closed
                # from another task, OpenTelemetry logged "Failed to detach context").
                await self._close_stream()
                raise
            finally:
                sending_since = None

        async def watch_sends() -> None:
            # One timer for the response, not a cancel scope around each send: that cost about 8 us a message, and the
            # demo turn's stream is 178 events. Wakes at the latest `send_timeout` after a stalled send began.
            while not ended:
                since, now = sending_since, clock()
                if since is not None and now - since >= self._send_timeout:
                    stall.cancel()  # the send in progress raises CancelledError: the hang-up's path
                    return
                await anyio.sleep(self._send_timeout - (now - since if since is not None else 0))

        async def keep_alive() -> None:
            nonlocal last_sent
            while not ended:
                await anyio.sleep(max(0.0, last_sent + self._keepalive - clock()))
                async with sending:
                    if ended or clock() - last_sent < self._keepalive:
                        continue
                    if started:
                        try:
                            with anyio.move_on_after(self._send_timeout) as timer:
                                await send({'type': 'http.response.body', 'body': KEEPALIVE, 'more_body': True})
                        except Exception:  # the client has gone: the stream's own send and disconnect watch say so
                            return
                        if timer.cancelled_caught:  # the run has nothing to send, so only this send can see it
                            stall.cancel()
                            return
                    last_sent = clock()

        # Tasks of their own, not a task group's: a group would wrap the stream's own errors in an ExceptionGroup.
        keeper = asyncio.create_task(keep_alive()) if self._keepalive > 0 else None
        watcher = asyncio.create_task(watch_sends())
        try:
            with stall:
                await super().__call__(scope, receive, watched_send)
            if stall.cancel_called:
                logger.warning(
                    'a streamed turn was ended as on a hang-up: its client read nothing for %g s '
                    '(AGENTRT_STREAM_SEND_TIMEOUT_SECONDS)',
                    self._send_timeout,
                )
        except CancelledError:
            if keeper is not None:
                keeper.cancel()  # the last message is the stopped events
            if started and self._stopped is not None:  # before the start, `CutOffAnswer` answers 503
                # Bounded too: a client that reads nothing would hold the server's shutdown here.
                with contextlib.suppress(Exception), anyio.move_on_after(self._send_timeout):
                    await send({'type': 'http.response.body', 'body': await self._stopped(), 'more_body': False})
            raise
        finally:
            watcher.cancel()
            if keeper is not None:
                keeper.cancel()
            await self._close_stream()
            await self._turn.aclose()

    async def _close_stream(self) -> None:
        """Close the stream's generators, outermost first, whatever cancels the caller (closing twice: harmless)."""
        with anyio.CancelScope(shield=True):
            for generator in self._stream:  # each ended already when the cancellation went through it
                with contextlib.suppress(RuntimeError):  # one still running: its own task ends it
                    await generator.aclose()


async def stream_turn(
    request: Request, adapter: UIAdapter[Any, Any, Any, SessionDependencies, str], turn_input: TurnInput
) -> TurnStreamingResponse:
    """Open the turn, then stream its run through `adapter`'s protocol.

    Raises:
        ConfigError, UnknownTenantError, ConcurrentTurnError, DatabaseUnavailableError: the turn could not be opened
            (nothing was sent to the model; the route answers with the error's status).
    """
    config = chat_config(request)
    # The turn's span, as `simple_chat_stream`'s: opened here, under the request's span, entered again by the run
    # (another task, once the response starts), ended when the turn is closed (the last of the stack's exits).
    span = start_turn_span(
        session_id=turn_input.session_id,
        account=turn_input.account,
        agent_instance=turn_input.agent_instance,
        streamed=True,
    )
    stack = AsyncExitStack()
    if span is not None:
        stack.callback(span.end)
    try:
        with within_turn_span(span):
            turn = await stack.enter_async_context(open_turn(config.agent, turn_input, config.model))
    except BaseException:
        await stack.aclose()
        raise
    protocol = adapter.build_event_stream()
    run = _run(turn, turn_input, stack, span)
    transformed = adapter.transform_stream(run)
    encoded = _encoded(protocol, transformed)
    return TurnStreamingResponse(
        encoded,
        stack,
        headers=protocol.response_headers,
        media_type=protocol.content_type,
        stopped=lambda: _stopped_events(adapter),
        keepalive_seconds=config.keepalive_seconds(),
        send_timeout_seconds=config.send_timeout_seconds(),
        stream=[part for part in (encoded, transformed, run) if isinstance(part, AsyncGenerator)],
    )


async def _stopped_events(adapter: UIAdapter[Any, Any, Any, SessionDependencies, str]) -> bytes:
    """The protocol's events ending a stream the shutdown stopped: its error event (503 `shutting_down`'s message and
    an error id), then its end (Vercel's `finish` and `[DONE]`; AG-UI's `RUN_ERROR` is its end)."""
    protocol = adapter.build_event_stream()
    encoded = [
        protocol.encode_event(event) async for event in protocol.on_error(ApiError(503, 'shutting_down', STOPPED))
    ]
    encoded += [protocol.encode_event(event) async for event in protocol.after_stream()]
    return b''.join(part.encode() if isinstance(part, str) else part for part in encoded)


async def _run(
    turn: Turn, turn_input: TurnInput, close: AsyncExitStack, span: Span | None
) -> AsyncIterator[NativeEvent]:
    """The run's events; the turn is saved before its result event goes on, as `simple_chat_stream` saves it.

    The turn is closed (its claim released) as soon as the run is over, before the protocol's last events are sent:
    a client that sends its next message the moment this stream ends must find the conversation free. The
    response closes it too, for a stream that never started.
    """
    try:
        with within_turn_span(span), documented_errors(turn.model.model_name):  # the model asked for, as in-process
            async with turn.agent.run_stream_events(
                turn_input.message,
                deps=turn.deps,
                conversation=turn.conversation,
                model=turn.model,
                usage_limits=turn.usage_limits,
                capabilities=turn.capabilities,
            ) as events:
                async for event in events:
                    if isinstance(event, AgentRunResultEvent):
                        await finish_turn(turn, event.result)
                    yield event
    finally:
        # Shielded: on a disconnect Starlette cancels this stream's task group, whose (anyio) cancellation would
        # interrupt every await of the clean-up and leave the claim to expire by itself.
        with anyio.CancelScope(shield=True), within_turn_span(span):
            await close.aclose()


async def _encoded(
    protocol: UIEventStream[Any, Any, SessionDependencies, str], events: AsyncIterator[Any]
) -> AsyncIterator[bytes]:
    """The protocol's events encoded (`protocol.encode_event`, what the adapter's `encode_stream` does) in UTF-8, with
    the text UTF-8 cannot encode replaced, as the store replaces it when it saves (`_encoded_event`)."""
    async for event in events:
        yield _encoded_event(protocol, event)


_ESCAPED = re.compile(r'\\u(?:0000|[dD][89a-fA-F])')
"""A NUL or a surrogate as JSON escapes it (`\\u0000`, `\\ud83d`); or text with a backslash before `u0000` (`\\\\u0000`
in JSON), which `_storable` leaves as it was."""


def _encoded_event(protocol: UIEventStream[Any, Any, SessionDependencies, str], event: Any) -> bytes:
    """One event of the stream, encoded, with `storable_text` applied to every string in it.

    A model's text or tool arguments can hold a lone surrogate (`"\\ud83d"` in a provider's JSON: half an emoji cut
    at a chunk boundary); encoding the event failed on it, which cut the stream off (the page said the connection was
    lost) and logged a traceback. NUL is replaced too, so the stream shows what a reload of the conversation shows.

    The event is encoded first, and walked (`_storable`) and encoded again only when its encoding failed or shows a
    NUL or a surrogate: walking every field of every event cost twice its encoding (about 2.7 us an event, 178 in a
    demo turn). The UTF-8 encoding is the one Starlette did on each piece.
    """
    try:
        encoded = protocol.encode_event(event)
        data = encoded.encode()
    except ValueError:  # a lone surrogate: pydantic's JSON, or UTF-8, cannot encode it
        return protocol.encode_event(_storable(event)).encode()
    if '\x00' in encoded or ('\\u' in encoded and _ESCAPED.search(encoded) is not None):
        return protocol.encode_event(_storable(event)).encode()
    return data


def _storable(value: Any) -> Any:
    """`value` with `storable_text` applied to every string in it (pydantic models, dicts, lists); `value` itself,
    not a copy, when nothing needed replacing (the usual case: one regex search per string)."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, BaseModel):
        changed = {}
        for name in type(value).model_fields:
            field = getattr(value, name)
            replaced = _storable(field)
            if replaced is not field:
                changed[name] = replaced
        return value.model_copy(update=changed) if changed else value
    if isinstance(value, dict):
        pairs = [(key, item, _storable(key), _storable(item)) for key, item in value.items()]
        if all(new_key is key and new_item is item for key, item, new_key, new_item in pairs):
            return value
        return {new_key: new_item for _, _, new_key, new_item in pairs}
    if isinstance(value, list | tuple):
        items = [_storable(item) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return type(value)(items)
    return value
