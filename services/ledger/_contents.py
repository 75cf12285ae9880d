"""Content bodies of a run's model requests: each message dumped once, and checked and redacted once, per run.

What is stored is the text itself, redacted string by string (`redact_value()` on the messages as JSON-able values),
then serialised: a secret at the start of a line, after a tab, inside JSON a tool returned or in an error body is
found wherever it sits, and every body is valid JSON that validates back into pydantic-ai messages.

A run's request N resends messages 1..N-1. `RunBodies` (one per run) keeps each message's body by identity, so a
run dumps, checks and redacts each message once however many requests resend it; a request's prompt body is the
join of its messages' bodies. Each message is dumped to JSON text (`dump_json`, pydantic-core) on the event loop when
the request is recorded, because pydantic-ai may change its message objects later; a message whose JSON is known
already (the history a chat turn loaded from the conversation store: `remember_message_json`) is not dumped at all.
The other way round, the conversation store saves a turn's new requests from the text the ledger dumped when it sent
them (`dumped_message_json`), while nothing pydantic-ai changes on a sent request has changed: one dump per request.
Then the text is checked for secrets (`json_may_need_redaction`: one RE2 scan, linear, the GIL released) and, only
when it may hold one, parsed and walked (`redact_value`, the costly part). A record whose unchecked text is small
(`quick_render`, at most `INLINE_PREPARE_BYTES` together) is checked on the loop when it is recorded (a fraction of a
millisecond; a thread hand-off costs more); a body the check finds a possible secret in, a bigger one, and an error
body are rendered in the tracker's worker threads (`Body.render()`), so neither a huge message nor a hostile one
holds up the loop.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from pydantic import TypeAdapter
from pydantic_ai.exceptions import ModelAPIError, ModelConnectionError, ModelHTTPError
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse
from pydantic_core import to_jsonable_python

from agentrt.services.ledger.redaction import json_may_need_redaction, redact_value

ContentKind = Literal['prompt', 'response', 'error']

_MESSAGE_ADAPTER: TypeAdapter[ModelMessage] = TypeAdapter(ModelMessage)


def _fallback(value: Any) -> str:
    """How a value pydantic cannot serialise (an arbitrary object a tool returned) is stored: its repr."""
    return repr(value)


def _dumps(value: Any) -> str:
    # Compact like pydantic's dump_json; non-ASCII kept as is (lone surrogates are escaped when the body is encoded).
    return json.dumps(value, ensure_ascii=False, separators=(',', ':'), default=_fallback)


class Body:
    """A stored body: JSON-able values, redacted and serialised once, when `render()` is first called.

    Thread-safe: concurrent `render()` calls compute it once and share the result.
    """

    __slots__ = ('_lock', '_rendered', '_value')

    def pending_size(self) -> int | None:
        """The characters `quick_render()` would check (0 once rendered); None when unknown (not a quick body)."""
        return 0 if self._rendered is not None else None

    def quick_render(self) -> bool:
        """Render now if that is quick (a text with no possible secret); False when it needs `render()` in a thread.

        Never waits: a body a thread is rendering is left to it.
        """
        return self._rendered is not None

    def __init__(self, value: Any) -> None:
        """Keep `value` (JSON-able, owned by this body from now on) to be rendered later."""
        self._value = value
        self._rendered: tuple[str, int] | None = None
        self._lock = threading.Lock()

    def render(self) -> tuple[str, int]:
        """The redacted JSON text and the number of secrets replaced."""
        rendered = self._rendered
        if rendered is None:
            with self._lock:
                rendered = self._rendered
                if rendered is None:
                    rendered = self._rendered = self._render()
                    self._value = None  # the redacted text is all that is needed from now on
        return rendered

    def _render(self) -> tuple[str, int]:
        text = _dumps(self._value)
        if not json_may_need_redaction(text):  # the common case: no walk over every string
            return text, 0
        redacted, count = redact_value(self._value)
        return _dumps(redacted), count


class JsonBody(Body):
    """A body whose JSON text is known (a message dumped with `dump_json`, or loaded from the conversation store as
    stored): rendered from the text, parsed only when it may hold a secret, checked for one once."""

    __slots__ = ('_suspect', '_text')

    def __init__(self, text: str) -> None:
        """Keep the JSON `text` of a JSON-able value."""
        super().__init__(None)
        self._text = text
        self._suspect = False
        """The check found a possible secret: `render()` walks the value without checking again."""

    def pending_size(self) -> int | None:
        """The length of the text until it is rendered."""
        return 0 if self._rendered is not None else len(self._text)

    def quick_render(self) -> bool:
        """Check the text for secrets now; rendered (as it is) when there is none."""
        if self._rendered is not None:
            return True
        if self._suspect or not self._lock.acquire(blocking=False):
            return False
        try:
            if self._rendered is None:
                if json_may_need_redaction(self._text):
                    self._suspect = True
                    return False
                self._rendered = (self._text, 0)
            return True
        finally:
            self._lock.release()

    def _render(self) -> tuple[str, int]:
        if not self._suspect and not json_may_need_redaction(self._text):
            return self._text, 0
        redacted, count = redact_value(json.loads(self._text))
        return _dumps(redacted), count


_RequestState = tuple[tuple[Any, ...], Any, str | None, str | None, str | None, str]
"""What pydantic-ai changes on a request it sent (`_request_state`): its parts, timestamp, run stamps, instructions and
state."""
_known_json: dict[int, tuple[weakref.ref[ModelMessage], int, str, _RequestState | None]] = {}
"""Known JSON texts by message identity (messages are unhashable dataclasses); an entry leaves with its message. The
last item is set when the text is exactly `dump_json` of the message as it was then (`dumped_message_json`)."""


def remember_message_json(messages: Iterable[ModelMessage], texts: Iterable[str]) -> None:
    """Note the JSON each of `messages` is known by (their stored text, `TypeAdapter(ModelMessage).dump_json` of
    them), so a run that sends them stores that text instead of dumping them again. Kept while a message lives, and
    used only while it keeps its number of parts; call it from the event loop."""
    for message, text in zip(messages, texts, strict=True):
        _remember(message, text, None)


def _remember(message: ModelMessage, text: str, state: _RequestState | None) -> None:
    key = id(message)
    gone = _forget(key)
    _known_json[key] = (weakref.ref(message, gone), len(message.parts), text, state)


def _forget(key: int) -> Callable[[Any], None]:
    def forget(_: Any) -> None:
        _known_json.pop(key, None)

    return forget


def _known(message: ModelMessage) -> str | None:
    """The stored text `remember_message_json` noted for a message (not a text the ledger dumped itself: a later run
    that sends the message again dumps it again, as before)."""
    entry = _known_json.get(id(message))
    if entry is None or entry[3] is not None or entry[0]() is not message or entry[1] != len(message.parts):
        return None
    return entry[2]


def _request_state(message: ModelMessage) -> _RequestState | None:
    """What a request's JSON depends on that pydantic-ai changes after sending it; None for a message whose text is
    not shared: a response (pydantic-ai stamps `run_id`, `conversation_id`, `model_id` and `workspace_ref` on it after
    the ledger recorded it) or a request with metadata (a dict pydantic-ai may update in place)."""
    if not isinstance(message, ModelRequest) or message.metadata is not None:
        return None
    return (
        tuple(message.parts),
        message.timestamp,
        message.run_id,
        message.conversation_id,
        message.instructions,
        message.state,
    )


def dumped_message_json(message: ModelMessage) -> str | None:
    """`TypeAdapter(ModelMessage).dump_json(message)` (decoded), if the ledger dumped this request when it was sent
    and nothing of it has changed since: the conversation store saves that text instead of dumping it again.

    None when it is not known: a response, a request with metadata, one pydantic-ai changed (parts replaced or
    added, run stamps, instructions, state), one dumped with a fallback for a value pydantic cannot serialise, or one
    the ledger did not dump (lone surrogates, no ledger). Call it from the event loop.
    """
    entry = _known_json.get(id(message))
    if entry is None or (state := entry[3]) is None or entry[0]() is not message:
        return None
    assert isinstance(message, ModelRequest)  # only requests have a state
    parts = message.parts
    unchanged = (
        message.metadata is None
        and len(parts) == len(state[0])
        and all(part is then for part, then in zip(parts, state[0], strict=True))
        and message.timestamp is state[1]
        and message.run_id == state[2]
        and message.conversation_id == state[3]
        and message.instructions == state[4]
        and message.state == state[5]
    )
    return entry[2] if unchanged else None


class PromptBody(Body):
    """A request's prompt: `{"instructions": ..., "messages": [...]}`, joined from bodies rendered once per run."""

    __slots__ = ('_instructions', '_messages')

    def __init__(self, instructions: Body, messages: list[Body]) -> None:
        """Join `instructions` and `messages` when rendered; they may be shared with other requests of the run."""
        super().__init__(None)
        self._instructions = instructions
        self._messages = messages

    def pending_size(self) -> int | None:
        """What its instructions and messages have left to check (None if one of them is not a quick body)."""
        if self._rendered is not None:
            return 0
        total = 0
        for part in (self._instructions, *self._messages):
            size = part.pending_size()
            if size is None:
                return None
            total += size
        return total

    def quick_render(self) -> bool:
        """Quick when each of its instructions and messages is: then joined here."""
        if self._rendered is not None:
            return True
        if not (self._instructions.quick_render() and all(message.quick_render() for message in self._messages)):
            return False
        self.render()  # a join of rendered texts
        return True

    def _render(self) -> tuple[str, int]:
        instructions, count = self._instructions.render()
        texts = []
        for message in self._messages:
            text, found = message.render()
            texts.append(text)
            count += found
        return ''.join(('{"instructions":', instructions, ',"messages":[', ','.join(texts), ']}')), count


