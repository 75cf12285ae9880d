"""One turn at a time per conversation: a claim (a lease row) taken before the conversation is loaded.

The first turn to claim a conversation runs; a turn that finds a live claim fails at once with
`ConcurrentTurnError` (stage 'start'): nothing was sent to a model, nothing billed. The running turn renews its
lease in the background every third of `lease_s` and deletes the claim when it ends, however it ends; a crashed
process's claim expires after `lease_s`, and the next turn takes it over.

A chat turn takes its claim in the transaction that looks up its tenant, in the statement that loads its
conversation (`TurnClaim.sql`, `load_recent_conversation(claim=...)`), renews it with the statement that also reads
the conversation's revision (`TurnClaim.check`: the turn guard's question, answered with the renewal), and releases
it in the transaction that saves the turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import anyio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.db.cancellation import undone_if_cancelled
from agentrt.db.driver import DriverStatement, DriverTransaction
from agentrt.db.engine import refused_after_shutdown
from agentrt.db.errors import DatabaseNotInitializedError, DatabaseUnavailableError
from agentrt.db.forks import forget_in_child
from agentrt.db.processes import is_alive, this_host, this_process
from agentrt.db.session import get_db_session, retry_on_disconnect
from agentrt.services.background import BackgroundQueueFull, SupervisorClosed, get_supervisor
from agentrt.services.conversations._arguments import check_conversation_id
from agentrt.services.conversations._turns import ConcurrentTurnError

logger = logging.getLogger('agentrt.conversations')

# Take the claim if there is none or the one there has expired; RETURNING says whether this turn got it. A claim
# that is already this turn's (its id is minted before) counts as taken: a retry after a lost connection whose
# first attempt committed is not refused as a concurrent turn. So does one this process gave up and could not
# release yet (`abandoned_claim_id`: its turn ended while PostgreSQL was down, `_release_later`): the next turn of
# the conversation takes it over rather than being refused until the release's next attempt.
# A claim held by a process of this host that no longer runs (killed: SIGKILL, the OOM killer) is taken over at once
# (`dead_claim_id`, named by `TurnClaim.refused` after it checked the holder), not after its lease.
_CLAIM_SQL = """
INSERT INTO conversation_turns (
    account_id, conversation_id, claim_id, claimed_at, expires_at, holder_host, holder_pid, holder_started
)
VALUES (
    :account_id, :conversation_id, :claim_id, now(), now() + :lease_s * interval '1 second',
    :holder_host, :holder_pid, :holder_started
)
ON CONFLICT (account_id, conversation_id) DO UPDATE
SET claim_id = excluded.claim_id, claimed_at = excluded.claimed_at, expires_at = excluded.expires_at,
    holder_host = excluded.holder_host, holder_pid = excluded.holder_pid, holder_started = excluded.holder_started
WHERE conversation_turns.expires_at < now() OR conversation_turns.claim_id = excluded.claim_id
    OR conversation_turns.claim_id = :abandoned_claim_id OR conversation_turns.claim_id = :dead_claim_id
RETURNING claim_id
"""
_CLAIM = text(_CLAIM_SQL)
_CLAIM_ON_DRIVER = DriverStatement.of(_CLAIM)  # a chat turn's start runs on the driver connection
# The renewal, which also answers the turn guard: the claim is still this turn's (a row comes back) and the stored
# revision of the conversation (NULL while it has none).
_CHECK = text("""
UPDATE conversation_turns SET expires_at = now() + :lease_s * interval '1 second'
WHERE account_id = :account_id AND conversation_id = :conversation_id AND claim_id = :claim_id
RETURNING (
    SELECT revision FROM conversations WHERE account_id = :account_id AND conversation_id = :conversation_id
)
""")
# The claim that refused a turn: how long it still holds the conversation (whole seconds, rounded up), from the time
# of asking (the transaction's `now()` may predate the claim, which then seemed to hold longer than its lease), and
# who holds it.
_HOLDING = text("""
SELECT greatest(ceil(extract(epoch FROM expires_at - clock_timestamp())), 0)::float8, claim_id, holder_host,
    holder_pid, holder_started
