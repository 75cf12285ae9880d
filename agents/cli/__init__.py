"""The `agentrt` command line: `chat`, `db`, `audit`, `costs`, `ledger`, `keys` and `serve`, one module each."""

from __future__ import annotations

import typer

from agentrt.agents.cli.audit import audit_app
from agentrt.agents.cli.chat import chat
from agentrt.agents.cli.costs import costs
from agentrt.agents.cli.database import db_app
from agentrt.agents.cli.keys import keys_app
from agentrt.agents.cli.ledger import ledger_app
from agentrt.agents.cli.serve import serve
from agentrt.agents.cli.support import AgentrtGroup, set_debug, setup_logging
from agentrt.agents.runtime import configure_observability

app = typer.Typer(
    name='agentrt',
    help='Pydantic AI chat agents on PostgreSQL, with a database session per operation.',
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=AgentrtGroup,
)
app.add_typer(db_app, name='db')
app.command('chat')(chat)
app.add_typer(audit_app, name='audit')
app.command('costs')(costs)
app.add_typer(ledger_app, name='ledger')
app.add_typer(keys_app, name='keys')
app.command('serve')(serve)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, '--verbose', '-v', help='Show debug logs.'),
    debug: bool = typer.Option(False, '--debug', help='Show the traceback of an error (also AGENTRT_DEBUG=1).'),
) -> None:
    set_debug(debug)
    setup_logging(verbose)
    configure_observability()


def main() -> None:
    """Console entry point (`agentrt`, `python -m agentrt.agents.cli`)."""
    app()
