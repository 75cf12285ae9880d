"""Admission of chat turns: as many run at once as the event loop keeps up with; the others wait, holding nothing.

One process serves as many turns as its CPU allows (a demo turn costs a few tens of milliseconds of CPU). Past that,
every turn still starts, the event loop falls behind, and each session holds its connection for as long as the loop
takes to come back to it: connections are held seconds instead of milliseconds, and sessions time out waiting for
the pool (`bench_pool_capacity.py`: the database is idle while the pool times out). So the turns running at once are
capped, and the cap follows the loop: a watcher measures how late the loop comes back to a timer; while turns wait
and the loop is well on time (within half of `AGENTRT_TURN_ADMISSION_LAG_MS`), the cap grows by one a tick; when it
is later than that setting, the cap shrinks by a tenth (at most every `DECREASE_EVERY_S`, since turns already
running keep their load). Waiting turns start in arrival order, with no session and no connection; one that waits
longer than `AGENTRT_TURN_QUEUE_SECONDS` fails with `RuntimeBusyError` (nothing was sent, nothing billed).

A turn started inside another turn (a tool that chats) is admitted at once: it cannot wait for a place its own parent
holds, so nesting never deadlocks.

When the process begins to stop (`stop_admitting()`, which `agentrt serve` calls on SIGTERM and Ctrl-C), the turns
still waiting are refused at once with `ShuttingDownError` (the HTTP API's 503 `shutting_down`), and so is any turn
that asks afterwards; turns already running go on within the server's grace period. They waited out that grace
period before, and some were admitted meanwhile only to be cut off at its end.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agentrt.db.errors import RuntimeBusyError, ShuttingDownError

MIN_LIMIT = 2
"""Turns admitted however late the loop is: progress is never blocked by a loop busy with something else."""
INITIAL_LIMIT = 16
"""The cap before the watcher has measured anything."""
TICK_S = 0.01
"""How often the watcher measures the loop's lateness while turns run."""
DECREASE_EVERY_S = 0.1
"""The cap shrinks at most this often: the load of turns already running lasts until they end."""

_inside_turn: contextvars.ContextVar[bool] = contextvars.ContextVar('agentrt_inside_turn', default=False)


