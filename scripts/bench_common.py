"""Shared helpers for the benchmark scripts: database start-up, pool meter, tables, JSON output."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import logging
import math
import os
import platform
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import bench_start  # first: Ctrl-C and SIGTERM during the imports below end the benchmark with one line
from pydantic_ai import Agent, ModelResponse, RunContext, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage, PartDeltaEvent, PartStartEvent, TextPartDelta, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from agentrt.agents.demo_model import SCHEMAS_LINE, next_response
from agentrt.agents.simple_chat import BASE_INSTRUCTIONS
from agentrt.db.engine import build_engine, current_settings, get_engine, init_database
from agentrt.db.errors import ConfigError, DatabaseUnavailableError, EmbeddedPostgresError, MigrationError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.db.settings import Settings, default_data_dir
from agentrt.services.ledger._rollups import (
    _COUNTERS,
    _GROUP_BY_KEY,
    _LEDGER_AGGREGATES,
    _LEDGER_KEY,
    _LOCK_EXCLUSIVE,
    _LOCK_KEYS,
)
from agentrt.services.tenancy import lookup_tenant
from agentrt.tools.dependencies import SessionDependencies
from agentrt.tools.directory_tools import directory_toolset

try:  # the runtime's one reading of config['schemas']; earlier versions (a before column) read the list as it is
    from agentrt.services.tenancy import configured_schemas
except ImportError:  # pragma: no cover

    def configured_schemas(config: dict[str, Any]) -> list[str] | None:  # type: ignore[misc]
        return config.get('schemas')


ROOT = Path(__file__).resolve().parents[1]
N = TypeVar('N', int, float)


def parser(description: str, name: str) -> BenchParser:
    """An argument parser with the options every benchmark takes: `--out` and `--quick`."""
    return BenchParser(description, name)


class BenchParser(argparse.ArgumentParser):
    """A benchmark's argument parser: `--out` and `--quick`, the output path resolved and checked as it parses.

    Without `--out`, the figures go to `bench-results/<name>.json`, or `<name>-quick.json` with `--quick`: a quick
    check wrote over the full run's figures (QA). The path is checked before anything runs: one that cannot be
    written failed only when the figures were written, after the whole run (QA).
    """

    def __init__(self, description: str, name: str) -> None:
        super().__init__(description=description)
        self.name = name
        self.add_argument(
            '--out',
            type=Path,
            default=None,
            help=f'JSON output path (default: bench-results/{name}.json; with --quick, {name}-quick.json)',
        )
        self.add_argument('--quick', action='store_true', help='tiny parameters, for the smoke test')

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Parse as argparse does, then resolve `--out`'s default and check that it can be written."""
        opts, extra = super().parse_known_args(args, namespace)
        if opts.out is None:
            opts.out = ROOT / 'bench-results' / (f'{self.name}-quick.json' if opts.quick else f'{self.name}.json')
        # A script's child process (`--child`) writes no figures: its parent checked its own path.
        if not getattr(opts, 'child', None):
            problem = out_problem(opts.out)
            if problem:
                self.error(f'--out {opts.out}: {problem}')
        return opts, extra


def out_problem(out: Path) -> str | None:
    """Why the figures cannot be written to `out` (as `write_results` writes them), or None if they can.

    Tried, not guessed from permissions (root may write anywhere but /proc), and left as found: an existing file is
    opened for append (its content kept), a new one is made and removed, and so are the directories made for it.
    """
    if out.is_dir():
        return 'is a directory'
    made: list[Path] = []
    try:
        for folder in reversed(out.parents):
            if not folder.exists():
                folder.mkdir()
                made.append(folder)
        existed = out.exists()
        with out.open('a'):
            pass
        if not existed:
            out.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
    return None


def positive_int(value: str) -> int:
    """An integer above 0 (an argparse type: a count of turns, rounds, runs...)."""
    return _number(value, int, 'a positive integer', lambda n: n > 0)


def non_negative_int(value: str) -> int:
    """An integer of 0 or more (an argparse type, where 0 means none)."""
    return _number(value, int, 'an integer of 0 or more', lambda n: n >= 0)


def positive_float(value: str) -> float:
    """A number above 0 (an argparse type: a window, a timeout...)."""
    return _number(value, float, 'a number above 0', lambda n: n > 0)


