"""The budget knobs (`AGENTRT_BUDGET*`), from the settings the database was initialised with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agentrt.db.engine import current_settings
from agentrt.db.errors import AgentRuntimeError
from agentrt.db.settings import Settings, get_settings

UnpricedMode = Literal['count', 'refuse']

PROVIDER_FRAMING_TOKENS = 1024
"""Tokens added to every byte-length estimate for what a provider wraps around a request and a byte count cannot
see: role markers, the rendering of tool definitions, a tool-use system prompt (Anthropic's is a few hundred)."""
MEDIA_URL_TOKENS = 4096
"""Tokens counted for a file the provider fetches by URL (image, audio, video, document): the request carries the
URL only. A long document or video sent by URL can cost more (README, "Budgets", the bound)."""


@dataclass(frozen=True)
class BudgetConfig:
    """How the ledger capability reserves: see the `AGENTRT_BUDGET*` rows of README's configuration table."""

    enabled: bool = True
    unpriced: UnpricedMode = 'refuse'
    max_output_tokens: int = 16_384
    min_output_tokens: int = 256
    reservation_ttl_seconds: float = 900.0
    sweep_interval_seconds: float = 60.0
    count_tokens: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> BudgetConfig:
        """The budget knobs of `settings`."""
        return cls(
            enabled=settings.budgets,
            unpriced=settings.budget_unpriced,
            max_output_tokens=settings.budget_max_output_tokens,
            min_output_tokens=settings.budget_min_output_tokens,
            reservation_ttl_seconds=settings.budget_reservation_ttl_seconds,
            sweep_interval_seconds=settings.budget_sweep_interval_seconds,
            count_tokens=settings.budget_count_tokens,
        )

    @classmethod
    def current(cls) -> BudgetConfig:
        """The knobs of the running database's settings (or the environment's, before `init_database()`).

        Raises:
            ConfigError: the environment holds an invalid value (only when the database is not initialised).
        """
        try:
            settings = current_settings()
        except AgentRuntimeError:
            settings = get_settings()
        return cls.from_settings(settings)
