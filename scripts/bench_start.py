"""A benchmark's start: Ctrl-C or SIGTERM before `bench_common.run_benchmark` takes over ends it at once, with one
line and exit status 130 (README "Benchmarks"), not SIGTERM's silent 143 or a KeyboardInterrupt traceback (QA).

`bench_common` imports this module before anything else of its own: its imports (pydantic-ai, SQLAlchemy, the
runtime) are most of a benchmark's first 2 s, and nothing is written before `run_benchmark` runs. The handlers are set
only when the program is a script of this folder run from its main thread: a test or a program that imports the
benchmarks keeps its own.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

BEFORE_START = 'interrupted before it started: it added nothing'
"""What a benchmark stopped during its imports says."""


def stop_at_once(signum: int, frame: FrameType | None) -> None:
    """A signal handler: say `BEFORE_START` and exit with status 130; a second signal changes nothing."""
    ignore_stops()
    print(BEFORE_START, file=sys.stderr)
    raise SystemExit(130)


def ignore_stops() -> None:
    """Ignore Ctrl-C and SIGTERM for the rest of the process: what is left of a benchmark that ended (or was stopped)
    is its exit, whose exit handlers stop the embedded server (bounded: `pg_ctl stop`'s 30 s). A signal then raised
    KeyboardInterrupt in them: a traceback and exit 0, or a silent 143 (QA); its exit status is the one it earned.

    Only the main thread may set a handler: a benchmark run in another (a test's, in-process) keeps the process's.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def started() -> None:
    """Give Ctrl-C and SIGTERM back their default handlers, if `stop_at_once` is still theirs: `run_benchmark` (and
    `asyncio.run`, which answers Ctrl-C only in place of the default handler) takes over from here, and a script's
    child process that runs a server (`bench_http.py --serve-child`) stops as the server does."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) is stop_at_once:
            signal.signal(signum, default)


def _a_script_of_this_folder() -> bool:
    main = getattr(sys.modules.get('__main__'), '__file__', None)
    return main is not None and Path(main).resolve().parent == Path(__file__).resolve().parent


if _a_script_of_this_folder() and threading.current_thread() is threading.main_thread():
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where it was ignored (`script &`)
        signal.signal(signal.SIGINT, stop_at_once)
    signal.signal(signal.SIGTERM, stop_at_once)