def non_negative_float(value: str) -> float:
    """A number of 0 or more (an argparse type: a latency, where 0 means none)."""
    return _number(value, float, 'a number of 0 or more', lambda n: n >= 0)


def int_list(value: str) -> list[int]:
    """Parse `1,2,4` into `[1, 2, 4]` (an argparse type); each a positive integer, at least one."""
    return _numbers(value, positive_int)


def float_list(value: str) -> list[float]:
    """Parse `0,0.25` into `[0.0, 0.25]` (an argparse type); each a number of 0 or more, at least one."""
    return _numbers(value, non_negative_float)


def _number(value: str, kind: Callable[[str], N], what: str, fits: Callable[[N], bool]) -> N:
    try:
        number = kind(value)
    except ValueError:
        number = None
    # NaN and infinity are no count of seconds either: `float('nan') > 0` is False, `inf` would never end.
    if number is None or not fits(number) or not math.isfinite(number):
        raise argparse.ArgumentTypeError(f'{value!r} is not {what}')
    return number


def _numbers(value: str, one: Callable[[str], N]) -> list[N]:
    parts = [part.strip() for part in value.split(',') if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f'{value!r} is not a comma-separated list of numbers')
    try:
        return [one(part) for part in parts]
    except argparse.ArgumentTypeError as exc:
        if len(parts) == 1:
            raise
        raise argparse.ArgumentTypeError(f'{exc} (in {value!r})') from None


def run_script_forked(script: str, args: Sequence[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `script ARGS` as `__main__` in a child forked from this process, with `env` as its environment; return
    its exit code and its output (stdout and stderr together).

    For a benchmark that measures each mode in a process of its own: a forked child has this process's imports (a new
    interpreter importing the runtime costs about 2 s of CPU before it measures anything) and none of what the child
    sets up (tracing, the database, read from `env` when it starts). Call it only where no event loop runs and no
    database connection is open: the child would share them.

    A Ctrl-C or SIGTERM (`KeyboardInterrupt` here) is passed on to the child as a Ctrl-C, which runs its clean-up, and
    the child is waited for before the interrupt goes on here: the parent said "its clean-up ran" while its child
    wrote rows for 17 s more (QA). The child runs in a process group of its own, so a terminal's Ctrl-C reaches it
    only through its parent: one Ctrl-C is one, not two, which would cut its clean-up short.
    """
    with tempfile.TemporaryFile('w+') as output:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            # The parent's exit handlers are not the child's: one of them removes the parent's temporary directories.
            atexit._clear()
            try:
                os.setpgid(0, 0)  # signals reach it through its parent only (`_waited_for`)
                os.dup2(output.fileno(), 1)
                os.dup2(output.fileno(), 2)
                os.environ.clear()
                os.environ.update(env)
                sys.argv = [script, *args]
                runpy.run_path(script, run_name='__main__')
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if not isinstance(stop.code, int | None):  # its message, on stderr as the interpreter prints it
                    print(stop.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                # The child's own exit handlers run (the embedded server's release), then it ends here: unwinding
                # into the parent's frames would run the parent's clean-up in the child.
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        status = _waited_for(pid)
        output.seek(0)
        return os.waitstatus_to_exitcode(status), output.read()


def _waited_for(pid: int) -> int:
    """The wait status of the forked child `pid`, once it has ended; each interrupt meanwhile passed on to it (then
    raised): a second one cuts its clean-up short, as here, so `run_benchmark` says so."""
    interrupts, stops = 0, {signal.SIGINT, signal.SIGTERM}
    blocked = False
    while True:
        try:
            if blocked:
                # A stop that came while the last was passed on is raised here, inside the `try`, and counted: raised
                # in the `except` below, it escaped uncounted and the child unwaited for (CI: the child, told, stopped
                # its parent again before the parent was back in its wait).
                blocked = False
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
            with contextlib.suppress(OSError):  # the child's own call may have come first (or it ended)
                os.setpgid(pid, pid)
            _, status = os.waitpid(pid, 0)
            break
        except KeyboardInterrupt:
            signal.pthread_sigmask(signal.SIG_BLOCK, stops)
            blocked = True
            interrupts += 1
            os.kill(pid, signal.SIGINT)
    if interrupts:
        _clean_ups.started += 1
        if interrupts == 1:  # the child's clean-up ran to its end
            _clean_ups.ended += 1
        raise KeyboardInterrupt
    return status


def bench_data_dir() -> Path:
    """The embedded server's data directory for a benchmark: `AGENTRT_DATA_DIR` when set, else its own
    `bench-pgdata` directory beside the default data directory, so benchmark rows never land in the user's own
    ledger."""
    return Path(os.environ.get('AGENTRT_DATA_DIR') or default_data_dir().parent / 'bench-pgdata')


def use_temporary_spool() -> None:
    """Put the ledger's spool in a new temporary directory unless `AGENTRT_LEDGER_SPOOL` is set: rows a benchmark
    spools (the database away, a restart) must not land in, or be replayed from, the user's own spool. The directory
    is removed at exit: each run left one in /tmp (QA)."""
    if 'AGENTRT_LEDGER_SPOOL' not in os.environ:
        spool_dir = tempfile.mkdtemp(prefix='bench-spool-')
        atexit.register(shutil.rmtree, spool_dir, True)
        os.environ['AGENTRT_LEDGER_SPOOL'] = f'{spool_dir}/ledger.jsonl'


def clean_up_on_sigterm() -> None:
    """Make SIGTERM do what Ctrl-C does, so a benchmark stopped by it runs its clean-up (its `finally:` deletes its
    rows and accounts): killed by the default handler, it left them all (QA). `run_benchmark` calls it, before the
    benchmark's entry point (its arguments, its event loop).

    Ctrl-C's handler is asked, whichever it is then: `asyncio.run`'s cancels the main task, so the clean-up runs in
    it. A `KeyboardInterrupt` raised wherever the signal landed (a ledger writer's task, a worker thread's join) left
    rows the writer recorded after the clean-up, and once a process waiting for its idle worker threads for ever
    (QA: 2 of 12 SIGTERMs).

    Only the main thread may set a handler: a script run in another (a test's, in-process) keeps the process's.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _as_ctrl_c)


def _as_ctrl_c(signum: int, frame: FrameType | None) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, frame)
        return
    raise KeyboardInterrupt


