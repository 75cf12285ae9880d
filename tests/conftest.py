"""Test harness: one real PostgreSQL per test run, state reset before every test.

The server is the embedded one, started in a temporary directory, or the server in `DATABASE_URL`
when that is set (its runtime tables are truncated between tests: never point it at data you keep).
With xdist workers, each worker has a database of its own on that one server.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

if TYPE_CHECKING:
    from agentrt.db.settings import Settings
    from agentrt.services.ledger import LLMRequestTracker
    from tests.pgbouncer import PgBouncer, PooledDatabase
    from tests.private_database import PrivateDatabase
    from tests.table_reset import TableReset

# The runtime is imported by the fixtures, not here: the xdist controller loads this file too, runs no test, and
# starts the workers only once it is loaded (importing the runtime here made every run start 1.3 s later).

TEST_POOL_SIZE = 5
TEST_MAX_OVERFLOW = 5


def _test_settings(data_dir: Path, database_url: str | None) -> Settings:
    from agentrt.db.settings import Settings

    return Settings(
        database_url=database_url,
        data_dir=data_dir,
        pool_size=TEST_POOL_SIZE,
        max_overflow=TEST_MAX_OVERFLOW,
        pool_timeout=30,
        model='demo',
    )


def _set_up_test_process() -> None:
    """In a process that runs tests: no test may reach a real model provider, and no span may leave the machine."""
    import logfire
    import pydantic_ai.models

    pydantic_ai.models.ALLOW_MODEL_REQUESTS = False
    logfire.configure(send_to_logfire=False, console=False)


_table_reset: TableReset | None = None


SHARED_SERVER_ENV = 'AGENTRT_TEST_SHARED_SERVER'
"""Set by the xdist controller for its workers: the data directory of the run's one embedded server."""


