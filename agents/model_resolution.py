"""Resolving the model for a run: the offline `demo` planner or any pydantic-ai model string.

A model built here from a string gets the runtime's bounds on its provider (`AGENTRT_MODEL_TIMEOUT_SECONDS`,
`AGENTRT_MODEL_MAX_RETRIES`) as the model's own settings: the lowest layer of pydantic-ai's model settings, so an
agent's or a run's `model_settings` still win, and a `Model` the caller built is used as it is. Without them, a
provider that sends its headers and then nothing held the turn (and its claim on the conversation) for the HTTP
client's default 600 s per read, times the SDK's own silent retries (3 requests for the ledger's 1 row).
"""

from __future__ import annotations

from pydantic_ai.exceptions import UserError
from pydantic_ai.models import Model, infer_model
from pydantic_ai.settings import ModelSettings, merge_model_settings

from agentrt.agents.demo_model import DEMO_MODEL_NAME, demo_model
from agentrt.db.errors import ConfigError


def resolve_model(
    name: str | Model | None,
    *,
    default: str = DEMO_MODEL_NAME,
    stream_delay: float = 0.0,
    timeout_s: float | None = None,
    max_retries: int | None = None,
) -> Model:
    """Turn a model name into a model, failing before anything runs when it cannot work.

    Args:
        name: a `Model` (returned as it is), `'demo'`, a pydantic-ai model string such as
            `'openai-chat:gpt-4o-mini'`, or None for `default`.
        default: the configured model name (`AGENTRT_MODEL`).
        stream_delay: seconds between streamed words of the demo model.
        timeout_s: for a model built from a string, the longest its provider's client waits for the next byte
            (`ModelSettings['timeout']`: per read, so a long stream that keeps sending is not cut); None: the
            client's own default.
        max_retries: for a model built from a string, how many times its provider's SDK repeats a failed request
            (`ModelSettings['max_retries']`); None: the SDK's own default.

    Raises:
        ConfigError: an unknown provider or model, a provider package that is not installed, or a missing API key.
    """
    if isinstance(name, Model):
        return name
    name = (default if name is None else name).strip()
    if not name:
        # Not the default: an empty name is a flag or variable that was meant to hold one (`--model "$MODEL"`).
        raise ConfigError(
            "the model name is empty: give 'demo' or a pydantic-ai model string such as openai-chat:gpt-4o"
        )
    if name == DEMO_MODEL_NAME:
        return demo_model(stream_delay=stream_delay)
    provider, colon, model_name = name.partition(':')
    if colon and not model_name.strip():
        # pydantic-ai built a model named '' from 'openai:' and sent the provider a request for it.
        raise ConfigError(
            f'model {name!r} names the provider {provider!r} but no model: give provider:model, such as '
            'openai-chat:gpt-4o-mini'
        )
    try:
        model = infer_model(name)
    except UserError as exc:
        raise ConfigError(f'model {name!r} cannot be used: {_user_error_text(exc, has_provider=bool(colon))}') from exc
    except ImportError as exc:
        raise ConfigError(f'model {name!r} needs a provider package that is not installed: {exc}') from exc
    except Exception as exc:
        # The provider's SDK refusing its environment as the client is built (no I/O yet): openai's `OpenAIError`
        # "Missing credentials" for OPENAI_API_KEY set but empty was an internal error (exit 70).
        raise ConfigError(f'model {name!r} cannot be used: {type(exc).__name__}: {exc}') from exc
    return with_provider_bounds(model, timeout_s=timeout_s, max_retries=max_retries)


# pydantic-ai ends its missing-key error with advice for its own keyless model, `Agent('test')`: no answer here, where
# the keyless model is 'demo' ('test' calls the tools with made-up arguments until they fail: exit 9).
_KEYLESS_HINT = 'To try Pydantic AI without an API key'


def _user_error_text(exc: UserError, *, has_provider: bool) -> str:
    """pydantic-ai's refusal of a model string, with advice that holds for the runtime."""
    text = str(exc)
    cut = text.find(_KEYLESS_HINT)
    if cut > 0:
        text = f"{text[:cut].rstrip().removesuffix('.')} (or use the offline model 'demo')"
    if not has_provider:
        # 'gpt-4o' alone: pydantic-ai says only "Unknown model", not that it wants the provider in front.
        text += '; a model string is provider:model, such as openai-chat:gpt-4o-mini'
    return text


def with_provider_bounds(model: Model, *, timeout_s: float | None, max_retries: int | None) -> Model:
    """`model` with the runtime's timeout and retries under its own settings (those it has win), each only where the
    model class sends it to its provider: pydantic-ai warns on every request that sets one the model ignores
    (`UnsupportedSettingWarning`, e.g. Bedrock's `timeout`), and there it would bound nothing."""
    bounds: ModelSettings = {}
    if timeout_s is not None and 'timeout' not in model.unsupported_settings:
        bounds['timeout'] = timeout_s
    if max_retries is not None and 'max_retries' not in model.unsupported_settings:
        bounds['max_retries'] = max_retries
    if bounds:
        # No public setter: `Model.__init__(settings=...)` stores them here, and `infer_model` passes none.
        model._settings = merge_model_settings(bounds, model.settings)
    return model