FROM conversation_turns WHERE account_id = :account_id AND conversation_id = :conversation_id
""")
_HOLDING_ON_DRIVER = DriverStatement.of(_HOLDING)
_RELEASE = text("""
DELETE FROM conversation_turns
WHERE account_id = :account_id AND conversation_id = :conversation_id AND claim_id = :claim_id
""")


@dataclass
class TurnClaim:
    """A turn's hold on its conversation."""

    account_id: int
    conversation_id: str
    claim_id: str
    lease_s: float
    lost: bool = False
    """Set when a renewal found the claim gone (it expired and another turn took it over)."""
    released: bool = False
    """Set once the claim is deleted (by `release`, or by the transaction that saved the turn)."""
    releasing: asyncio.Task[bool] | None = field(default=None, repr=False, compare=False)
    """The release begun as the turn ended (`_start_release`), while it runs."""
    confirmed_at: float = field(default_factory=time.monotonic)
    """`time.monotonic()` just before the claim was last taken, renewed or checked: the lease runs from later."""
    revision: str | None = None
    """The conversation's stored revision as of `confirmed_at` (what `take`'s caller loaded, or `check` read)."""
    knows_revision: bool = False
    """`revision` was read (by `check`) or set by the caller that loaded the conversation with the claim (`loaded`)."""
    acquired: bool = False
    """Set once the claim was taken (`take`, or `taken` after the caller's statement took it)."""

    @classmethod
    def mint(cls, account_id: int, conversation_id: str, *, lease_s: float) -> TurnClaim:
        """A new claim (not taken yet) with a fresh id, so taking it is safe to repeat.

        Raises:
            InvalidInputError: `conversation_id` is not an id the store can hold (a NUL, a lone surrogate, too long).
        """
        check_conversation_id(conversation_id)
        return cls(account_id, conversation_id, uuid.uuid4().hex, lease_s)

    async def take(self, *, session: AsyncSession | DriverTransaction) -> None:
        """Take the claim in the caller's transaction (committed with it): free, expired, or already this one's.

        Args:
            session: the caller's session, or its transaction on the driver connection (a chat turn's start).

        Raises:
            ConcurrentTurnError: another turn holds a live claim on the conversation (stage 'start').
        """
        self.confirmed_at = time.monotonic()
        if not await _claimed(session, self._claim_params()):
            await self.refused(session=session)
        self.acquired = True

    async def refused(self, *, session: AsyncSession | DriverTransaction) -> None:
        """After a claim was not taken: take over the claim that holds the conversation when its holder is a process
        of this host that no longer runs (killed before it could release it), or when it is one this process must
        still release (a start its cancelled turn left running, `left_by_its_start`; a turn's whose release is still
        to come, `_abandoned`); else raise the `ConcurrentTurnError` saying how long that claim still runs. All in the
        caller's transaction.

        The claim's statement cannot know such a claim of this process by itself: its parameters are read before it
        runs, and a start left running may commit its claim after that (the statement waits for that COMMIT): the next
        turn was refused by the claim of its own cancelled start (a flaky test on a loaded machine).
        A holder on another host, or one an earlier version recorded no holder for, is waited out (its lease).

        Raises:
            ConcurrentTurnError: another turn holds a live claim on the conversation (stage 'start').
        """
        holding = await _claim_on(session, self.account_id, self.conversation_id)
        over = None if holding is None else self._takeover(holding)
        if holding is not None and over is not None:
            self.confirmed_at = time.monotonic()
            if await _claimed(session, self._claim_params() | over):
                if over.get('dead_claim_id') is not None:
                    logger.info(
                        'conversation %s: took over the claim of process %s, which no longer runs',
                        self.conversation_id,
                        holding.pid,
                    )
                self.acquired = True
                return
            holding = await _claim_on(session, self.account_id, self.conversation_id)  # taken by another turn first
        error = ConcurrentTurnError(
            self.conversation_id, stage='start', expires_in_s=None if holding is None else holding.expires_in_s
        )
        error.ending_here = None if holding is None else _ending_here(holding.claim_id)
        raise error

    def _takeover(self, holding: _Holding) -> dict[str, object] | None:
        """The parameters that let `_CLAIM` take the conversation from `holding` (None: it cannot, another turn's)."""
        if _dead(holding):
            return {'dead_claim_id': holding.claim_id}
        if holding.claim_id in _left_by_starts or holding.claim_id == _abandoned.get(
            (self.account_id, self.conversation_id)
        ):
            return {'abandoned_claim_id': holding.claim_id}
        return None

    async def check(self) -> str | None:
        """Renew the lease and read the conversation's stored revision, in one statement.

        Returns:
            The stored revision (None while the conversation has none); `lost` is set when the claim is gone.
        """
        started = time.monotonic()
        async with get_db_session(account=self.account_id) as session:
            row = (await session.execute(_CHECK, self._params())).first()
        self._confirmed(started, row is not None)
        if row is not None:
            self.revision, self.knows_revision = row[0], True
        return self.revision

    sql: ClassVar[str] = _CLAIM_SQL
    """The statement that takes a claim (parameters: `params()`), returning a row when it did: a caller may run it
    inside a statement of its own (a chat turn claims and loads its conversation in one,
    `load_recent_conversation(claim=...)`), then says whether it took it (`taken`)."""

    def params(self) -> dict[str, object]:
        """The parameters of `sql` (and of the claim's other statements)."""
        self.confirmed_at = time.monotonic()
        return self._claim_params()

    def taken(self, taken: bool) -> None:
        """Record the outcome of `sql` run by the caller (after `params()`).

        Raises:
            ConcurrentTurnError: another turn holds a live claim on the conversation (stage 'start').
        """
        if not taken:
            raise ConcurrentTurnError(self.conversation_id, stage='start')
        self.acquired = True

    def loaded(self, revision: str | None) -> None:
        """Record the revision the caller loaded in the transaction that took the claim."""
        self.revision, self.knows_revision = revision, True

    def settled(self, *, still_held: bool = False) -> None:
        """Record that the turn's save committed: the claim was deleted by its transaction, or, `still_held` (a save
        that could not delete it: pydantic-ai's generic save), its release starts now in a task of its own.

        Either way the turn's end (`held`) awaits nothing of it: a cancellation arriving after the save committed
        turned a saved turn into `CancelledError` there, and its caller sent the message again. Until that release
        ends, this process's next turn of the conversation takes the claim over, and `claims_released` waits for it.
        """
        if still_held and not self.released and self.releasing is None:
            self.releasing = self._start_release()
        self.released = True

    async def release(self) -> None:
        """Delete the claim if it is still this turn's (repeated once if the connection is lost: idempotent)."""

        async def delete() -> None:
            async with get_db_session(account=self.account_id) as session:
                await session.execute(_RELEASE, self._params())

        await retry_on_disconnect(delete, what='conversation claim release')
        self.released = True

    @asynccontextmanager
    async def held(self) -> AsyncIterator[TurnClaim]:
        """Keep a taken claim alive while the block runs (renewed every third of the lease), release it at the end.

        The release is skipped when the block's own transaction deleted the claim (`settled`); when the database is
        down it is retried in the background until the server is back (bounded by the lease). Until it ends, the
        claim counts as held by this process (`claims_released`).
        """
        loop = asyncio.get_running_loop()
        _stopping.discard(loop)  # turns run on it again: the runtime was started again after a shutdown
        holding = _holding.setdefault(loop, set())
        holding.add(self.claim_id)
        _held_here[self.claim_id] = _HeldHere(asyncio.current_task(), asyncio.Event())
        try:
            async with self._renewed():
                yield self
        finally:
            _held_here.pop(self.claim_id, None)
            releasing = self.releasing
            if releasing is None or releasing.done():
                _let_go(loop, holding, self.claim_id)
            else:  # still held by this process until its release ends (`claims_released` waits for it)
                releasing.add_done_callback(lambda _: _let_go(loop, holding, self.claim_id))

    @asynccontextmanager
    async def _renewed(self) -> AsyncIterator[None]:
        heartbeat: list[asyncio.Task[None]] = []

        def beat() -> None:
            heartbeat.append(asyncio.create_task(_keep_alive(self), name='agentrt-turn-claim'))

        # A timer until the first renewal is due, then a task: most turns end before a third of the lease.
        timer = asyncio.get_running_loop().call_later(self.lease_s / 3, beat)
        try:
            yield
        finally:
            timer.cancel()
            if heartbeat:
                heartbeat[0].cancel()
            # The release starts now, in a task of its own, before anything here awaits: a second cancellation of
            # this task (an outer timeout over an inner one, a task group aborting) cancelled the release's statement
            # and left the conversation claimed for the whole lease (QA). From now on this process's next turn of
            # the conversation takes the claim over (`_abandoned`; the release deletes only this claim).
            release = None if self.released else self._start_release()
            if release is not None:
                self.releasing = release
            here = _held_here.get(self.claim_id)
            if here is not None:
                here.ending.set()
            # Shielded from anyio's cancel scopes (Starlette's cut of a streamed response, `anyio.move_on_after`),
            # which cancel again at every await until they exit. The waits are bounded: a renewal cut mid-statement
            # or a release on a database that hangs gives its connection up slowly (a cancelled turn waited 12 s).
            with anyio.CancelScope(shield=True):
                # Not a release the save started (`settled`): the turn was saved, and the release goes on by itself.
                waiting = [*heartbeat, *([release] if release is not None else [])]
                if waiting:
                    await asyncio.wait(waiting, timeout=RELEASE_WAIT_S)  # never swallows this task's cancellation

    @staticmethod
    def left_by_its_start(claim_id: str, start: asyncio.Future[object], taken: Callable[[], TurnClaim | None]) -> None:
        """The turn's start that takes claim `claim_id` runs on without its caller (cancelled while the database did
        not answer, `undone_if_cancelled(wait_s=...)`): until the claim is released, this process's next turn of the
        conversation takes it over (`refused`), whether the start has taken it yet or not (still looking its tenant
        up, its claim's statement or COMMIT in flight: known by its id, minted before), and once the start has ended
        the claim is released whatever its outcome: a start that failed may have committed it all the same (its COMMIT
        in the hands of a server that had not answered). One that succeeded is given back by its undo (`held`), which
        releases it the same way.

        Args:
            claim_id: the id of the claim the start takes.
            start: the start's task.
            taken: the claim the start made, once it has ended (None: it ended before it had one: nothing to release).
        """
        _left_by_starts.add(claim_id)

        def ended(task: asyncio.Future[object]) -> None:
            claim = taken()
            if claim is None:
                _left_by_starts.discard(claim_id)
            elif task.cancelled() or task.exception() is not None:
                release = claim._start_release()  # idempotent: deletes only this claim, if it is there at all
                _releasing_for_left_starts.add(release)
                release.add_done_callback(_releasing_for_left_starts.discard)
            # Else its undo holds it and releases it (`held`): the release's end forgets it (`_start_release`).

        start.add_done_callback(ended)

    def _start_release(self) -> asyncio.Task[bool]:
        """The release as a task of its own (not the supervisor's: its few places are shared with post-turn work,
        behind which a release waited while other processes were refused), the claim marked abandoned by this
        process until it ends, so this process's next turn of the conversation takes it over meanwhile."""
        release = asyncio.get_running_loop().create_task(self._release_or_defer(), name='agentrt-claim-release')
        key = (self.account_id, self.conversation_id)
        _abandoned[key] = self.claim_id

        def settled(task: asyncio.Task[bool]) -> None:
            deferred = not task.cancelled() and task.exception() is None and task.result()
            if _abandoned.get(key) == self.claim_id and not deferred:
                del _abandoned[key]  # released, or given up (a release deferred to its retries clears it itself)
            _left_by_starts.discard(self.claim_id)  # a deferred release is `_abandoned`'s now
            self.releasing = None

        release.add_done_callback(settled)
        return release

    async def _release_or_defer(self) -> bool:
        """Release the claim; whether its release was deferred until the database is back (`_release_later`)."""
        try:
            await self.release()
        except DatabaseNotInitializedError as exc:  # the runtime was shut down before the release could start
            _left_held(self.conversation_id, self.lease_s, exc)
        except DatabaseUnavailableError as exc:
            # The database is down (the turn most likely failed for the same reason): release the claim once it is
            # back, so the message can be sent again at once rather than after the lease.
            _release_later(self, exc)
            return True
        except Exception as exc:  # the lease expires by itself; the turn's own outcome matters more
            logger.warning(
                'could not release the claim on conversation %s (%s); it expires in %gs',
                self.conversation_id,
                exc,
                self.lease_s,
            )
        return False

    def _confirmed(self, started: float, held: bool) -> None:
        if held:
            self.confirmed_at = max(self.confirmed_at, started)
        self.lost = self.lost or not held

    def _params(self) -> dict[str, object]:
        return {
            'account_id': self.account_id,
            'conversation_id': self.conversation_id,
            'claim_id': self.claim_id,
            'lease_s': self.lease_s,
        }

    def _claim_params(self) -> dict[str, object]:
        abandoned = _abandoned.get((self.account_id, self.conversation_id))
        holder = this_process()
        known = holder.started > 0  # 0: this process's start could not be read (no /proc): name no holder then
        return self._params() | {
            'abandoned_claim_id': abandoned,
            'dead_claim_id': None,
            'holder_host': holder.host if known else None,
            'holder_pid': holder.pid if known else None,
            'holder_started': holder.started if known else None,
        }


