"""`agentrt keys create|list|revoke`: API keys for the HTTP API (`agentrt serve`)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING

import typer

from agentrt.agents.cli.filters import JSON_OPTION, check_account
from agentrt.agents.cli.output import text_cells, utc_text
from agentrt.agents.cli.pipes import reader_left
from agentrt.agents.cli.support import (
    EXIT_FAILURE,
    EXIT_USAGE,
    console,
    err_console,
    error_line,
    fail,
    operator_session,
    print_json,
    run,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from agentrt.services.api_keys import ApiKeyInfo, NewApiKey

# agentrt.db.models.API_KEY_SCOPES, not imported here (`keys --help` stays fast; a test checks they agree).
API_KEY_SCOPES = ('chat', 'read')


keys_app = typer.Typer(
    help='API keys for the HTTP API: one account per key, shown once, revocable.', no_args_is_help=True
)


_SCOPE_OPTION = typer.Option(
    list(API_KEY_SCOPES), '--scope', help=f'A scope to grant ({", ".join(API_KEY_SCOPES)}); repeat for several.'
)


@keys_app.command('create')
def create(
    account: str = typer.Option(..., '--account', help='The account slug the key speaks for.'),
    name: str = typer.Option('', '--name', help='A label to tell keys apart (e.g. the client using it).'),
    scope: list[str] = _SCOPE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a key and print it: this is the only time the whole key is shown."""
    from agentrt.services.api_keys import create_api_key

    created: NewApiKey = run(
        operator_session, lambda s: create_api_key(session=s, account=account, name=name, scopes=scope)
    )
    try:
        if as_json:
            print_json({'key': created.token, **asdict(created.info)})
        else:
            typer.echo(created.token)
        delivered = _delivered()
    except OSError:  # a full disk under `> key.txt`: written in part, or not at all
        delivered = False
    if not delivered:
        # Its only showing went nowhere: the key could never be used, and stayed active (exit 0, "store it now").
        from agentrt.services.api_keys import revoke_api_key

        run(operator_session, lambda s: revoke_api_key(session=s, key=created.info.public_id))
        fail(
            'the key could not be printed (standard output is closed or full, or its reader left), and a key never '
            f'shown cannot be used: {created.info.public_id} was revoked. Run the command again with its output kept',
            EXIT_FAILURE,
        )
    if as_json:
        return
    try:
        err_console.print(
            f'API key {created.info.public_id} for account {created.info.account_slug!r} '
            f'(scopes: {", ".join(created.info.scopes)}). Store it now: it is not shown again.',
            highlight=False,
        )
    except OSError:  # a full stderr: the key reached its reader, so the command did what it was asked (exit 0)
        err_console.quiet = True


def _delivered() -> bool:
    """Whether what was printed reached standard output: it is open, and its reader did not leave."""
    stream = sys.stdout
    if stream is None:  # the descriptor was closed when the process started (`>&-`)
        return False
    try:
        stream.flush()
    except (OSError, ValueError):
        return False
    return not reader_left()


@keys_app.command('list')
def list_keys(
    account: str | None = typer.Option(None, '--account', help='Only this account slug.'),
    include_revoked: bool = typer.Option(False, '--all', help='Revoked keys too.'),
    as_json: bool = JSON_OPTION,
) -> None:
    """List keys (never their secrets), oldest first."""
    from rich.table import Table

    from agentrt.services.api_keys import list_api_keys

    async def listed(session: AsyncSession) -> list[ApiKeyInfo]:
        keys = await list_api_keys(session=session, account=account, include_revoked=include_revoked)
        if not keys:
            await check_account(session, account)
        return keys

    keys: list[ApiKeyInfo] = run(operator_session, listed)
    if as_json:
        print_json([asdict(key) for key in keys])
        return
    table = Table(title=f'API keys ({len(keys)})', title_justify='left')
    for column in ('id', 'account', 'name', 'scopes', 'created (UTC)', 'last used (UTC)', 'revoked (UTC)'):
        table.add_column(column, no_wrap=column == 'id', overflow='fold')
    for key in keys:
        table.add_row(
            *text_cells(
                key.public_id,
                key.account_slug,
                key.name or '-',
                ','.join(key.scopes),
                _when(key.created_at),
                _when(key.last_used_at),
                _when(key.revoked_at),
            )
        )
    console.print(table)


@keys_app.command('revoke')
def revoke(
    key: str = typer.Argument(..., help='The key id (art_ and 12 hex digits, as `keys list` shows it) or the key.'),
    as_json: bool = JSON_OPTION,
) -> None:
    """Revoke a key: servers refuse it within AGENTRT_API_KEY_CACHE_SECONDS (30 s by default)."""
    from agentrt.services.api_keys import is_key_id, quoted_key_argument, revoke_api_key

    if not is_key_id(key):  # a wrong argument (exit 2, as `audit show` says of a malformed id), found before any I/O
        # What was pasted may be most of a key: quoted no further than a public id goes, and redacted (`fail` is not).
        error_line(f'not an API key id: {quoted_key_argument(key)} (expected art_ and 12 hex digits)')
        raise typer.Exit(EXIT_USAGE)

    async def revoking(session: AsyncSession) -> tuple[ApiKeyInfo, bool]:
        from sqlalchemy import func, select

        # The transaction's now(), which a revoke stamps: a key stamped earlier was revoked before this command.
        now = (await session.execute(select(func.now()))).scalar_one()
        revoked = await revoke_api_key(session=session, key=key)
        return revoked, revoked.revoked_at != now

    revoked, already = run(operator_session, revoking)
    if as_json:
        print_json({**asdict(revoked), 'already_revoked': already})
        return
    if already:  # harmless, and said so: it read as if this command had revoked it
        console.print(
            f'{revoked.public_id} (account {revoked.account_slug!r}) was already revoked, at '
            f'{_when(revoked.revoked_at)} UTC',
            highlight=False,
        )
        return
    console.print(f'revoked {revoked.public_id} (account {revoked.account_slug!r})', highlight=False)


def _when(moment: datetime | None) -> str:
    return utc_text(moment) if moment is not None else '-'
