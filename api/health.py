"""Health: `GET /health/live` (the process answers) and `GET /health/ready` (the database answers within a second,
at the schema this version expects; the pool and the background work of this process). No API key needed."""

from __future__ import annotations

import asyncio
import logging
from functools import lru_cache

from fastapi import APIRouter
from sqlalchemy import text
from starlette.responses import JSONResponse

from agentrt.api.errors import new_error_id
from agentrt.api.schemas import BackgroundOut, DatabaseOut, LiveOut, PoolOut, ReadyOut
from agentrt.db.engine import pool_status
from agentrt.db.errors import DatabaseNotInitializedError
from agentrt.db.migrate import head_revision, known_revisions
from agentrt.db.session import Unscoped, get_read_only_session
from agentrt.services.background import get_supervisor

logger = logging.getLogger('agentrt.api')

router = APIRouter(prefix='/health', tags=['health'])

READY_TIMEOUT_S = 1.0


@router.get('/live', summary='Liveness')
async def live() -> LiveOut:
    """The process is up and its event loop answers."""
    return LiveOut(status='alive')


@router.get(
    '/ready',
    summary='Readiness',
    response_model=ReadyOut,
    responses={503: {'model': ReadyOut, 'description': 'Not ready: the database is slow, down or behind.'}},
)
async def ready() -> JSONResponse:
    """200 when the database answers within a second at the expected schema revision (or one a newer version
    migrated); 503 otherwise."""
    database = await _check_database()
    try:
        pool = PoolOut(**pool_status().__dict__)
    except DatabaseNotInitializedError:
        pool = None
    stats = get_supervisor().stats()
    background = BackgroundOut(running=stats.running, queued=stats.queued, failed=stats.failed)
    # A schema a newer version migrated (a rolling upgrade, a rollback of the package): the process runs on it, with a
    # warning at its start (`upgrade_if_behind`), as every command does; only a schema behind is not ready.
    ahead = database.revision is not None and database.revision not in _known()
    ok = database.ok and (database.revision == database.head or ahead)
    body = ReadyOut(status='ready' if ok else 'unavailable', database=database, pool=pool, background=background)
    return JSONResponse(body.model_dump(mode='json'), status_code=200 if ok else 503)


async def _check_database() -> DatabaseOut:
    head = _head()
    # The read in a task of its own, waited for at most READY_TIMEOUT_S: a timeout around the session itself answered
    # only once the session's clean-up under the cancellation was done, about 2 s more on a hung connection (QA: 3 s,
    # and a probe with Kubernetes' default timeout of 1 s failed on the client's side). Given up, it is cancelled and
    # its clean-up (the connection back to the pool, or discarded) goes on after the answer.
    check = asyncio.create_task(_read_revision(), name='readiness: database check')
    try:
        await asyncio.wait({check}, timeout=READY_TIMEOUT_S)
    finally:  # the timeout, or this request cancelled (its client gone): the check is given up either way
        if not check.done():
            _give_up(check)
    if not check.done():  # a frozen or lock-blocked server: logged once as a refused connection is (it was not; QA)
        cause = f'no answer within {READY_TIMEOUT_S:g} s'
        error_id = _failed(cause)
        return DatabaseOut(ok=False, revision=None, head=head, error=f'{cause} (error id {error_id})')
    try:
        revision = check.result()
    except DatabaseNotInitializedError as exc:
        if not exc.never_started:  # shut down, or a start that failed: as the driver's errors below
            return _unreachable(head, exc)
        # Not "unreachable" (QA): nothing tried to start the runtime (`create_app(manage_runtime=False)` and a
        # program that does not), which no wait mends.
        error_id = _failed(NEVER_STARTED_CAUSE)
        return DatabaseOut(ok=False, revision=None, head=head, error=f'{NEVER_STARTED_CAUSE} (error id {error_id})')
    except Exception as exc:  # whatever the driver raises, readiness answers: not ready, and why is in the log
        return _unreachable(head, exc)
    _answered()
    return DatabaseOut(ok=True, revision=revision, head=head)


NEVER_STARTED_CAUSE = (
    'the runtime was never started: create_app(manage_runtime=False) leaves it to the program around the app, and '
    'nothing started it (README "Serving over HTTP")'
)


def _unreachable(head: str | None, exc: Exception) -> DatabaseOut:
    """Not ready: the database check failed on `exc` (logged once, `_failed`)."""
    error_id = _failed(f'{type(exc).__name__}: {exc}')
    return DatabaseOut(ok=False, revision=None, head=head, error=f'unreachable (error id {error_id})')


async def _read_revision() -> str | None:
    async with get_read_only_session(account=Unscoped.NO_TENANT) as session:
        revision: str | None = (
            await session.execute(text('SELECT version_num FROM alembic_version'))
        ).scalar_one_or_none()
        return revision


_given_up: set[asyncio.Task[str | None]] = set()
"""Checks given up on and still ending: the event loop holds a task only weakly."""


def _give_up(check: asyncio.Task[str | None]) -> None:
    """Cancel `check` and let it end (its session's clean-up) without anyone waiting for it."""
    check.cancel()
    _given_up.add(check)
    check.add_done_callback(_ended)


def _ended(check: asyncio.Task[str | None]) -> None:
    """A check given up on has ended: its outcome is retrieved (no "Task exception was never retrieved"); the answer
    it was given up for already said what mattered."""
    _given_up.discard(check)
    if not check.cancelled() and (exc := check.exception()) is not None:
        logger.debug('readiness: a database check given up on ended with %s: %s', type(exc).__name__, exc)


class _Outage:
    """The failure of the readiness check logged last in this process, until a check succeeds.

    A load balancer or Kubernetes asks every few seconds, each server process answers: during an outage every probe
    logged a WARNING with the same cause, a line per probe and process for as long as it lasted. Now a cause is logged
    once (again when it changes), the probes that repeat it answer with its error id, and the first check that
    succeeds says so once.
    """

    error_id: str | None = None
    cause: str | None = None
    repeats = 0


def _failed(cause: str) -> str:
    """Log `cause` unless it is the one logged last; the error id that names it in the log."""
    if _Outage.error_id is None or _Outage.cause != cause:
        _Outage.error_id, _Outage.cause, _Outage.repeats = new_error_id(), cause, 0
        logger.warning(
            '%s readiness: database check failed: %s (not logged again until it changes or a check succeeds)',
            _Outage.error_id,
            cause,
        )
    else:
        _Outage.repeats += 1
        logger.debug('%s readiness: database check failed again: %s', _Outage.error_id, cause)
    return _Outage.error_id


def _answered() -> None:
    """A check succeeded: end the outage logged, if any, with one line."""
    if _Outage.error_id is not None:
        logger.info(
            'readiness: the database answers again (after %s, and %d more failed check(s))',
            _Outage.error_id,
            _Outage.repeats,
        )
        _Outage.error_id, _Outage.cause, _Outage.repeats = None, None, 0


@lru_cache(maxsize=1)
def _known() -> frozenset[str]:
    """Every packaged revision (read from the migration files once per process)."""
    return known_revisions()


@lru_cache(maxsize=1)
def _head() -> str | None:
    """The packaged head revision (read from the migration files once per process)."""
    return head_revision()
