"""The stored texts the secret check found clean, remembered so a conversation's history is not scanned every turn.

A chat turn resends its conversation's history, which the ledger stores again with each turn's prompts, from the
conversation store's text (`remember_message_json`): the same texts turn after turn. Checking them for secrets
(`json_may_need_redaction`, two RE2 scans) cost a turn about 1.2 ms of CPU at the default context budget, where it
resends about 150 KB of history (BENCHMARKS 7). A text the check found clean is remembered here, by its whole text
(never a digest: a collision would store a secret), so a later run finds it in a dictionary instead: a hash and a
compare, about ten times cheaper.

Only texts that recur are remembered (`recurring` bodies: the stored history and the agent's instructions), not a
run's fresh dumps, and only texts of at least `MIN_CHARS`; up to `CAPACITY_CHARS` in all, the oldest forgotten
first. A text that may hold a secret is never remembered: it is checked and redacted in every run that sends it. The
check is a pure function of the text (the rules are fixed at import), so a remembered answer never goes stale.
"""

from __future__ import annotations

import threading

from agentrt.services.ledger.redaction import json_may_need_redaction

MIN_CHARS = 512
"""Shorter texts are checked each time: their scan takes a microsecond or two, not worth a place in memory."""
CAPACITY_CHARS = 16 * 1024 * 1024
"""At most this many characters remembered (the histories of about 90 conversations at the default budget)."""

_clean: dict[str, None] = {}
"""The remembered texts, oldest first (a dict keeps insertion order)."""
_chars = 0
_lock = threading.Lock()
"""Held to add or forget (renders run in worker threads); a lookup needs none (one dict operation)."""


def may_need_redaction(text: str, *, recurring: bool) -> bool:
    """`json_may_need_redaction(text)`, answered from memory for a `recurring` text found clean before.

    Args:
        text: JSON text, as `json_may_need_redaction` takes it.
        recurring: the text is likely sent again by later runs (stored history, instructions): remember it if clean.
    """
    if not recurring or len(text) < MIN_CHARS:
        return json_may_need_redaction(text)
    if text in _clean:
        return False
    if json_may_need_redaction(text):
        return True
    _remember(text)
    return False


def _remember(text: str) -> None:
    global _chars
    size = len(text)
    if size > CAPACITY_CHARS // 4:  # one huge text would push out everything else
        return
    with _lock:
        if text in _clean:
            return
        _clean[text] = None
        _chars += size
        while _chars > CAPACITY_CHARS:
            oldest = next(iter(_clean))
            del _clean[oldest]
            _chars -= len(oldest)


def remembered_chars() -> int:
    """How many characters are remembered now.

    For tests: nothing in the runtime reads it."""
    return _chars


def forget_all() -> None:
    """Forget every remembered text.

    For tests: the runtime never calls it."""
    global _chars
    with _lock:
        _clean.clear()
        _chars = 0