@dataclass(frozen=True)
class _Holding:
    """The claim that holds a conversation, as `_HOLDING` reads it."""

    expires_in_s: float
    claim_id: str
    host: str | None
    pid: int | None
    started: float | None


async def _claimed(session: AsyncSession | DriverTransaction, params: dict[str, object]) -> bool:
    """Run `_CLAIM` with `params` in the caller's transaction; whether it took the claim."""
    if isinstance(session, DriverTransaction):
        return bool(await session.fetch(_CLAIM_ON_DRIVER, params))
    return (await session.execute(_CLAIM, params)).first() is not None


async def _claim_on(
    session: AsyncSession | DriverTransaction, account_id: int, conversation_id: str
) -> _Holding | None:
    """The claim on the conversation now (None: none, it was released meanwhile)."""
    params = {'account_id': account_id, 'conversation_id': conversation_id}
    if isinstance(session, DriverTransaction):
        rows = await session.fetch(_HOLDING_ON_DRIVER, params)
        row = rows[0] if rows else None
    else:
        row = (await session.execute(_HOLDING, params)).first()
    return None if row is None else _Holding(float(row[0]), row[1], row[2], row[3], row[4])


def _dead(holding: _Holding) -> bool:
    """Whether the claim's holder is a process of this host that no longer runs (this process is never dead)."""
    if holding.host is None or holding.pid is None or holding.started is None or holding.host != this_host():
        return False
    return not is_alive(holding.pid, holding.started)


