"""Which ledgers of a run record its requests: a stand-in ledger (`LedgerCapability.stands_in`, the one a chat turn
adds for an agent it found none on) records only when no other ledger of the same run does.

A turn cannot see every ledger an agent has before the run: a `DynamicCapability`'s factory makes its capability only
as the run starts, and a capability of the user's own may hold one where no walk of the tree finds it. Each ledger
that takes part in a run is counted here under the run's id as its `wrap_run` starts, which pydantic-ai enters for
every capability of the run before its first model request; the stand-in looks at the count when a request is made,
and lets it through unrecorded, unheld, when another ledger records it. Without this, both recorded it, each under an
id of its own that no `ON CONFLICT` could match: two rows, two holds, two charges per request (QA).

Counted at `wrap_run`, not `for_run`: a ledger whose `for_run` ran may still be left out of the run (a dynamic
capability's ledger named `TURN_LEDGER_ID` is replaced by the turn's of that `id`), and counted then, the stand-in
stood down for a ledger that recorded nothing: the request had no row at all.
"""

from __future__ import annotations

import weakref


class RunRecorders:
    """How many ledgers record one run (not standing in, their `wrap_run` started); shared by their per-run states."""

    __slots__ = ('__weakref__', 'count')

    def __init__(self) -> None:
        self.count = 0


_runs: weakref.WeakValueDictionary[str, RunRecorders] = weakref.WeakValueDictionary()
"""By run id, while a ledger's per-run state of the run lives (each holds its run's entry)."""


def run_recorders(run_id: object) -> RunRecorders:
    """The recorders of the run `run_id`, to count a ledger in as it records the run (`count += 1`) or to look at.

    A run without an id (a capability driven by hand) gets recorders of its own: nothing to share them with.
    """
    shared = _runs.get(run_id) if isinstance(run_id, str) else None
    if shared is None:
        shared = RunRecorders()
        if isinstance(run_id, str):
            _runs[run_id] = shared
    return shared
