"""The `agentrt` command line."""

from __future__ import annotations

import typer

from agents.cli_chat import chat
from agents.cli_db import db_app
from agents.cli_ledger import audit_app, costs, ledger_app
from agents.cli_support import setup_logging
from agents.runtime import configure_observability

app = typer.Typer(
    name='agentrt',
    help='Pydantic AI chat agents on PostgreSQL, with a database session per operation.',
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(db_app, name='db')
app.command('chat')(chat)
app.add_typer(audit_app, name='audit')
app.command('costs')(costs)
app.add_typer(ledger_app, name='ledger')


@app.callback()
def _root(verbose: bool = typer.Option(False, '--verbose', '-v', help='Show debug logs.')) -> None:
    setup_logging(verbose)
    configure_observability()


def main() -> None:
    """Console entry point."""
    app()


if __name__ == '__main__':
    main()
