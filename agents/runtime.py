"""Process lifecycle for programs embedding the runtime: observability set-up and a clean shutdown.

`async with agentrt_runtime():` does both around a block; `configure_observability()` and `shutdown_runtime()` are
the two halves for programs that manage their own lifecycle (a web server's start-up and shutdown hooks).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import logfire

from agentrt.db.engine import close_database, init_database
from agentrt.services.background import drain_supervisor
from agentrt.services.ledger import get_request_tracker

_configured = False


def configure_observability() -> None:
    """Configure logfire once: spans stay local unless `LOGFIRE_TOKEN` is set.

    With a token, pydantic-ai runs are instrumented too (agent, model request and tool spans), without their
    content: prompts, tool arguments and results and model output are not sent (the ledger stores them, redacted).
    """
    global _configured
    if _configured:
        return
    logfire.configure(send_to_logfire='if-token-present', console=False, service_name='agentrt')
    if os.environ.get('LOGFIRE_TOKEN'):
        logfire.instrument_pydantic_ai(include_content=False)
    _configured = True


async def shutdown_runtime(
    timeout: float = 10.0,  # noqa: ASYNC109 - a budget for draining, not a wait
    *,
    release_embedded_server: bool = False,
) -> None:
    """Finish background work, flush the ledger, and close the pool; call it once before the event loop ends.

    Args:
        timeout: seconds to let background tasks finish before they are cancelled.
        release_embedded_server: also let go of the embedded PostgreSQL now (the last process using it stops it),
            for a process that may end by a signal rather than a normal exit (a uvicorn server or worker).
    """
    await drain_supervisor(timeout)
    await get_request_tracker().aclose()
    await close_database(release_embedded_server=release_embedded_server)


@asynccontextmanager
async def agentrt_runtime(*, shutdown_timeout: float = 10.0) -> AsyncIterator[None]:
    """Run a block with the runtime up: observability configured, the database started (and migrated if behind).

    On the way out, even after an error, the runtime is shut down as `shutdown_runtime()` does: background work
    drained, the ledger flushed, the pool closed. Use it once around the part of a program that chats.

    Args:
        shutdown_timeout: seconds to let background tasks finish at the end before they are cancelled.

    Raises:
        ConfigError: a setting is invalid. DatabaseUnavailableError, EmbeddedPostgresError: no database.
    """
    configure_observability()
    try:
        await init_database()
        yield
    finally:
        await shutdown_runtime(shutdown_timeout)