@asynccontextmanager
async def conversation_claim(account_id: int, conversation_id: str, *, lease_s: float) -> AsyncIterator[TurnClaim]:
    """Hold the conversation for one turn: claim it, renew the lease while the block runs, release it at the end.

    A chat turn takes its claim in the session that loads the conversation instead (`TurnClaim.take`, `held`).

    Args:
        account_id: the conversation's account.
        conversation_id: the conversation.
        lease_s: how long a claim outlives its last renewal (a crashed process's claim blocks that long).

    Raises:
        ConcurrentTurnError: another turn holds a live claim on the conversation (stage 'start').
        InvalidInputError: `conversation_id` is not an id the store can hold (checked before any SQL).
    """
    claim = TurnClaim.mint(account_id, conversation_id, lease_s=lease_s)

    async def take() -> None:
        async with get_db_session(account=account_id) as session:
            await claim.take(session=session)

    async def give_back(_: None) -> None:
        async with claim.held():  # released as the block ends
            pass

    # Safe to repeat on a fresh connection (a server restarted since the pool's connections were used): see _CLAIM.
    # Taken as a chat turn's start takes its own: cancelled with the COMMIT's reply in flight, the claim stood with
    # nobody to release it, and the process's next turn of the conversation was refused for the lease (QA).
    await undone_if_cancelled(
        retry_on_disconnect(take, what='conversation claim'),
        give_back,
        wait_s=CANCELLED_TAKE_WAIT_S,
        left=lambda start: TurnClaim.left_by_its_start(claim.claim_id, start, lambda: claim),
    )
    async with claim.held():
        yield claim