INTERRUPTED = 'interrupted; its clean-up ran: the rows it added are removed'
"""What `run_benchmark` says when a benchmark is stopped (its `finally:` blocks have run by then)."""

CUT_SHORT = 'interrupted again during its clean-up, which was cut short: rows it added may be left in the database'
"""What `run_benchmark` says when a second Ctrl-C stopped a clean-up (`run_clean_up`) before its end."""

SETUP_ERRORS = (DatabaseUnavailableError, ConfigError, EmbeddedPostgresError, MigrationError)
"""A database that cannot be reached or set up: said in one line by `run_benchmark`."""


@dataclass
class _CleanUps:
    """How many clean-ups (`run_clean_up`) this process started and how many ran to their end."""

    started: int = 0
    ended: int = 0


_clean_ups = _CleanUps()


async def run_clean_up(*steps: Callable[[], Awaitable[object]]) -> None:
    """Run a benchmark's clean-up (its `finally:` block): `steps` one after another, to their end whatever cancels the
    benchmark meanwhile; then go on with that cancellation.

    A Ctrl-C or SIGTERM landing as the clean-up started (just after `summary:`) cancelled its await under way and
    skipped the rest: the rows stayed, and `run_benchmark` said they were removed (QA). So the steps run in a task of
    their own, which the main task's cancellation (`asyncio.run`'s answer to the first Ctrl-C) does not reach; the
    cancellation is raised once they have ended, so the benchmark still stops (exit 130). A second Ctrl-C raises
    `KeyboardInterrupt` and may cut them short: `run_benchmark` then says so (`CUT_SHORT`).

    Args:
        steps: what to await, in order (flush the ledger before deleting its rows: rows it still held were written
            after the delete).

    Raises:
        asyncio.CancelledError: the benchmark was stopped meanwhile (after the steps), or the steps were cancelled.
        Exception: what a step raised (the later steps do not run).
    """
    _clean_ups.started += 1
    work = asyncio.ensure_future(_in_order(steps))
    stopped = False
    while not work.done():
        try:
            await asyncio.wait([work])
        except asyncio.CancelledError:
            stopped = True  # noted, and raised once the steps have ended
    work.result()
    if stopped:
        raise asyncio.CancelledError


async def _in_order(steps: Sequence[Callable[[], Awaitable[object]]]) -> None:
    for step in steps:
        await step()
    _clean_ups.ended += 1


