"""A stop signal from the first instant of an `agentrt` command (`agentrt.agents.cli_entry`): one line, 128 + the
signal, never a traceback or a process killed where it stood.

Each test runs the command line in a new interpreter whose import of one module (`SLOW`) waits until the test has
sent its signal: the moment a command is in, a few tenths of a second after its start, is then the one the test means.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap

import pytest

from tests.agents.cli.helpers import ROOT
from tests.ports import free_port

STOPPED = 'error: stopped by {}; nothing in progress was saved\n'

# The program: an import of `slow` waits (announced by a line), then `python -m agentrt ARGS...` runs; its exit
# handler prints a line, so a test sees the process exit through the interpreter's clean path.
PROGRAM = textwrap.dedent(
    """
    import atexit, importlib.abc, runpy, sys, time

    slow = sys.argv[1]

    class Slow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == slow:
                print('importing', flush=True)
                time.sleep(60)
            return None

    sys.meta_path.insert(0, Slow())
    atexit.register(lambda: print('exited', flush=True))
    sys.argv = ['agentrt', *sys.argv[2:]]
    runpy.run_module('agentrt', run_name='__main__')
    """
)


async def stopped_while_importing(
    slow: str, signum: signal.Signals, *args: str, env: dict[str, str] | None = None
) -> tuple[int | None, str, str]:
    """Run `agentrt ARGS...`, send `signum` while it imports `slow`; its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        '-c',
        PROGRAM,
        slow,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
        assert line == b'importing\n', (line, await process.stderr.read())  # type: ignore[union-attr]
        process.send_signal(signum)
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
async def test_a_signal_while_the_command_line_imports_is_one_line(signum: signal.Signals) -> None:
    # The console script imports the command line (typer, rich: about 0.1 s) before any command runs: a Ctrl-C then
    # was a KeyboardInterrupt traceback, a SIGTERM or SIGHUP killed the process on the spot (exit status -15).
    code, out, err = await stopped_while_importing('agentrt.agents.cli', signum, 'costs')
    assert (code, out, err) == (128 + signum, 'exited\n', STOPPED.format(signum.name))


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_while_a_command_loads_is_one_line(signum: signal.Signals) -> None:
    # A command's module is imported when it runs (its own imports: the runtime, about 0.5 s). A Ctrl-C then ended
    # with exit code 130 and not a word (typer's answer to KeyboardInterrupt); a SIGTERM killed the process.
    code, out, err = await stopped_while_importing('agentrt.agents.cli.costs', signum, 'costs')
    assert (code, out, err) == (128 + signum, 'exited\n', STOPPED.format(signum.name))


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_while_serve_loads_the_app_after_its_database_check_is_a_clean_stop(
    signum: signal.Signals, database_url: str
) -> None:
    # `agentrt serve` starts (and migrates) the database in `run`, then imports uvicorn and the app before uvicorn's
    # own signal handling: a SIGTERM there killed the process on the spot, and with the embedded PostgreSQL its user
    # id stayed registered and the server running; a Ctrl-C ended it with 130 and not a word. Now it exits through the
    # interpreter's clean path (`exited`: the embedded server's release is such an exit handler), with exit code 0 as
    # a stop of a serving server does, and one line.
    port = free_port()
    code, out, err = await stopped_while_importing(
        'agentrt.api.app', signum, 'serve', '--port', str(port), env={'DATABASE_URL': database_url}
    )
    assert (code, out, err.splitlines()[-1:]) == (0, 'exited\n', [f'serve stopped by {signum.name} before it served'])
    assert 'Traceback' not in err


@pytest.mark.parametrize(
    ('slow', 'command'),
    [('agentrt.agents.cli', 'serve'), ('agentrt.agents.cli.worker', 'worker'), ('agentrt.agents.cli.serve', 'serve')],
)
async def test_a_stop_of_a_server_command_while_it_loads_ends_it_as_a_stop_does(slow: str, command: str) -> None:
    # README: `agentrt serve` and `agentrt worker` exit 0 when stopped (systemd counts 143 as a failure). Stopped in
    # their first few tenths of a second, while the CLI still loaded them, they ended with 143 and an `error:` line.
    code, out, err = await stopped_while_importing(slow, signal.SIGTERM, '--verbose', command)
    assert (code, out, err) == (0, 'exited\n', f'{command} stopped by SIGTERM before it started\n')
