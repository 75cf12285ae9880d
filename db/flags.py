"""On/off environment variables read outside `Settings`, without importing pydantic (the CLI's root callback reads
`AGENTRT_DEBUG` before a command's module, or pydantic, is imported: `agentrt.agents.cli.support.check_debug_flag`)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from agentrt.db.errors import ConfigError

FLAG_ON = frozenset({'1', 'true', 't', 'yes', 'y', 'on'})
FLAG_OFF = frozenset({'0', 'false', 'f', 'no', 'n', 'off'})
LOGFIRE_ON = frozenset({'1', 'true', 't'})
LOGFIRE_OFF = frozenset({'0', 'false', 'f'})
"""What logfire itself takes for its `LOGFIRE_*` on/off variables (it reads them too, and refuses anything else)."""


def env_flag(
    name: str,
    environ: Mapping[str, str] | None = None,
    *,
    on: frozenset[str] = FLAG_ON,
    off: frozenset[str] = FLAG_OFF,
) -> bool:
    """An on/off environment variable read outside `Settings` (`AGENTRT_DEBUG`; `LOGFIRE_CONSOLE` with logfire's
    `LOGFIRE_ON`/`LOGFIRE_OFF`): on for a word of `on` (`1`, `true`, `yes`, `on`, `t`, `y`), off for a word of `off`
    (`0`, `false`, `no`, `off`, `f`, `n`), unset or empty; any case, spaces around.

    Raises:
        ConfigError: any other value (a typo must not quietly mean off), naming the variable and what it takes.
    """
    raw = (os.environ if environ is None else environ).get(name, '')
    value = raw.strip().lower()
    if value in on:
        return True
    if not value or value in off:
        return False
    raise ConfigError(
        f'{name}={shown_value(raw)} is not an on/off value: set {_listed(on)} to turn it on; {_listed(off)} (or leave '
        'it unset) to turn it off'
    )


def _listed(words: frozenset[str]) -> str:
    """The words a value may be, longest first (`true, 1 or t`)."""
    ordered = sorted(words, key=lambda word: (-len(word), word))
    return ', '.join(ordered[:-1]) + f' or {ordered[-1]}'


def shown_value(value: str) -> str:
    """A configuration value as quoted in a message: on one line, at most 40 characters, in quotes."""
    text = ' '.join(value.split())
    return repr(text if len(text) <= 40 else f'{text[:40]}...')
