"""The one place where what a pydantic-ai run raises becomes one of the runtime's documented errors.

`simple_chat`, `simple_chat_stream` (and through them the CLI and the HTTP API) run the agent inside
`documented_errors()`, so nothing undocumented escapes from a run: README.md lists what does. Errors the runtime
raises itself (`AgentRuntimeError` subclasses, e.g. `ConcurrentTurnError` from the turn guard) pass through. The
ledger has already recorded a failed request (with pydantic-ai's own exception type, status code and body) by the
time the translation happens.

Every text of the provider's or the model's that a translated error carries (its message, the first line of a
connection error's, the body) goes through the ledger's `redact_text` first, so a display that shows the error (the
CLI's `error:` line, an HTTP error body or stream event, a log line) never shows a secret the provider echoed.
Importing this module also puts the log redaction on the runtime's loggers (`agentrt.services.log_redaction`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelAuthenticationError,
    ModelConnectionError,
    ModelHTTPError,
    ModelNotFoundError,
    ModelQuotaExceededError,
    ModelRateLimitError,
    ModelRequestTimeout,
    ModelTimeoutError,
    UnexpectedModelBehavior,
    UsageLimitExceeded,
    UserError,
)
from pydantic_core import PydanticSerializationError

from agentrt.agents.turn_limits import LIMIT_SETTINGS
from agentrt.db.errors import (
    AgentRuntimeError,
    ConfigError,
    InvalidInputError,
    ModelBehaviorError,
    ModelProviderError,
    TurnLimitExceededError,
)
from agentrt.db.failures import raised_inside
from agentrt.services.ledger.redaction import redact_cut, redact_text
from agentrt.services.log_redaction import install_log_redaction

try:  # pydantic-ai 2.78: a provider's empty or malformed answer has classes of its own
    from pydantic_ai.exceptions import (  # type: ignore[attr-defined,unused-ignore]  # 2.68 has neither
        ModelEmptyResponseError,
        ModelInvalidResponseError,
    )

    UNUSABLE_ANSWER_CLASSES: tuple[type[Exception], ...] = (ModelEmptyResponseError, ModelInvalidResponseError)
except ImportError:  # pragma: no cover - 2.68 raises a plain `UnexpectedModelBehavior` (or an `IndexError`)
    UNUSABLE_ANSWER_CLASSES = ()

# How much of the provider's error body goes into the message (all of it, redacted, is on `.body`).
MESSAGE_BODY_CHARS = 300
# How much of a provider's or model's error message is redacted and shown (the first line of it for a provider).
MESSAGE_CHARS = 4000
FIRST_LINE_CHARS = 200

install_log_redaction()


def documented_error(
    exc: BaseException, model_name: str | None = None, *, limits_given: bool = False
) -> AgentRuntimeError | None:
    """The documented error that stands for `exc`, raised by a run; None when `exc` is not one to translate.

    - `UsageLimitExceeded` -> `TurnLimitExceededError`, naming the limit and its setting;
    - `UnexpectedModelBehavior` (tool retries exhausted, output cut off by its token limit, a content filter)
      -> `ModelBehaviorError`, keeping the body the model sent; but when what came back is not an answer of the API
      at all (a body that is not JSON or lacks the API's fields, a stream that ended before its first event: a
      proxy's page, a server that only looks OpenAI-compatible) -> `ModelProviderError`, as a corrupt answer is;
    - `ModelAPIError` (an HTTP error, a rate limit, a dropped connection, a corrupt answer, a timeout: plain or
      streamed alike) -> `ModelProviderError` with the status code and the redacted body;
    - a `UserError` for two tools of one name (a turn's toolsets beside the agent's) -> `InvalidInputError` naming
      `toolsets`;
    - an `AttributeError`, `TypeError`, `KeyError` or `IndexError` raised in pydantic-ai's model code (what the
      provider sent is not its API's: a streamed `usage` that is no object) -> `ModelProviderError`;
    - a model function's answer pydantic-ai cannot serialise (`PydanticSerializationError` in `FunctionModel`: dict
      arguments of a tool call holding a lone surrogate) -> `ModelBehaviorError`;
    - a `UnicodeEncodeError` of the HTTP client building the request (a header, the API key, it cannot encode)
      -> `ConfigError`, naming only the character.

    Args:
        exc: what the run raised.
        model_name: the model the turn asked for; errors name it (pydantic-ai names the model a stream reported,
            e.g. a dated version, in errors raised inside a stream).
        limits_given: the turn's caller gave its usage limits (`usage_limits=`): a limit reached is theirs, not the
            setting's.
    """
    if isinstance(exc, AgentRuntimeError):
        return None
    if isinstance(exc, UsageLimitExceeded):
        return TurnLimitExceededError(_limit_message(exc.message, limits_given))
    if isinstance(exc, UnexpectedModelBehavior) and _is_unusable_answer(exc):
        return unusable_answer_error(exc, model_name)
    if isinstance(exc, UnexpectedModelBehavior):
        return ModelBehaviorError(
            f'the model did not produce a usable answer: {_for_the_user(exc.message)}; the turn was not saved',
            body=_redacted_body(exc.body),
            model_name=model_name,  # `agentrt serve`'s 502 line said "(model unknown)" without it (QA)
        )
    if isinstance(exc, ModelAPIError):
        return provider_error(exc, model_name)
    if isinstance(exc, UserError) and 'conflicts with existing tool' in exc.message:
        # Two tools of one name (a turn's toolset beside the agent's, or the agent's own toolset given again): found
        # as the run lists its tools, before its first request. The caller's argument, not a bug of the runtime's.
        return InvalidInputError(f'toolsets: {exc.message}; nothing was sent', field='toolsets')
    if isinstance(exc, AttributeError | TypeError | KeyError | IndexError) and raised_inside(
        exc, 'pydantic_ai.models.'
    ):
        # pydantic-ai's model code failing on what the provider sent (a streamed `usage` that is no object: "'str'
        # object has no attribute 'model_dump'"): an answer that is not the API's, as a plain request's is, not an
        # internal error of the runtime's (CLI exit 70, HTTP 500; QA).
        where = f'model {model_name!r}' if model_name else 'the model'
        return ModelProviderError(
            f'the provider of {where} sent an answer that could not be used ({type(exc).__name__}: '
            f'{redact_cut(_first_line(str(exc)), 200)}). {UNUSABLE_ANSWER_ADVICE}; the turn was not saved',
            status_code=None,
            model_name=model_name,
            body=None,
        )
    if isinstance(exc, PydanticSerializationError) and _passed_through(exc, 'pydantic_ai.models.function'):
        # A model function (`FunctionModel`) answering a tool call with dict arguments that hold a lone surrogate:
        # pydantic-ai's usage estimate serialises them as JSON and failed with pydantic's bare error, an internal
        # error though the function had answered (QA). Its answer, as a model's that cannot be used.
        return ModelBehaviorError(
            f'the model function answered with text that cannot be encoded as JSON (a lone surrogate in a tool '
            f"call's arguments?): {_first_line(str(exc))}; replace the character; the turn was not saved",
            body=None,
            model_name=model_name,
        )
    if isinstance(exc, UnicodeEncodeError) and raised_inside(exc, 'httpx'):
        # A header the HTTP client cannot encode: an API key from an undecodable environment value (a lone
        # surrogate) failed as the request was built, before anything was sent; it was an internal error.
        character = exc.object[exc.start : exc.end]  # only the character: the header may be the key
        return ConfigError(
            f'the request to the provider of model {model_name!r} could not be built: a header value (the API key '
            f'from the environment?) holds a character HTTP cannot send ({character!a}); nothing was sent'
        )
    return None


@contextmanager
def documented_errors(model_name: str | None = None, *, limits_given: bool = False) -> Iterator[None]:
    """Re-raise what `documented_error` translates as its documented error (the original is its `__cause__`)."""
    try:
        yield
    except Exception as exc:
        translated = documented_error(exc, model_name, limits_given=limits_given)
        if translated is None:
            raise
        raise translated from exc


# pydantic-ai 2.68 raises `UnexpectedModelBehavior` with these words when the provider's answer is not one of its API
# (it has no type of its own for it; 2.78 has: `UNUSABLE_ANSWER_CLASSES`): the provider's or a proxy's fault, not the
# model's. The plain request says
# "Invalid response from openai chat completions endpoint, expected JSON data" (an HTML page) or "...: N validation
# errors for ChatCompletion" (JSON without `choices`); the same answer to a streamed request is a stream without a
# single event.
UNUSABLE_ANSWER_ADVICE = (
    "Check the provider base URL (a proxy's page, or a server that only looks like the API, answers like this), or "
    'send the message again later'
)
STREAM_ENDED_EARLY = "Streamed response ended before the provider's last event: the answer may be cut off"
"""What a turn raises (`UnexpectedModelBehavior`, `TurnGuard`) for a streamed answer pydantic-ai marks `incomplete`."""
UNUSABLE_ANSWER_PREFIXES = (
    'Invalid response from ',
    'Streamed response ended without content or tool calls',
    STREAM_ENDED_EARLY,
)


def _is_unusable_answer(exc: UnexpectedModelBehavior) -> bool:
    # By class first: 2.78's `ModelEmptyResponseError` says "Empty response from ...: no choices" (a 200 with
    # `choices: []`), which no prefix matched, so it was taken for the model's fault (rephrase) rather than the
    # provider's (QA). The prefixes are for 2.68, whose plain `UnexpectedModelBehavior` has only its words.
    return isinstance(exc, UNUSABLE_ANSWER_CLASSES) or exc.message.startswith(UNUSABLE_ANSWER_PREFIXES)


def unusable_answer_error(exc: UnexpectedModelBehavior, model_name: str | None = None) -> ModelProviderError:
    """The `ModelProviderError` for an answer that is not one of the provider's API: one line, the body redacted."""
    body = _redacted_body(exc.body)
    where = f'model {model_name!r}' if model_name else 'the model'
    what = f'the provider of {where} sent an answer that could not be used ({_first_line(exc.message)})'
    if body:
        what += f': {body if len(body) <= MESSAGE_BODY_CHARS else body[:MESSAGE_BODY_CHARS] + "..."}'
    return ModelProviderError(
        f'{what}. {UNUSABLE_ANSWER_ADVICE}; the turn was not saved',
        status_code=None,
        model_name=model_name,
        body=body,
    )