def run_benchmark(entry: Callable[[], object], *, interrupted: str = INTERRUPTED, cut_short: str = CUT_SHORT) -> None:
    """Run a benchmark's entry point (`lambda: asyncio.run(main())`) as its `__main__` block.

    Ctrl-C and SIGTERM (`clean_up_on_sigterm`, set here; before, during the imports, `bench_start`'s) end it with
    `interrupted` on one line and exit status 130, once its
    clean-up has run (the exception reaches here through its `finally:` blocks), or with `cut_short` when a clean-up
    of `run_clean_up` did not reach its end (a second Ctrl-C during it); a database that cannot be reached or set up
    ends it with one `error:` line (the server's host and port in it) and status 1. Both were tracebacks, a chained
    one for an interrupt (QA). Once the entry has ended (either way), Ctrl-C and SIGTERM are ignored
    (`bench_start.ignore_stops`): the process's exit is all that is left, and its status is the one the run earned.

    Args:
        entry: runs the benchmark to its end.
        interrupted: what to say when it is stopped: what its clean-up did.
        cut_short: what to say when its clean-up was stopped too: what may be left.
    """
    bench_start.started()
    clean_up_on_sigterm()
    try:
        entry()
    except KeyboardInterrupt:
        bench_start.ignore_stops()  # first: a signal now would interrupt this line, or the exit handlers
        # The tasks the interrupt cut off (SIGTERM raises it inside one) are collected at exit, each logged by
        # asyncio as "exception was never retrieved" with its traceback: what stopped them is said here instead.
        logging.getLogger('asyncio').setLevel(logging.CRITICAL)
        print(cut_short if _clean_ups.ended < _clean_ups.started else interrupted, file=sys.stderr)
        raise SystemExit(130) from None
    except SETUP_ERRORS as exc:
        print(f'error: {" ".join(str(exc).split())}', file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        # Its entry has ended, either way: the process exits now (its exit handlers stop the embedded server).
        bench_start.ignore_stops()


async def start_database(*, pool_size: int, max_overflow: int, pool_timeout: float) -> None:
    """Start the runtime's engine: `DATABASE_URL` if set, else the embedded server in `bench_data_dir()`."""
    data_dir = bench_data_dir()
    settings = Settings(data_dir=data_dir, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout)
    await init_database(settings)


async def machine_info() -> dict[str, Any]:
    """The machine and server the figures were taken on, and the load when the run started."""
    names = "'server_version', 'fsync', 'synchronous_commit'"
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = await session.execute(text(f'SELECT name, setting FROM pg_settings WHERE name IN ({names})'))
        server = dict(rows.tuples().all())
    return _host_info() | {
        'postgresql': server.get('server_version'),
        'fsync': server.get('fsync'),
        'synchronous_commit': server.get('synchronous_commit'),
        'embedded': get_engine().url.host is None,
    }


def _host_info() -> dict[str, Any]:
    meminfo = Path('/proc/meminfo').read_text().splitlines()
    mem_kib = next((int(line.split()[1]) for line in meminfo if line.startswith('MemTotal')), 0)
    git = ['git', 'rev-parse', '--short', 'HEAD']
    commit = subprocess.run(git, cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    return {
        'cpus': os.cpu_count(),
        'memory_gib': round(mem_kib / 2**20, 1),
        'python': platform.python_version(),
        'load_average_at_start': [round(x, 2) for x in os.getloadavg()],
        'git_commit': commit or None,
        'when': datetime.now(UTC).isoformat(timespec='seconds'),
    }


@dataclass
class PoolMeter:
    """Counts pool checkouts: peak connections checked out at once and connection-seconds held."""

    current: int = 0
    peak: int = 0
    checkouts: int = 0
    held_s: float = 0.0
    _since: dict[int, float] = field(default_factory=dict)

    def attach(self) -> PoolMeter:
        """Listen to the engine's pool (the listeners survive `engine.dispose()`)."""
        event.listen(get_engine().sync_engine, 'checkout', self._checkout)
        event.listen(get_engine().sync_engine, 'checkin', self._checkin)
        return self

    def reset(self) -> None:
        """Zero the counters; connections checked out now keep being timed."""
        self.peak, self.checkouts, self.held_s = self.current, 0, 0.0

    def _checkout(self, dbapi_conn: Any, record: Any, proxy: Any) -> None:
        self._since[id(record)] = time.perf_counter()
        self.current += 1
        self.checkouts += 1
        self.peak = max(self.peak, self.current)

    def _checkin(self, dbapi_conn: Any, record: Any) -> None:
        started = self._since.pop(id(record), None)
        if started is not None:
            self.current -= 1
            self.held_s += time.perf_counter() - started


async def server_busy_s() -> dict[str, float]:
    """The database's own counters (seconds): time executing statements and time idle in a transaction.

    PostgreSQL flushes a backend's counters when it exits, so the pool is disposed first.
    """
    await get_engine().dispose()
    await asyncio.sleep(0.3)
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(text('SELECT pg_stat_clear_snapshot()'))
        query = 'SELECT active_time, idle_in_transaction_time FROM pg_stat_database WHERE datname = current_database()'
        row = (await session.execute(text(query))).one()
    return {'active_s': row[0] / 1000, 'idle_in_transaction_s': row[1] / 1000}


async def warm_pool(connections: int) -> None:
    """Open `connections` pooled connections at once and return them, so a measurement starts with a warm pool."""
    engine = get_engine()
    ready = asyncio.Event()
    opened = 0

    async def hold() -> None:
        nonlocal opened
        async with engine.connect() as conn:
            await conn.execute(text('SELECT 1'))
            opened += 1
            if opened == connections:
                ready.set()
            await ready.wait()

    await asyncio.gather(*(hold() for _ in range(connections)))


@dataclass
class LoadRun:
    """What a closed-loop run measured."""

    latencies: list[float]
    outcomes: Counter[str]
    failures: Counter[str]
    elapsed_s: float
    cpu_s: float
    loop_lag_p95_s: float | None
    cpu_started: float = 0.0
    """`time.process_time()` when the run started (to count work the calls deferred past it)."""


async def closed_loop(
    workers: int, window: float, op: Callable[[int], Awaitable[Any]], *, spread: float = 0.0
) -> LoadRun:
    """`workers` tasks call `op(worker)` back to back, starting new calls for `window` s; calls in flight finish.

    Each worker starts at a random moment within the first `spread` seconds, as independent users would. Failures
    are counted by kind (`pool_timeout` for a pool checkout timeout), non-None results by value. A probe measures
    how late the event loop wakes a 5 ms sleep: CPU saturation of this process shows there.
    """
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    lags: list[float] = []
    started, cpu = time.perf_counter(), time.process_time()

    async def worker(i: int) -> None:
        await asyncio.sleep(random.uniform(0, spread))
        while time.perf_counter() - started < window:
            begin = time.perf_counter()
            try:
                result = await op(i)
            except Exception as exc:
                cause = root_cause(exc)
                failures['pool_timeout' if isinstance(cause, sa_exc.TimeoutError) else type(cause).__name__] += 1
                continue
            latencies.append(time.perf_counter() - begin)
            if result is not None:
                outcomes[str(result)] += 1

    async def lag_probe() -> None:
        while True:
            begin = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - begin - 0.005)

    probe = asyncio.create_task(lag_probe())
    try:
        await asyncio.gather(*(worker(i) for i in range(workers)))
    finally:
        probe.cancel()
    cpu_started = cpu
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return LoadRun(latencies, outcomes, failures, elapsed, cpu, percentile(lags, 95), cpu_started)


async def wait_ready(
    httpx2: Any, url: str, process: subprocess.Popen[Any], *, seconds: float, exited: Callable[[], str]
) -> None:
    """Poll `url`'s `/health/ready` every 0.1 s until it answers 200, for at most `seconds`.

    Raises:
        RuntimeError: the server process exited first (with `exited()`'s description), or it never got ready.
    """
    async with httpx2.AsyncClient(base_url=url, timeout=2) as client:
        for _ in range(int(seconds * 10)):
            if process.poll() is not None:
                raise RuntimeError(f'server exited ({process.returncode}): {exited()}')
            try:
                if (await client.get('/health/ready')).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f'server did not start within {seconds:g} s')


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float | None) -> float | None:
    """Seconds to milliseconds, rounded to 0.1 ms."""
    return None if seconds is None else round(seconds * 1000, 1)


