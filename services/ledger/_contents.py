"""Content bodies of a run's model requests: each message dumped once, and checked and redacted once, per run.

What is stored is the text itself, redacted string by string (`redact_value()` on the messages as JSON-able values),
then serialised: a secret at the start of a line, after a tab, inside JSON a tool returned or in an error body is
found wherever it sits, and every body is valid JSON that validates back into pydantic-ai messages.

A run's request N resends messages 1..N-1. `RunBodies` (one per run) keeps each message's body by identity, so a
run dumps, checks and redacts each message once however many requests resend it; a request's prompt body is the
join of its messages' bodies. Each message is dumped to JSON text (`dump_json`, pydantic-core) on the event loop when
the request is recorded, because pydantic-ai may change its message objects later; a message whose JSON is known
already (the history a chat turn loaded from the conversation store: `remember_message_json`) is not dumped at all.
A request's response is the exception: pydantic-ai stamps it (`run_id`, `conversation_id`, `model_id`,
`workspace_ref`) after the ledger's hooks return, so it is kept as a `ResponseBody` and dumped when sealed, at the run's
next model request or its end (or by the tracker when the row is due first): stored with its stamps.
The other way round, the conversation store saves a turn's new messages from the text the ledger dumped (requests when
they were sent, responses when sealed: `dumped_message_json`), while nothing pydantic-ai changes on a message has
changed since: one dump per new message.
Then the text is checked for secrets (`json_may_need_redaction`: one RE2 scan, linear, the GIL released) and, only
when it may hold one, parsed and walked (`redact_value`, the costly part). A stored text later runs resend (the
history a chat turn loaded, the instructions) that the check found clean is remembered as clean (`_clean_texts`), so
a conversation's history is scanned once a process, not once a turn. A record whose unchecked text is small
(`quick_render`, at most `INLINE_PREPARE_BYTES` together) is checked on the loop when it is recorded (a fraction of a
millisecond; a thread hand-off costs more); a body the check finds a possible secret in, a bigger one, and an error
body are rendered in the tracker's worker threads (`Body.render()`), so neither a huge message nor a hostile one
holds up the loop.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any, Literal

from pydantic_ai.exceptions import ModelAPIError, ModelConnectionError, ModelHTTPError
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_core import to_jsonable_python

from agentrt.services.ledger._clean_texts import may_need_redaction
from agentrt.services.ledger._known_json import dumped_message_json, known_json, message_state, remember
from agentrt.services.ledger.redaction import json_may_need_redaction, redact_value
from agentrt.services.message_json import message_adapter

ContentKind = Literal['prompt', 'response', 'error']


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

    @property
    def sealed(self) -> bool:
        """Whether its content is final; False for a response taken before pydantic-ai stamped it (`ResponseBody`)."""
        return True

    @property
    def stamped(self) -> bool:
        """Whether sealing it now would take its final content (a `ResponseBody`: pydantic-ai has stamped it)."""
        return True

    def seal(self) -> None:
        """Make its content final (on the event loop); nothing to do but for a `ResponseBody`."""

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

    __slots__ = ('_recurring', '_suspect', '_text')

    def __init__(self, text: str, *, recurring: bool = False) -> None:
        """Keep the JSON `text` of a JSON-able value; `recurring` when later runs are likely to send the same text
        (a conversation's stored history, the agent's instructions): a clean one is then remembered as clean
        (`_clean_texts`), so those runs do not scan it again."""
        super().__init__(None)
        self._text = text
        self._recurring = recurring
        self._suspect = False
        """The check found a possible secret: `render()` walks the value without checking again."""

    @property
    def text(self) -> str:
        """The JSON text, as given (not redacted)."""
        return self._text

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
                if may_need_redaction(self._text, recurring=self._recurring):
                    self._suspect = True
                    return False
                self._rendered = (self._text, 0)
            return True
        finally:
            self._lock.release()

    def _render(self) -> tuple[str, int]:
        if not self._suspect and not may_need_redaction(self._text, recurring=self._recurring):
            return self._text, 0
        redacted, count = redact_value(json.loads(self._text))
        return _dumps(redacted), count


class PromptBody(Body):
    """A request's prompt: `{"instructions": ..., "messages": [...]}`, joined from bodies rendered once per run."""

    __slots__ = ('_instructions', '_messages')

    def __init__(self, instructions: Body, messages: list[Body]) -> None:
        """Join `instructions` and `messages` when rendered; they may be shared with other requests of the run."""
        super().__init__(None)
        self._instructions = instructions
        self._messages = messages

    @property
    def sealed(self) -> bool:
        """Whether each of its messages is final."""
        return all(message.sealed for message in self._messages)

    @property
    def stamped(self) -> bool:
        """Whether each of its messages is stamped."""
        return all(message.stamped for message in self._messages)

    def seal(self) -> None:
        """Seal the messages that are not final yet."""
        for message in self._messages:
            message.seal()

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


