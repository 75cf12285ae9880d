"""A JSON (not streamed) turn that stops when its client goes away, as a streamed one does.

Starlette cancels a streamed response's work when the client disconnects (`TurnStreamingResponse`); a plain route
runs to its end whoever is still waiting. A turn whose client left held its conversation's claim (renewing its lease)
until the model answered or the provider gave up, and the client's retry got 409 all that time. Here the turn runs
beside a watch on the ASGI `receive` channel, whose next message, once the body is read, is `http.disconnect`: the
client gone, the turn is cancelled, which releases its claim and records its model request `cancelled`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

T = TypeVar('T')


class ClientDisconnected(Exception):
    """The client went away before the turn ended; the turn was cancelled (nobody reads an answer)."""


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work` (a route's whole turn, its body already read), cancelling it when the client disconnects first.

    Raises:
        ClientDisconnected: the client went away; `work` was cancelled and has ended.
        Exception: whatever `work` raised.
    """
    running = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((running, watching), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the route itself cancelled (the server stopping): so is the turn, awaited to its end
        running.cancel()
        watching.cancel()
        await asyncio.gather(running, watching, return_exceptions=True)
        raise
    watching.cancel()
    if not running.done() and _disconnected(watching):
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)  # its answer or error goes to nobody
        raise ClientDisconnected
    return await running


def _disconnected(watching: asyncio.Future[None]) -> bool:
    # A watch that failed (not a disconnect) leaves the turn running, as it ran before there was a watch.
    return watching.done() and not watching.cancelled() and watching.exception() is None


async def _disconnect(request: Request) -> None:
    # The body was read (the route's parameters): the next message is the disconnect, however long the turn runs.
    while (await request.receive())['type'] != 'http.disconnect':
        pass