async def delete_chats(prefix: str, *, account: Unscoped = Unscoped.OWNER) -> None:
    """Remove the conversations (entries, claims) and ledger rows of chats whose ids start with `prefix-`."""
    pattern = {'p': f'{prefix}-%'}
    async with get_db_session(account=account) as session:
        await delete_ledger_rows(session, 'r.chat_session_id LIKE :p', pattern)
        heads = text(
            'WITH RECURSIVE chain(id) AS (SELECT head_id FROM conversations WHERE conversation_id LIKE :p '
            'UNION SELECT e.parent_id FROM conversation_entries AS e JOIN chain ON e.id = chain.id '
            'WHERE e.parent_id IS NOT NULL) SELECT id FROM chain WHERE id IS NOT NULL'
        )
        ids = list((await session.execute(heads, pattern)).scalars())
        await session.execute(text('DELETE FROM conversations WHERE conversation_id LIKE :p'), pattern)
        await session.execute(text('DELETE FROM conversation_turns WHERE conversation_id LIKE :p'), pattern)
        await session.execute(text('DELETE FROM conversation_entries WHERE id = ANY(:ids)'), {'ids': ids})


async def budgets_on(account: str) -> int:
    """How many budgets `account` (a slug) has in this database. The demo turn has none; with one, every model
    request takes a hold first (a session of its own), and the budget keeps what a benchmark spends."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return (await session.execute(_BUDGETS_ON, {'slug': account})).scalar_one()  # type: ignore[no-any-return]


_BUDGETS_ON = text('SELECT count(*) FROM account_budgets b JOIN accounts a ON a.id = b.account_id WHERE a.slug = :slug')


async def delete_ledger_rows(session: AsyncSession, where: str, params: dict[str, Any]) -> None:
    """Delete the ledger rows `where` selects (an SQL condition on `r`, an `llm_requests` row) and take those already
    counted back out of the daily usage rollup, in `session`'s transaction.

    The rollup keeps a deleted ledger row's usage (a retention job's deletions must not change the books), so the
    rows a benchmark deleted were still counted: `agentrt costs` showed requests and a cost on the demo account that
    its ledger did not have (QA). Under the roll-up's exclusive lock, so no roll-up counts a row between the two.

    A budget period of their account keeps what they spent: dropping the period to rebuild it from the ledger also
    dropped the holds of that account's requests in flight (their cascade), and those requests' charges with them
    (QA), and a period's own settlements cannot be undone row by row.
    """
    await session.execute(_LOCK_EXCLUSIVE, _LOCK_KEYS)
    taken_out = ', '.join(f'{name} = b.{name} - s.{name}' for name in _COUNTERS)
    await session.execute(
        text(f"""
        WITH gone AS (
            DELETE FROM usage_rolled_up_requests AS u USING llm_requests AS r
            WHERE u.request_id = r.id AND ({where}) RETURNING u.request_id
        ), sums AS (
            SELECT {_LEDGER_KEY}, {_LEDGER_AGGREGATES} FROM llm_requests AS r JOIN gone ON gone.request_id = r.id
            WHERE r.status <> 'refused' GROUP BY {_GROUP_BY_KEY}
        )
        UPDATE usage_daily_rollups AS b SET {taken_out}, updated_at = now() FROM sums AS s
        WHERE b.day = s.day AND b.account_id = s.account_id
          AND b.agent_instance_id IS NOT DISTINCT FROM s.agent_instance_id
          AND b.agent_name IS NOT DISTINCT FROM s.agent_name AND b.model IS NOT DISTINCT FROM s.model
        """),
        params,
    )
    await session.execute(text('DELETE FROM usage_daily_rollups WHERE requests <= 0'))
    await session.execute(text(f'DELETE FROM llm_requests AS r WHERE {where}'), params)


def print_config(title: str, config: dict[str, Any]) -> None:
    """Print the benchmark's title and configuration."""
    print(title)
    for key, value in config.items():
        print(f'  {key}: {value}')


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str | Callable[[dict], Any]]]) -> None:
    """Print `rows` as a plain aligned table; each column is (header, key or function of the row)."""
    cells = [[_cell(get(row) if callable(get) else row.get(get)) for _, get in columns] for row in rows]
    headers = [header for header, _ in columns]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print('  '.join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print('  '.join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def _cell(value: Any) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:.2f}' if abs(value) < 100 else f'{value:.0f}'
    return str(value)


def write_results(
    out: Path, name: str, config: dict[str, Any], machine: dict[str, Any], results: list, summary: dict
) -> None:
    """Write the run's figures as JSON: benchmark, config, machine, results (one object per row), summary."""
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {'benchmark': name, 'config': config, 'machine': machine, 'results': results, 'summary': summary}
    out.write_text(json.dumps(payload, indent=2, default=str) + '\n')
    print(f'figures written to {out}')


def scripted_model(
    tool_name: str, calls: int, *, latency: float = 0.0, args: Callable[[int], dict[str, Any]] | None = None
) -> FunctionModel:
    """A model that waits `latency` s per request, asks for `calls` tool calls in one response, then answers."""

    async def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if latency:
            await asyncio.sleep(latency)
        if not calls or any(isinstance(p, ToolReturnPart) for p in messages[-1].parts):
            return ModelResponse(parts=[TextPart('done')])
        make = args or (lambda i: {'n': i})
        return ModelResponse(parts=[ToolCallPart(tool_name, make(i), tool_call_id=f'c{i}') for i in range(calls)])

    return FunctionModel(respond, model_name=f'scripted-{calls}x{tool_name}')


def root_cause(exc: BaseException) -> BaseException:
    """The innermost interesting exception (follows groups, `__cause__` and `__context__`)."""
    while True:
        if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            return exc


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    """Await `fn()` and return the wall time in seconds."""
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


def demo_planner_model(latency: float) -> FunctionModel:
    """The demo planner (`agents.demo_model`) waiting `latency` s before each response or stream.

    Named `gpt-4o-mini` so that pydantic-ai prices its (estimated) usage with genai-prices, as for a real model.
    """

    async def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await asyncio.sleep(latency)
        move = next_response(messages, info)
        return ModelResponse(parts=[TextPart(move)] if isinstance(move, str) else list(move))

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        await asyncio.sleep(latency)
        move = next_response(messages, info)
        if isinstance(move, str):
            for chunk in re.findall(r'\s*\S+', move) or [move]:
                yield chunk
            return
        for index, call in enumerate(move):
            yield {index: DeltaToolCall(call.tool_name, call.args_as_json_str(), tool_call_id=call.tool_call_id)}

    return FunctionModel(respond, stream_function=stream, model_name='gpt-4o-mini')


def bare_directory_agent(capabilities: Sequence[Any] = ()) -> Agent[SessionDependencies, str]:
    """The simple_chat agent's instructions and toolset with nothing of the runtime attached (no capabilities, unless
    given: the overhead breakdown adds the ledger without stored content)."""
    agent: Agent[SessionDependencies, str] = Agent(
        deps_type=SessionDependencies,
        name='simple_chat',
        instructions=BASE_INSTRUCTIONS,
        toolsets=[directory_toolset],
        capabilities=list(capabilities),
    )

    @agent.instructions
    async def _tenant(ctx: RunContext[SessionDependencies]) -> str:  # as in agents/simple_chat.py
        schemas = ', '.join(configured_schemas(ctx.deps.config) or []) or 'none configured'
        return f'Account: {ctx.deps.account_slug}. {SCHEMAS_LINE} {schemas}.'

    return agent


async def bare_dependencies(session_id: str, account: str) -> SessionDependencies:
    """Deps for runs of `bare_directory_agent`: the account's first agent instance, as the tenant lookup finds it.
    Kept across runs, so whether the account has a budget is left unknown (each request checks)."""
    async with get_db_session(account=Unscoped.TENANT_LOOKUP) as session:
        tenant = await lookup_tenant(account, None, session=session)
    return SessionDependencies(
        session_id=session_id,
        account_id=tenant.account_id,
        account_slug=tenant.account_slug,
        agent_instance_id=tenant.agent_instance_id,
        agent_instance_slug=tenant.agent_instance_slug,
        agent_type=tenant.agent_type,
        config=tenant.config,
    )


def is_text_delta(event: Any) -> bool:
    """True for a streamed event that carries answer text."""
    if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
        return bool(event.part.content)
    return (
        isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta) and bool(event.delta.content_delta)
    )


def legacy_engine() -> AsyncEngine:
    """An engine configured as legacy applications commonly do: `pool_pre_ping=True`, a ping on every checkout.

    The runtime only pings connections that sat idle (`DB_POOL_PRE_PING_IDLE`). The shared-session failure is a
    race: it shows as SQLAlchemy's concurrent-operations error whenever a call finds the session still
    provisioning its connection (a ping, a new connection), and as silently serialised queries otherwise.
    """
    return build_engine(get_engine().url, current_settings().model_copy(update={'pool_pre_ping_idle': 0}))