class RunBodies:
    """The bodies of one run's requests, each message dumped, checked and redacted once for the whole run.

    Messages are recognised by identity (the object, kept alive here, and its number of parts); a message pydantic-ai
    replaced by a copy is simply dumped again. Not thread-safe: call it from the run's event loop.
    """

    __slots__ = ('_instructions', '_messages')

    def __init__(self) -> None:
        """Start with no message seen."""
        self._messages: dict[int, tuple[ModelMessage, int, Body]] = {}
        self._instructions: dict[str | None, Body] = {}

    def request_contents(
        self,
        instructions: str | None,
        messages: Sequence[ModelMessage],
        response: ModelResponse | None,
        error: BaseException | None,
    ) -> list[tuple[ContentKind, Body]]:
        """The bodies to store for one request: its prompt, and its response and error if it has them.

        Raises:
            Exception: a message that cannot be dumped even with the fallback (the caller records the row without).
        """
        contents: list[tuple[ContentKind, Body]] = [('prompt', self.prompt(instructions, messages))]
        if response is not None:
            contents.append(('response', self.message(response)))
        if error is not None:
            contents.append(('error', error_body(error)))
        return contents

    def prompt(self, instructions: str | None, messages: Sequence[ModelMessage]) -> PromptBody:
        """The prompt body of a request sending `messages` with `instructions`."""
        shared = self._instructions.get(instructions)
        if shared is None:
            shared = self._instructions[instructions] = JsonBody(_dumps(instructions))
        return PromptBody(shared, [self.message(message) for message in messages])

    def message(self, message: ModelMessage) -> Body:
        """The body of one message (a request, or a response, which the next request resends)."""
        seen = self._messages.get(id(message))
        if seen is not None and seen[0] is message and seen[1] == len(message.parts):
            return seen[2]
        known = _known(message)
        body = JsonBody(known) if known is not None else _dumped(message)
        self._messages[id(message)] = (message, len(message.parts), body)
        return body


