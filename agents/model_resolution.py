"""Resolving the model for a run: the offline `demo` planner or any pydantic-ai model string."""

from __future__ import annotations

from pydantic_ai.exceptions import UserError
from pydantic_ai.models import Model, infer_model

from agentrt.agents.demo_model import DEMO_MODEL_NAME, demo_model
from agentrt.db.errors import ConfigError


def resolve_model(name: str | Model | None, *, default: str = DEMO_MODEL_NAME, stream_delay: float = 0.0) -> Model:
    """Turn a model name into a model, failing before anything runs when it cannot work.

    Args:
        name: a `Model`, `'demo'`, a pydantic-ai model string such as `'openai-chat:gpt-4o-mini'`, or None
            for `default`.
        default: the configured model name (`AGENTRT_MODEL`).
        stream_delay: seconds between streamed words of the demo model.

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
    try:
        return infer_model(name)
    except UserError as exc:
        raise ConfigError(f'model {name!r} cannot be used: {exc}') from exc
    except ImportError as exc:
        raise ConfigError(f'model {name!r} needs a provider package that is not installed: {exc}') from exc