class TurnAdmission:
    """The waiting line of one event loop's turns (`turn_admission()` gives the running loop's).

    Args:
        max_lag_s: the loop is on time while a timer fires within this of its deadline (0: admit every turn at once).
        queue_s: the longest a turn waits before `RuntimeBusyError`.
    """

    def __init__(self, *, max_lag_s: float, queue_s: float) -> None:
        self.max_lag_s = max_lag_s
        self.queue_s = queue_s
        self.limit = float(INITIAL_LIMIT)
        self.running = 0
        self.lag_s = 0.0
        self.admitted = 0
        self.waited = 0
        self.refused = 0
        self._waiting: collections.deque[asyncio.Future[bool]] = collections.deque()
        """Each waiting turn's future: True once admitted, False when refused by `stop()`."""
        self._watcher: asyncio.Task[None] | None = None
        self._last_decrease = 0.0
        self.stopping = False
        """`stop()` was called: no turn is admitted any more, except inside a running turn."""

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait until the turn may start, hold its place while the block runs.

        Raises:
            RuntimeBusyError: the turn waited longer than `queue_s`; nothing was started.
        """
        if self.max_lag_s <= 0 or _inside_turn.get():
            self._start()  # no admission, or a turn inside a turn: at once
        else:
            await self._admit()
        token = _inside_turn.set(True)
        try:
            yield
        finally:
            self.running -= 1
            try:
                _inside_turn.reset(token)
            except ValueError:  # the block ended in another context (a streamed response closed by its server)
                pass
            self._admit_waiting()
            self._unwatch()

    def stop(self) -> None:
        """The process is stopping: refuse the turns waiting now and every turn that asks from now on."""
        self.stopping = True
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.done():
                self.refused += 1
                waiting.set_result(False)

    async def _admit(self) -> None:
        if self.stopping:
            self.refused += 1
            raise ShuttingDownError(_STOPPING)
        if not self._waiting and self.running < self.limit:
            self._start()
            return
        admitted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append(admitted)
        self.waited += 1
        self._watch()
        try:
            await asyncio.wait_for(asyncio.shield(admitted), self.queue_s)
        except TimeoutError:
            if not admitted.done():
                admitted.cancel()
                self.refused += 1
                raise RuntimeBusyError(
                    f'this process is running as many chat turns as its event loop keeps up with ({self.running}); '
                    f'the turn waited {self.queue_s:g}s (AGENTRT_TURN_QUEUE_SECONDS) and was not started: try '
                    'again shortly, or run more worker processes'
                ) from None
        except BaseException:
            if admitted.done() and not admitted.cancelled() and admitted.result():
                self.running -= 1  # admitted as it was cancelled: give the place back
                self._admit_waiting()
            else:
                admitted.cancel()
            raise
        # Settled either way by now, a time-out that lost the race included: started (True) or refused by `stop()`.
        if not admitted.result():
            raise ShuttingDownError(_STOPPING)

    def _start(self) -> None:
        self.running += 1
        self.admitted += 1
        self._watch()

    def _admit_waiting(self) -> None:
        while self._waiting and self.running < self.limit:
            admitted = self._waiting.popleft()
            if not admitted.done():  # not given up meanwhile
                self._start()
                admitted.set_result(True)

    def _watch(self) -> None:
        if self.running > MIN_LIMIT or self._waiting:
            if self._watcher is None or self._watcher.done():
                self._watcher = asyncio.get_running_loop().create_task(self._watch_loop(), name='agentrt-admission')

    def _unwatch(self) -> None:
        # Stopped now, not at its next tick: a program that closes its event loop right after its turns ended (a loop
        # of its own per call, as README allows) got "Task was destroyed but it is pending!" for the sleeping watcher.
        if self._watcher is not None and self.running <= MIN_LIMIT and not self._waiting:
            self._watcher.cancel()
            self._watcher = None

    async def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self.running > MIN_LIMIT or self._waiting:
            started = loop.time()
            await asyncio.sleep(TICK_S)
            now = loop.time()
            self.lag_s = now - started - TICK_S
            if self.lag_s > self.max_lag_s:
                if now - self._last_decrease >= DECREASE_EVERY_S:
                    self.limit = max(MIN_LIMIT, min(self.limit, self.running) * 0.9)
                    self._last_decrease = now
            elif self._waiting and self.running >= self.limit - 1 and self.lag_s <= self.max_lag_s / 2:
                self.limit += 1
            self._admit_waiting()


_STOPPING = (
    'this server is shutting down: the turn was not started (nothing was sent or saved); send it again, to another '
    'worker or once the server is back'
)

_admissions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TurnAdmission] = weakref.WeakKeyDictionary()


def stop_admitting() -> None:
    """Refuse the turns waiting for admission and any turn asking from now on, in every event loop of the process
    (`TurnAdmission.stop`). Safe to call from a signal handler or another thread; turns already running go on."""
    for loop, admission in list(_admissions.items()):
        if loop.is_closed():
            continue
        try:
            loop.call_soon_threadsafe(admission.stop)
        except RuntimeError:  # closed meanwhile
            pass


def turn_admission(*, max_lag_s: float, queue_s: float) -> TurnAdmission:
    """The running loop's `TurnAdmission`, made on first use (its settings follow the latest call's)."""
    loop = asyncio.get_running_loop()
    admission = _admissions.get(loop)
    if admission is None:
        admission = _admissions[loop] = TurnAdmission(max_lag_s=max_lag_s, queue_s=queue_s)
    admission.max_lag_s, admission.queue_s = max_lag_s, queue_s
    return admission