def _dumped(message: ModelMessage) -> Body:
    """The body of a message whose JSON is not known: its JSON text from pydantic-core, or (a lone surrogate, which
    UTF-8 cannot encode) its JSON-able values, serialised when rendered.

    A request's text made without the fallback is what the conversation store would dump: it is remembered for it
    (`dumped_message_json`), with what it depends on that pydantic-ai may still change.
    """
    state = _request_state(message)
    fell_back = False

    def fallback(value: Any) -> str:
        nonlocal fell_back
        fell_back = True
        return repr(value)

    try:
        text = _MESSAGE_ADAPTER.dump_json(message, fallback=fallback).decode()
    except ValueError:  # PydanticSerializationError: `ContentItem.build` escapes lone surrogates
        return Body(_MESSAGE_ADAPTER.dump_python(message, mode='json', fallback=_fallback))
    if state is not None and not fell_back:
        _remember(message, text, state)
    return JsonBody(text)


def error_body(error: BaseException) -> Body:
    """The body of a failed request: the error's type and message and what the provider said (status, body, ...)."""
    described: dict[str, Any] = {'type': type(error).__qualname__, 'message': str(error)}
    if isinstance(error, ModelAPIError):
        described.update(
            model_name=error.model_name,
            body=error.body,
            provider_error_code=error.provider_error_code,
            provider_error_type=error.provider_error_type,
            in_stream=error.in_stream,
        )
    if isinstance(error, ModelHTTPError):
        described['status_code'] = error.status_code
    if isinstance(error, ModelConnectionError):
        described['phase'] = error.phase
    return Body(to_jsonable_python(described, fallback=_fallback))