def _limit_message(message: str, limits_given: bool = False) -> str:
    found = re.search(r'\b(\w+_limit)\b', message)
    setting = LIMIT_SETTINGS.get(found.group(1)) if found else None
    # The caller's own `usage_limits=` replace the settings for the turn: naming a setting they never set misled.
    where = ' (the usage_limits given to this turn)' if limits_given else f' ({setting})' if setting else ''
    shown = _DEVELOPER_ADVICE.sub('', message).rstrip('. ')  # "Consider raising the limit, or see the docs ...": not
    # the caller's to follow over HTTP or in a chat (the setting named is the operator's)
    return f'this turn reached its usage limit{where}: {shown}; the turn stopped and was not saved'


def provider_error(exc: ModelAPIError, model_name: str | None = None) -> ModelProviderError:
    """The `ModelProviderError` for a pydantic-ai model error: what happened, the status and body, what to do."""
    status = exc.status_code if isinstance(exc, ModelHTTPError) else None
    body = _redacted_body(exc.body)
    model_name = model_name or exc.model_name
    where = f'model {model_name!r}'
    if isinstance(exc, ModelRequestTimeout | ModelTimeoutError):
        what = f'{where} did not answer in time'
    elif isinstance(exc, ModelConnectionError):
        what = f'the connection to the provider of {where} failed ({_first_line(exc.message)})'
    elif status is not None:
        what = f'the provider of {where} answered HTTP {status}'
    else:
        what = f'the provider of {where} sent an answer that could not be used ({_first_line(exc.message)})'
    if body:
        shown = body if len(body) <= MESSAGE_BODY_CHARS else body[:MESSAGE_BODY_CHARS] + '...'
        what += f': {shown}'
    return ModelProviderError(
        f'{what}. {_advice(exc, status)}; the turn was not saved', status_code=status, model_name=model_name, body=body
    )


