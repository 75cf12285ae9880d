"""Process lifecycle for programs embedding the runtime: observability set-up and a clean shutdown."""

from __future__ import annotations

import os

import logfire

from agentrt.db.engine import close_database
from agentrt.services.background import drain_supervisor
from agentrt.services.ledger import get_request_tracker

_configured = False


def configure_observability() -> None:
    """Configure logfire once: spans stay local unless `LOGFIRE_TOKEN` is set.

    With a token, pydantic-ai runs are instrumented too (agent, model request and tool spans).
    """
    global _configured
    if _configured:
        return
    logfire.configure(send_to_logfire='if-token-present', console=False, service_name='agentrt')
    if os.environ.get('LOGFIRE_TOKEN'):
        logfire.instrument_pydantic_ai()
    _configured = True


async def shutdown_runtime(timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a budget for draining, not a wait
    """Finish background work, flush the ledger, and close the pool; call it once before the event loop ends.

    Args:
        timeout: seconds to let background tasks finish before they are cancelled.
    """
    await drain_supervisor(timeout)
    await get_request_tracker().aclose()
    await close_database()