CANCELLED_TAKE_WAIT_S = 3.0
"""How long `conversation_claim` cancelled while taking its claim waits for the take to end before the cancellation
goes on (a chat turn's start waits as long: `agentrt.agents.chat_turn.CANCELLED_START_WAIT_S` is this value); the take
runs on, its claim released once it ends."""


_holding: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[str]] = weakref.WeakKeyDictionary()
"""The ids of the claims this process holds (turns running, and turns ending: cancelled, releasing theirs), by the
event loop of their turn; a loop that ended with a turn still on it (no finally ran) goes with its entry."""
_none_held: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[asyncio.Event]] = weakref.WeakKeyDictionary()
"""Set when the last claim held on their loop is given up (`claims_released` waits on one)."""
_stopping: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
"""Event loops whose runtime is shutting down: `claims_released` was called there, and no claim taken since. A release
the database does not answer there is left to its lease (`_left_held`), not retried by a background task: one started
after the runtime's supervisor was drained ran on a supervisor nobody drained, and failed after the runtime had shut
down, with a traceback, or was cut by the loop's end with a line saying `shutdown_runtime()` was not called (QA)."""


def _let_go(loop: asyncio.AbstractEventLoop, holding: set[str], claim_id: str) -> None:
    """The claim is no longer this process's (released, or its release given up): wake `claims_released`."""
    holding.discard(claim_id)
    if not holding:
        for waiter in _none_held.get(loop, ()):
            waiter.set()