def provider_wait(exc: ModelAPIError) -> float | None:
    """The seconds a provider asked to wait before the next request, or None: pydantic-ai's reading of its
    `retry-after-ms` or `Retry-After`, or a `Retry-After` in fractional seconds (`0.5`), which pydantic-ai does not read
    (RFC 9110 has whole seconds) though the OpenAI SDK and compatible servers send it: it was dropped (QA)."""
    seconds = exc.retry_after
    if seconds is None:
        headers = exc.headers if isinstance(exc, ModelHTTPError) else None
        # The first of several headers (the HTTP client joins them: `5, 9`; QA).
        text = (headers or {}).get('retry-after', '').split(',', 1)[0].strip()
        if not _SECONDS.fullmatch(text):  # digits, maybe a fraction: not `1_000` or `1e10`, which float() reads
            return None
        seconds = float(text)
    # A day at most: a provider asking for more (1e10 s) says nothing a client can act on (it was passed on; QA).
    return min(seconds, MAX_PROVIDER_WAIT_S) if 0 < seconds < math.inf else None


MAX_PROVIDER_WAIT_S = 86_400.0
_SECONDS = re.compile(r'[0-9]+\.?[0-9]*|\.[0-9]+')  # `3`, `1.5`, and `3.` or `.5` as float() reads them (QA)


