"""`log_warnings`: Python warnings of a server process the runtime owns as one line of its log.

A library's warning (pydantic-ai's `UsageLimitUnavailableWarning` when a model reports no token usage while the turn
limits are on, as they are by default) went out as Python prints it: a source path, the warning's paragraph and the
line `warnings.warn(`, on stderr, where `agentrt serve`'s log had it glued to the access line before it. Only for
processes the runtime owns (`agentrt serve`'s workers, `agentrt worker`): a program of your own keeps Python's
handling, and its own filters.
"""

from __future__ import annotations

import logging
import warnings
from typing import TextIO

logger = logging.getLogger('agentrt.warnings')


def log_warnings() -> None:
    """Show this process's Python warnings as `agentrt.warnings` log lines (`<category>: <message>`). Python's
    filters still decide which are shown (by default, each once per place it is raised)."""
    warnings.showwarning = _log_warning


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    logger.warning('%s: %s', category.__name__, message)