async def claims_released(timeout: float) -> int:  # noqa: ASYNC109 - a budget for the turns ending
    """Wait until no turn on this event loop holds a conversation, at most `timeout` seconds; before the pool closes.

    A server stopping cancels the requests still running (uvicorn, once its graceful timeout is over) and shuts the
    runtime down at once, while their turns are still ending: closing the pool under them left each conversation
    claimed for the rest of its lease (the next turn, after a restart, was refused as concurrent) and the cancelled
    request's ledger row unwritten.

    From this call until a claim is taken again on this event loop, a release the database does not answer is not
    retried in the background: its conversation stays claimed until its lease expires, or until this process has
    ended for a turn on this host (`TurnClaim.refused`), which a WARNING line says.

    Returns:
        How many claims are still held (logged as a warning): their conversations are free when their leases expire,
        or, for a turn on this host, once this process has ended.
    """
    loop = asyncio.get_running_loop()  # only its turns can end while this waits
    _stopping.add(loop)
    if _holding.get(loop):
        waiter = asyncio.Event()
        _none_held.setdefault(loop, []).append(waiter)
        try:
            await asyncio.wait_for(waiter.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            _none_held[loop].remove(waiter)
            if not _none_held[loop]:
                del _none_held[loop]
    held = len(_holding.get(loop, ()))
    if held:
        logger.warning(
            '%d turn(s) still running or releasing their conversations at shutdown (a tool or a model that does not '
            'return, or a database that does not answer); '
            'their conversations are free when their claims expire, or at once for a turn on this host once this '
            'process has ended',
            held,
        )
    return held


@dataclass(frozen=True)
class _HeldHere:
    """A claim a turn of this process holds: the turn's task, and an event set once the turn is ending (its claim
    handed to its release)."""

    task: asyncio.Task[object] | None
    ending: asyncio.Event


_held_here: dict[str, _HeldHere] = {}
"""The claims turns of this process hold, by claim id (`TurnClaim.held`)."""


def _ending_here(claim_id: str) -> asyncio.Event | None:
    """When the claim is held by a turn of this process that is ending (cancelled: its client went away, a timeout),
    the event set once its claim is handed to its release; else None (another process's, or a running turn's)."""
    here = _held_here.get(claim_id)
    if here is None:
        return None
    task = here.task
    if here.ending.is_set() or task is None or task.done() or task.cancelling():
        return here.ending
    return None


RELEASE_WAIT_S = 1.0
"""How long a turn that ends without its save (cancelled, failed) waits for its claim's release: against a database
that hangs (its connections open and silent) a cancelled turn waited DB_CONNECT_TIMEOUT and the pool's ping, 12 s,
before Ctrl-C gave the prompt back (QA). Past it the release goes on in a task of its own (`_start_release`)."""

_releasing_for_left_starts: set[asyncio.Task[bool]] = set()
"""The releases of claims whose starts failed after their callers left (`TurnClaim.left_by_its_start`), referenced
until they end: nothing else holds them."""

_left_by_starts: set[str] = set()
"""The ids of the claims of starts this process's cancelled turns left running (`TurnClaim.left_by_its_start`), taken
or not yet, until their release ends (or their start ended without one): this process's next turn of the conversation
takes such a claim over (`TurnClaim.refused`)."""

_abandoned: dict[tuple[int, str], str] = {}
"""The claims this process must still release, by (account, conversation): a turn that ended while PostgreSQL was
down left its claim there (`_release_later`). The next turn of the conversation takes such a claim over (`_CLAIM_SQL`):
the release retries with a backoff of up to 2 s, and until then that turn was refused as if another turn held the
conversation for the rest of the lease. An entry leaves when its release ends, however it ends."""


def _forget_the_parents() -> list[object]:
    """In a forked child: the claims the parent's turns hold (or must still release) are the parent's, and so are
    their loop's events; the child's turns take claims of their own (`agentrt.db.forks`)."""
    global _holding, _none_held, _held_here, _abandoned, _left_by_starts, _stopping
    left: list[object] = [_holding, _none_held, _held_here, _abandoned, _left_by_starts, _stopping]
    _holding, _none_held, _held_here, _abandoned = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary(), {}, {}
    _left_by_starts = set()
    _stopping = weakref.WeakSet()
    return left


forget_in_child(_forget_the_parents)


def _release_later(claim: TurnClaim, error: Exception) -> None:
    loop = asyncio.get_running_loop()
    key = (claim.account_id, claim.conversation_id)
    if loop in _stopping:  # no background task once the shutdown began (`_stopping`)
        if _abandoned.get(key) == claim.claim_id:
            del _abandoned[key]
        _left_held(claim.conversation_id, claim.lease_s, error)
        return
    supervisor = get_supervisor()
    _abandoned[key] = claim.claim_id
    try:
        supervisor.spawn(
            _release_when_back,
            claim.account_id,
            claim.conversation_id,
            claim.claim_id,
            claim.lease_s,
            lambda: not supervisor.accepting or loop in _stopping,
            name='release a conversation claim',
            attributes={'gen_ai.conversation.id': claim.conversation_id},
        )
    except (SupervisorClosed, BackgroundQueueFull):
        if _abandoned.get(key) == claim.claim_id:
            del _abandoned[key]  # nothing will release it: only its lease frees the conversation
        logger.warning(
            'could not release the claim on conversation %s (%s); it expires in %gs',
            claim.conversation_id,
            error,
            claim.lease_s,
        )


async def _release_when_back(
    account_id: int, conversation_id: str, claim_id: str, lease_s: float, shutting_down: Callable[[], bool]
) -> None:
    """Retry releasing a claim, with backoff, until the database answers or the lease would have expired anyway, or
    the process is shutting down: its drain would wait for a server that may stay down, and the lease frees the
    conversation by itself (a refused turn says how long it is still held)."""
    try:
        await _release_with_backoff(TurnClaim(account_id, conversation_id, claim_id, lease_s), shutting_down)
    finally:
        if _abandoned.get((account_id, conversation_id)) == claim_id:
            del _abandoned[account_id, conversation_id]


async def _release_with_backoff(claim: TurnClaim, shutting_down: Callable[[], bool]) -> None:
    conversation_id, lease_s = claim.conversation_id, claim.lease_s
    deadline = asyncio.get_running_loop().time() + lease_s
    delay = 0.1
    while True:
        await asyncio.sleep(delay)
        try:
            await claim.release()
            return
        except DatabaseNotInitializedError as exc:  # the runtime was shut down meanwhile
            _left_held(conversation_id, lease_s, exc)
            return
        except DatabaseUnavailableError as exc:
            if shutting_down():
                _left_held(conversation_id, lease_s, exc)
                return
            if asyncio.get_running_loop().time() + delay > deadline:
                return  # expired by now: the next turn takes it over
            delay = min(delay * 2, 2.0)


def _left_held(conversation_id: str, lease_s: float, error: Exception) -> None:
    """Say, in one line, that a claim this process is stopping without is left to its lease."""
    logger.warning(
        'conversation %s stays claimed: its release did not reach PostgreSQL as the process stopped (%s); it is free '
        'when its claim expires (in %gs at most), or at once for a turn on this host once this process has ended',
        conversation_id,
        'the runtime had shut down' if refused_after_shutdown(error) else error,
        lease_s,
    )


async def _keep_alive(claim: TurnClaim) -> None:
    """Renew now (a third of the lease has passed), then every third of the lease until the claim is lost."""
    while True:
        try:
            await claim.check()  # the renewal also tells the turn guard the conversation's revision
        except Exception as exc:  # a database blip: the lease still has two thirds to run
            if refused_after_shutdown(exc):
                return  # no renewal can come any more: the claim is left to its lease, which its release's line says
            logger.warning('could not renew the claim on conversation %s (%s)', claim.conversation_id, exc)
        if claim.lost:
            return
        await asyncio.sleep(claim.lease_s / 3)