class ResponseBody(Body):
    """A request's response, taken when the request is recorded and dumped when sealed: once pydantic-ai has stamped
    it (`run_id`, `conversation_id`, `model_id`, `workspace_ref`, in `_append_response`, after the ledger's hooks
    returned), so the stored response has its stamps and the conversation store saves that same text
    (`dumped_message_json`): one dump per response.

    Sealed on the event loop: by the ledger at the run's next model request or at the run's end (`RunBodies.seal`), or
    by the tracker when the row is due first (its commit delay passed, a flush), as the response is then: a row is
    never held back for the stamps (with no commit delay, a streamed response is sealed before pydantic-ai stamps it,
    the stream being closed in between). The tracker prepares a record only once its bodies are sealed; one rendered
    unsealed (spooled from a closed event loop) is sealed as it is then.
    """

    __slots__ = ('_body', '_error', '_message')

    def __init__(self, message: ModelResponse) -> None:
        """Keep `message` (not copied: pydantic-ai stamps this very object) until `seal()`."""
        super().__init__(None)
        self._message: ModelResponse | None = message
        self._body: Body | None = None
        self._error: Exception | None = None

    @property
    def sealed(self) -> bool:
        """Whether the response was dumped."""
        return self._message is None

    @property
    def stamped(self) -> bool:
        """Whether pydantic-ai has stamped the response: its `run_id` is set, in the same step as its other stamps
        (`_append_response`), so it can be sealed before the run gets to it (the tracker then writes it sooner)."""
        message = self._message
        return message is None or message.run_id is not None

    def seal(self) -> None:
        """Dump the response as it is now; later calls do nothing. Never raises: a response that cannot be dumped
        even with the fallback makes rendering fail (the tracker then stores the row without its contents)."""
        if self._message is None:
            return
        with self._lock:
            self._seal()

    def _seal(self) -> None:
        message, self._message = self._message, None
        if message is not None:
            try:
                self._body = _dumped(message)
            except Exception as exc:
                self._error = exc

    @property
    def dumped(self) -> Body | None:
        """Its dump once sealed; None before (and when it could not be dumped)."""
        return self._body

    def pending_size(self) -> int | None:
        """Its dump's, once sealed; None before (and when it could not be dumped)."""
        if self._rendered is not None:
            return 0
        return None if self._body is None else self._body.pending_size()

    def quick_render(self) -> bool:
        """Quick when sealed and its dump is."""
        if self._rendered is not None:
            return True
        if self._body is None or not self._body.quick_render():
            return False
        self.render()
        return True

    def _render(self) -> tuple[str, int]:
        self._seal()  # under the lock: a no-op unless its event loop went away before sealing it
        if self._body is None:
            raise self._error or RuntimeError('response body not dumped')
        return self._body.render()