class _EarlyServer:
    """The run's embedded PostgreSQL, started by a short-lived process of its own while the tests are collected
    (`initdb` and the first start take about 1.3 s, mostly in PostgreSQL's own programs).

    With xdist the controller starts it, before its workers exist, and names its data directory to them
    (`SHARED_SERVER_ENV`): each worker adopts it, as a CLI process does with a server whose starter has exited, and
    makes a database of its own on it (`tests/worker_database.py`); the last worker to leave stops it. One server
    instead of one per worker saved about 5 s of a 90 s run on 2 cores: a second `initdb` and server start, and a
    second set of server processes. Without xdist (`-n 0`) the test process starts it for itself. Started only
    without `DATABASE_URL`; should the starter fail, `database` starts it itself."""

    def __init__(self) -> None:
        self._root: Path | None = None
        self._starter: subprocess.Popen[bytes] | None = None

    def start(self) -> Path:
        """Start the server in a new directory; return its data directory (the server is up once `started()`)."""
        self._root = self._make_root()
        data_dir = self._root / 'data'
        code = 'import pathlib, sys\nfrom agentrt.db.embedded import start_embedded\n'
        code += 'start_embedded(pathlib.Path(sys.argv[1]), stop_at_exit=False)'
        self._starter = subprocess.Popen(
            [sys.executable, '-c', code, str(data_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # Reaped as soon as it ends: a zombie still counts as the server's user (its pid and start time are there),
        # and the last worker to leave would not stop the server.
        threading.Thread(target=self._starter.wait, name='early-server-reaper', daemon=True).start()
        # Stopped at exit even if no test adopts it (a collection error): the last user (none here) stops it.
        atexit.register(_release_embedded, data_dir)
        return data_dir

    async def started(self) -> Path:
        """The directory the server's data is in (`data/` under it), once the starter has finished."""
        if self._root is None:
            self._root = self._make_root()
        if self._starter is not None:
            await asyncio.to_thread(self._starter.wait)
        return self._root

    @staticmethod
    def _make_root() -> Path:
        root = Path(tempfile.mkdtemp(prefix='agentrt-test-pg-'))
        # atexit runs handlers last-in first-out: registered before the server starts (whose stop handler comes
        # later), the directory goes only after the server has stopped.
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        return root


def _release_embedded(data_dir: Path) -> None:
    if not (data_dir / 'postmaster.pid').exists():
        return  # stopped by its last user (a worker): the xdist controller need not import the runtime to see that
    from agentrt.db.embedded import release_embedded

    release_embedded(data_dir)


_early_server = _EarlyServer()


@pytest_asyncio.fixture(scope='session', autouse=True)
async def database() -> AsyncIterator[Settings]:
    """Start (or connect to) PostgreSQL once, migrated to head, for the whole run (for each xdist worker).

    The embedded server's data lives in a directory this process creates for itself, not under pytest's shared
    basetemp, which another run's clean-up may delete while this one is using it: each xdist worker has a server
    of its own. With `DATABASE_URL`, each worker uses a database of its own on that server (`worker_database`).
    """
    global _table_reset
    from sqlalchemy import text

    from agentrt.agents.runtime import shutdown_runtime
    from agentrt.db.engine import get_engine, init_database
    from tests.table_reset import TableReset
    from tests.worker_database import drop_worker_database, worker_database

    _table_reset = TableReset()
    given = external = os.environ.get('DATABASE_URL') or None
    worker = os.environ.get('PYTEST_XDIST_WORKER')
    shared = os.environ.get(SHARED_SERVER_ENV) if worker and not given else None
    if shared:  # the controller's server: adopted (the last worker to leave stops it)
        from agentrt.db.embedded import start_embedded

        server = await asyncio.to_thread(start_embedded, Path(shared))
        given = server.url().render_as_string(hide_password=False)
        data_dir = Path(shared)
    else:
        data_dir = await _early_server.started() / 'data'
    if given and worker:
        external = await worker_database(given, worker)
        os.environ['DATABASE_URL'] = external  # the CLI in-process and subprocesses read it
    settings = _test_settings(data_dir, external)
    await init_database(settings, migrate=True)
    if settings.uses_embedded or shared:
        # A throwaway cluster: durability buys nothing here and costs seconds per run.
        async with get_engine().connect() as conn:
            await conn.execute(text('COMMIT'))
            await conn.execute(text('ALTER SYSTEM SET fsync = off'))
            await conn.execute(text('ALTER SYSTEM SET synchronous_commit = off'))
            await conn.execute(text('SELECT pg_reload_conf()'))
    yield settings
    await _table_reset.drop_snapshot()
    await shutdown_runtime()
    if given and external != given:
        await drop_worker_database(given, external)
    if shared:
        os.environ.pop('DATABASE_URL', None)  # it named this worker's database, now gone
        # Here, not at exit: an xdist worker ends without running its exit handlers. The last worker stops it.
        from agentrt.db.embedded import release_embedded

        await asyncio.to_thread(release_embedded, Path(shared))


@pytest_asyncio.fixture(scope='session')
async def private_database(database: Settings) -> AsyncIterator[PrivateDatabase]:
    """A PostgreSQL of the run's own (with SSL when Debian's PostgreSQL 15 is installed), migrated and seeded, for
    what must not happen to the shared server: restarts, killed backends, SSL. Made on first use only (its tests
    share the xdist group `private-database`, so one worker makes it)."""
    from tests.private_database import PrivateDatabase

    private = await PrivateDatabase.create()
    yield private
    await private.close()


@pytest.fixture(scope='session')
def pgbouncer(database: Settings) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction mode in front of the shared test server, with a budget of 4 server connections (so
    the runtime's 5 + 5 client connections share them, as behind a production pooler). `.ci/run` installs it; a run
    without it skips the pooler tests, except in CI where that is a failure."""
    from agentrt.db.engine import get_engine
    from tests.pgbouncer import bouncer_for

    bouncer = bouncer_for(get_engine().url, pool_size=4)  # skipped without pgbouncer (a failure in CI)
    bouncer.start()
    yield bouncer
    bouncer.stop()


@pytest_asyncio.fixture(scope='session')
async def pooled_database(database: Settings, pgbouncer: PgBouncer) -> AsyncIterator[PooledDatabase]:
    """The runtime on the shared server through `pgbouncer`, in the pooler mode (`DB_POOLER=pgbouncer`)."""
    from tests.pgbouncer import PooledDatabase

    pooled = await PooledDatabase.create(pgbouncer, database)
    yield pooled
    await pooled.close()


@pytest_asyncio.fixture
async def empty_database(database: Settings) -> AsyncIterator[str]:
    """The name of a new database on the test server with no table at all (never migrated), dropped afterwards."""
    from sqlalchemy import text

    from agentrt.db.engine import get_engine

    name = f'empty_{uuid.uuid4().hex[:8]}'
    admin = get_engine().execution_options(isolation_level='AUTOCOMMIT')
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE {name}'))
    yield name
    async with admin.connect() as conn:
        await conn.execute(text(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)'))


@pytest.fixture(scope='session')
def database_url(database: Settings) -> str:
    """A URL other processes (CLI and script tests) can use to reach the test server."""
    from agentrt.db.engine import get_engine

    return get_engine().url.render_as_string(hide_password=False)


@pytest_asyncio.fixture(autouse=True)
async def clean_database(request: pytest.FixtureRequest, database: Settings) -> AsyncIterator[None]:
    """Before each test: every runtime table empty, or holding exactly the demo data when the test asks for
    `demo_data` (tests/table_reset.py does only the work the last test made necessary). Afterwards, let the test's
    background work finish, and the process's ledger write what the test's turns queued: a row held for the commit
    delay would otherwise be committed into the next test's tables."""
    from agentrt.services.background import drain_supervisor
    from agentrt.services.ledger import get_request_tracker

    assert _table_reset is not None  # made by `database`
    await _table_reset.reset(demo='demo_data' in request.fixturenames)
    yield
    await drain_supervisor(30)
    async with asyncio.timeout(30):
        await get_request_tracker().flush()


@pytest.fixture
def demo_data(clean_database: None) -> None:
    """The seeded demo accounts, agents and directories: exactly the rows `seed_demo_data()` writes (put in place by
    `clean_database`, which sees this fixture among the test's)."""


@pytest.fixture
def allow_loopback_model_requests() -> Iterator[None]:
    """Model requests allowed while the test runs (the test process forbids them: `_set_up_test_process`), for the
    modules whose models talk only to the loopback OpenAI-compatible server (`tests/fake_openai.py`). A module opts
    in with `pytestmark = pytest.mark.usefixtures('allow_loopback_model_requests')`."""
    from pydantic_ai.models import override_allow_model_requests

    with override_allow_model_requests(True):
        yield


@pytest_asyncio.fixture
async def tracker(tmp_path: Path) -> AsyncIterator[LLMRequestTracker]:
    """A ledger tracker of the test's own (a private spool, fast retries), flushed when the test ends."""
    from agentrt.services.ledger import LLMRequestTracker
    from tests.factories import fast_config

    tracker = LLMRequestTracker(fast_config(tmp_path))
    yield tracker
    await tracker.flush()


@pytest_asyncio.fixture
async def two_accounts(clean_database: None) -> tuple[int, int]:
    """Two accounts of their own, `alpha` and `beta` (no demo data): their ids."""
    from sqlalchemy import insert

    from agentrt.db.models import Account
    from agentrt.db.session import Unscoped, get_db_session

    async with get_db_session(account=Unscoped.ADMIN) as session:
        result = await session.execute(
            insert(Account).returning(Account.id),
            [{'slug': 'alpha', 'name': 'Alpha'}, {'slug': 'beta', 'name': 'Beta'}],
        )
        alpha, beta = result.scalars().all()
    return alpha, beta


class _AsyncioErrors(logging.Handler):
    """Collects what asyncio reports through logging rather than warnings: "Task was destroyed but it is
    pending", "Task exception was never retrieved", errors in callbacks. Any of them fails the run."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # What a CI log needs to find it again: asyncio's first line, the task, what it raised, and the test running.
        lines = [line.strip() for line in self.format(record).splitlines() if line.strip()]
        task = next((line for line in lines[1:] if line.startswith(('future:', 'task:', 'handle:'))), '')
        raised = lines[-1] if len(lines) > 2 else ''
        test = os.environ.get('PYTEST_CURRENT_TEST', 'between tests')
        self.messages.append(' | '.join(part[:300] for part in (lines[0] if lines else '', task, raised, test) if part))


_asyncio_errors = _AsyncioErrors()
logging.getLogger('asyncio').addHandler(_asyncio_errors)


_PRIVATE_BASETEMP = pytest.StashKey[Path]()
_PASSED = pytest.StashKey[bool]()
_WORKER_ASYNCIO_ERRORS = pytest.StashKey[list[str]]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Give the run a temporary directory of its own unless `--basetemp` names one.

    pytest's default base (`/tmp/pytest-of-<user>/`) is shared: a run that starts later prunes old entries there,
    and would delete the data directory of a server this run still uses.
    """
    # The Python processes the run starts (xdist workers, the CLI, scripts, `agentrt serve`) keep the bytecode they
    # compile: with PYTHONDONTWRITEBYTECODE set (as in CI containers) each one compiled agentrt's modules afresh,
    # about 0.4 s of CPU a process. (`__pycache__/` is ignored by git.)
    os.environ.pop('PYTHONDONTWRITEBYTECODE', None)
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix='agentrt-pytest-')
        config.stash[_PRIVATE_BASETEMP] = Path(config.option.basetemp)
    # What the runtime keeps beside its data directory (the ledger's spool and its lock files, the chat history) goes
    # under the run's own directory, not the user's home, for the commands the tests run with only a DATABASE_URL.
    os.environ.setdefault('AGENTRT_DATA_DIR', str(Path(config.option.basetemp) / 'agentrt' / 'pgdata'))
    if _starts_workers(config) and not os.environ.get('DATABASE_URL'):
        # Before xdist starts the workers (its own pytest_configure comes last), so they inherit the variable.
        os.environ[SHARED_SERVER_ENV] = str(_early_server.start())


def _starts_workers(config: pytest.Config) -> bool:
    """Whether this process is an xdist controller about to start workers (not a worker, not `-n 0`)."""
    if hasattr(config, 'workerinput') or config.getoption('collectonly'):
        return False
    return bool(config.getoption('numprocesses', None)) and config.getoption('dist', 'no') != 'no'


def pytest_sessionstart(session: pytest.Session) -> None:
    """Before collection, in a process that runs tests (an xdist worker, or the run with `-n 0`), not in the xdist
    controller (which only hands tests out: it need not import the runtime)."""
    if not session.config.pluginmanager.has_plugin('dsession'):
        if not os.environ.get('DATABASE_URL') and not os.environ.get(SHARED_SERVER_ENV):
            _early_server.start()
        _set_up_test_process()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Keep the garbage collector's work in proportion in a process that runs tests.

    What exists once the tests are collected (modules, classes, functions, the collected items: objects that live
    until the process ends) is moved out of its way (`gc.freeze()`): each collection of the oldest generation walked
    them all. And it looks for cycles after 10,000 new objects rather than 700 (the older generations in proportion):
    a test process holds far more long-lived objects than a program, so each full pass cost about 0.1 s. Measured on
    the tests of `agents/` and `api/` in one process: 4.7 s of its 37 s of CPU in the collector before, 1.3 s after.
    Every cycle of garbage is still collected (and the run ends with a full collection, `pytest_sessionfinish`),
    only less often.
    """
    if not session.config.pluginmanager.has_plugin('dsession'):
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the run's own temporary directory (left in place when tests failed, to look at)."""
    private = config.stash.get(_PRIVATE_BASETEMP, None)
    if private is not None and config.stash.get(_PASSED, False):
        shutil.rmtree(private, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Iterator[None]:
    """The tests of `private_database` (a PostgreSQL server per process, made on first use) share one xdist worker
    (`--dist loadgroup`); then `_xdist_group_ids`, once pytest-xdist's own hook has run.

    The tests that want the demo rows run first, one after the other (a stable sort: each keeps its place among its
    kind; the workers take tests in this order): between two of them the 4,500 rows stay in place, while each switch
    from a test without them to one with them copied them back (about 0.1 s of the server's CPU, 30 times a run).
    Within each kind, the tests that hand `database_url` to another process (CLI, scripts, `agentrt serve`: 1.5 to 10
    s each) come first, so the run ends on short tests and neither worker waits long for the other at the end.
    """
    for item in items:
        if 'private_database' in getattr(item, 'fixturenames', ()):
            item.add_marker(pytest.mark.xdist_group('private-database'))
    items.sort(key=_run_order)
    yield
    _xdist_group_ids(config, items)


def _run_order(item: pytest.Item) -> tuple[bool, bool]:
    fixtures = getattr(item, 'fixturenames', ())
    return 'demo_data' not in fixtures, 'database_url' not in fixtures


def _xdist_group_ids(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`--dist loadgroup` tells the controller a test's group by appending `@group` to the node id; pytest-xdist 3.8
    writes it where pytest 9.2 no longer reads it (pytest-dev/pytest-xdist#1386), so every group would be spread over
    the workers. Here the suffix goes where pytest reads the id. A no-op when xdist already did it (older pytest, a
    fixed xdist) and outside an xdist worker. Grouping only saves work: a test run in another worker still passes."""
    if getattr(config, 'workerinput', None) is None or not config.getoption('loadgroup', False):
        return
    for item in items:
        marks = item.iter_markers('xdist_group')
        names = sorted({str(mark.args[0] if mark.args else mark.kwargs.get('name', 'default')) for mark in marks})
        node_id = getattr(item, '_id', None)
        if names and '@' not in item.nodeid and hasattr(node_id, 'parse'):
            item._id = node_id.parse(f'{item.nodeid}@{"_".join(names)}')  # type: ignore[attr-defined,union-attr]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, pytest.TestReport]:
    """A failure's report even when CPython 3.11's "AST constructor recursion depth mismatch" (python/cpython#106905,
    intermittent, reported from threaded programs) hits pytest as it parses the failing test's source for the
    traceback: in CI it made one failure an INTERNALERROR that ended the whole run and hid the failure. The report is
    made again (the error does not repeat), else told without a traceback."""
    try:
        return (yield)
    except SystemError as exc:
        if 'recursion depth mismatch' not in str(exc):
            raise
        glitch = exc
    for _ in range(3):
        try:
            return pytest.TestReport.from_item_and_call(item, call)
        except SystemError as exc:
            glitch = exc
    error = call.excinfo.value if call.excinfo is not None else None
    return pytest.TestReport(
        item.nodeid,
        item.location,
        dict.fromkeys(item.keywords, 1),
        'failed',
        f'{type(error).__name__}: {error}\n(no traceback: {glitch})',
        call.when,
        duration=call.duration,
        start=call.start,
        stop=call.stop,
    )


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """In the xdist controller: keep what asyncio reported in a worker (`pytest_sessionfinish` sent it)."""
    output = getattr(node, 'workeroutput', None) or {}
    node.config.stash.setdefault(_WORKER_ASYNCIO_ERRORS, []).extend(output.get('asyncio_errors', []))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if asyncio logged a pending task, an unretrieved exception or a callback error.

    An xdist worker hands its reports to the controller (a worker's exit status does not reach the run's).
    """
    gc.collect()  # destroyed-pending-task reports come from garbage collection
    messages = list(_asyncio_errors.messages)
    worker_output = getattr(session.config, 'workeroutput', None)
    if worker_output is not None:
        worker_output['asyncio_errors'] = messages
        return
    messages += session.config.stash.get(_WORKER_ASYNCIO_ERRORS, [])
    if messages:
        print('\nasyncio reported errors during the run:')
        for message in messages:
            print(f'  - {message}')
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    session.config.stash[_PASSED] = session.exitstatus == 0
