"""`freeze_startup_heap`: a long-running server process's start-up objects moved out of the cyclic GC's way.

What a process holds once it has started (modules, classes, pydantic and SQLAlchemy schemas, the engine, the app:
about 190,000 objects in a process running turns, 206,000 in a served app) lives as long as the process, yet every
full (gen2) collection walks it. Measured with runtime turns (BENCHMARKS 3b): a gen2 collection every 60-75 turns,
each a pause of about 100 ms that stalls the event loop for every chat in flight (1.4-1.5 ms a turn averaged); with
the start-up heap frozen (`gc.freeze()`), about 3 ms each.

Only for processes the runtime owns, once they have started (`agentrt serve`'s workers, `agentrt worker`): a frozen
object is never collected, so in a program of your own, call it yourself once its start-up is done, if at all.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger('agentrt')


def freeze_startup_heap() -> int:
    """Collect what start-up left as garbage, then freeze every object still alive (`gc.freeze()`): later
    collections skip them. Call once, when the process has started and before it serves.

    Returns:
        How many objects are frozen now (`gc.get_freeze_count()`).
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug('heap: %d start-up objects frozen', frozen)
    return frozen