class RunBodies:
    """The bodies of one run's requests, each message dumped, checked and redacted once for the whole run.

    Messages are recognised by identity (the object, kept alive here, and its number of parts); a message pydantic-ai
    replaced by a copy is simply dumped again. Not thread-safe: call it from the run's event loop.
    """

    __slots__ = ('_instructions', '_measured', '_messages', '_open')

    def __init__(self) -> None:
        """Start with no message seen."""
        self._messages: dict[int, tuple[ModelMessage, int, Body]] = {}
        self._measured: dict[int, ModelMessage] = {}
        """Messages `message_json` dumped (kept alive here, so their ids stay theirs)."""
        self._instructions: dict[str | None, Body] = {}
        self._open: list[ResponseBody] = []

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
            contents.append(('response', self.response(response)))
        if error is not None:
            contents.append(('error', error_body(error)))
        return contents

    def prompt(self, instructions: str | None, messages: Sequence[ModelMessage]) -> PromptBody:
        """The prompt body of a request sending `messages` with `instructions`."""
        shared = self._instructions.get(instructions)
        if shared is None:
            shared = self._instructions[instructions] = JsonBody(_dumps(instructions), recurring=True)
        return PromptBody(shared, [self.message(message) for message in messages])

    def message(self, message: ModelMessage) -> Body:
        """The body of one message a request sends (a request, or a response the run already had), dumped now."""
        seen = self._messages.get(id(message))
        if seen is not None and seen[0] is message and seen[1] == len(message.parts):
            return seen[2]
        known = self._known_text(message)
        body = JsonBody(known, recurring=True) if known is not None else _dumped(message)
        self._messages[id(message)] = (message, len(message.parts), body)
        return body

    def message_json(self, message: ModelMessage) -> str | None:
        """The `dump_json` text of a message a request is about to send, for the budget's bound on its input
        (`RequestSizes`): its body's when it has one, its stored text, or dumped now. A dump made here is taken for
        the message's body (`message()`) if nothing pydantic-ai changes on a sent message has changed by then, so each
        message is serialised once for both. Only this run's dumps are used: a message resent by a later run may
        have been changed in place by the caller. None when it has no such text (a lone surrogate).
        """
        seen = self._messages.get(id(message))
        if seen is not None and seen[0] is message and seen[1] == len(message.parts):
            body = seen[2].dumped if isinstance(seen[2], ResponseBody) else seen[2]
            return body.text if isinstance(body, JsonBody) else None
        known = self._known_text(message)
        if known is not None:
            return known
        body = _dumped(message)
        self._measured[id(message)] = message
        return body.text if isinstance(body, JsonBody) else None

    def _known_text(self, message: ModelMessage) -> str | None:
        """Its stored text, or the dump `message_json` made of it in this run if nothing of it has changed since."""
        known = known_json(message)
        if known is None and self._measured.get(id(message)) is message:
            known = dumped_message_json(message)
        return known

    def response(self, response: ModelResponse) -> Body:
        """The body of a request's response: dumped when sealed (`seal()`), so with the stamps pydantic-ai adds after
        the request is recorded; the next request, which resends it, shares it."""
        seen = self._messages.get(id(response))
        if seen is not None and seen[0] is response and seen[1] == len(response.parts):
            return seen[2]
        known = known_json(response)
        body: Body
        if known is not None:
            body = JsonBody(known, recurring=True)
        else:
            body = ResponseBody(response)
            self._open.append(body)
        self._messages[id(response)] = (response, len(response.parts), body)
        return body

    def seal(self) -> None:
        """Dump the responses taken since the last call, as they are now: call it once pydantic-ai has stamped them
        (at the run's next model request, and at its end), from the event loop. Never raises."""
        if self._open:
            opened, self._open = self._open, []
            for body in opened:
                body.seal()


def _dumped(message: ModelMessage) -> Body:
    """The body of a message whose JSON is not known: its JSON text from pydantic-core, or (a lone surrogate, which
    UTF-8 cannot encode) its JSON-able values, serialised when rendered.

    A text made without the fallback is what the conversation store would dump: it is remembered for it
    (`dumped_message_json`), with what it depends on that pydantic-ai may still change.
    """
    state = message_state(message)
    fell_back = False

    def fallback(value: Any) -> str:
        nonlocal fell_back
        fell_back = True
        return repr(value)

    try:
        text = message_adapter.dump_json(message, fallback=fallback).decode()
    except ValueError:  # PydanticSerializationError: `ContentItem.build` escapes lone surrogates
        try:
            return Body(message_adapter.dump_python(message, mode='json', fallback=_fallback))
        except ValueError as exc:
            # Nested past the 255 levels pydantic serialises (a tool's result the turn refuses to send): the request's
            # row was recorded without any contents, after a traceback of five chained errors (QA). A note instead.
            return Body({'kind': getattr(message, 'kind', None), 'not_stored': f'not serialisable: {exc}'})
    if state is not None and not fell_back:
        remember(message, text, state)
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