def _advice(exc: ModelAPIError, status: int | None) -> str:
    if isinstance(exc, ModelAuthenticationError) or status in (401, 403):
        return 'Check the API key (e.g. OPENAI_API_KEY) and that it may use this model'
    if isinstance(exc, ModelNotFoundError) or status == 404:
        return 'Check the model name and the provider base URL'
    if isinstance(exc, ModelQuotaExceededError):
        return "The account's quota or credit is used up"
    if isinstance(exc, ModelRateLimitError) or status == 429:
        return f'Rate limited: wait and send the message again{_asked_wait(exc)}'
    if isinstance(exc, ModelConnectionError | ModelRequestTimeout):
        return 'Check the network and the provider base URL, then send the message again'
    if status is not None and status < 500:
        return 'The provider refused the request'
    if status is None:  # an answer came, but could not be read
        return UNUSABLE_ANSWER_ADVICE
    return f'The provider failed; send the message again later{_asked_wait(exc)}'


def _asked_wait(exc: ModelAPIError) -> str:
    """` (the provider asked for N s)`, when it did: a date's seconds to a tenth (it showed `12.2065 s`; QA)."""
    asked = provider_wait(exc)
    if not asked:
        return ''
    # Rounded up past 100 s, as the HTTP API's Retry-After is (1234.5 showed as 1234 s there, 1235 here; QA).
    shown = f'{math.ceil(asked)}' if asked >= 100 else f'{max(asked, 0.001):.3g}'
    return f' (the provider asked for {shown} s)'


def _redacted_body(body: object | None) -> str | None:
    if body is None or body == '':
        return None
    text = body if isinstance(body, str) else json.dumps(body, default=str, ensure_ascii=False)
    return redact_text(text)[0]


_DEVELOPER_ADVICE = re.compile(r'\.? Consider raising the (?:retry )?limit, or see the docs on [^:]*: \S+')
"""pydantic-ai's advice to the agent's developer in its tool-retry and usage-limit errors: a chat's user has no limit
to raise."""


def _for_the_user(message: str) -> str:
    """pydantic-ai's message without its advice to the developer, redacted and cut (`_redacted_message`), without a
    last full stop (the caller's sentence goes on; a cut's `...` stays)."""
    text = _redacted_message(_DEVELOPER_ADVICE.sub('', message)).rstrip()
    return text[:-1] if text.endswith('.') and not text.endswith('...') else text


def _redacted_message(message: str) -> str:
    """The message, redacted, then cut to `MESSAGE_CHARS` (`redact_cut`: a secret the cut splits is redacted whole)."""
    return redact_cut(message, MESSAGE_CHARS, marker='...')


def _passed_through(exc: BaseException, module: str) -> bool:
    """Whether `exc` was raised under a frame of `module` (pydantic's errors come out of its compiled core, called
    from any of pydantic-ai's modules, so the innermost frame, `raised_inside`'s, does not say whose call it was)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get('__name__') == module:
            return True
        tb = tb.tb_next
    return False


def _first_line(message: str) -> str:
    return (_redacted_message(message).strip().splitlines() or [''])[0][:FIRST_LINE_CHARS]
