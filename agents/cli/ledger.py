"""`agentrt ledger replay`: write the ledger rows spooled while the database was unreachable."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from agentrt.agents.cli.filters import JSON_OPTION
from agentrt.agents.cli.support import EXIT_USAGE, console, err_console, fail, print_json, redacted, run

if TYPE_CHECKING:
    from agentrt.services.ledger import LedgerSpool, ReplayReport

ledger_app = typer.Typer(help='The LLM ledger: replay rows spooled while the database was down.', no_args_is_help=True)

_SPOOL = typer.Option(None, '--spool', help='Spool file (default: AGENTRT_LEDGER_SPOOL or beside the data dir).')


@ledger_app.command('replay')
def replay(
    spool_option: str | None = _SPOOL,
    as_json: bool = JSON_OPTION,
) -> None:
    """Write rows spooled while the database was unreachable; each row is written once, however often this runs."""
    # Taken as text: typer makes `--spool ''` the path '.', which was then said to be a directory.
    spool = None if spool_option is None else _checked_spool_path(spool_option)
    if spool is not None and not _spool_file(spool.expanduser()).holds_spooled_rows():
        # A replay renames the file, moves the lines it cannot write to `.rejected` (as text) and deletes it.
        fail(
            f'--spool: {spool} is not a ledger spool file (its first line is no spooled row); nothing was moved',
            EXIT_USAGE,
        )
    if spool is not None and _nothing_to_replay(spool.expanduser()):
        # Said plainly: a mistyped path otherwise "replayed 0" and left a `<name>.lock` file behind.
        fail(
            f"--spool: {spool} does not exist (nor an interrupted replay of it, nor an ended process's journal); "
            'nothing to replay',
            EXIT_USAGE,
        )
    report = run(_replay, spool)
    if as_json:
        print_json(asdict(report))
    elif report.skipped:
        console.print('another replay is running; nothing done')
    else:
        console.print(
            f'replayed {report.files} spool file(s): {report.rows:,} row(s), {report.inserted:,} new, '
            f'{report.duplicates:,} already there, {report.contents:,} content row(s), {report.rejected:,} rejected'
        )


def _checked_spool_path(spool: str) -> Path:
    """`--spool` as a path; a usage error (exit 2) when it names no file: empty, too long, in no directory, a
    directory."""
    shown = spool if len(spool) <= 200 else f'{spool[:160]}... ({len(spool):,} characters)'
    if not spool.strip():
        fail("--spool is empty; give the spool file's path", EXIT_USAGE)
    if '\x00' in spool:  # no file name holds one: opening it was an internal error (ValueError: embedded null byte)
        fail(f'--spool: {shown!r} has a NUL character, which no file name can have', EXIT_USAGE)
    path = Path(spool).expanduser()
    try:
        parent_is_dir, exists, is_file = path.parent.is_dir(), path.exists(), path.is_file()
    except OSError as exc:  # a name too long (ENAMETOOLONG): `exists()` raises rather than answer
        fail(f'--spool: {shown} cannot be used: {exc.strerror or exc}', EXIT_USAGE)
    if not parent_is_dir:
        fail(f'--spool: the directory {path.parent} does not exist', EXIT_USAGE)
    if exists and not is_file:
        fail(f"--spool: {shown} is not a file (a directory?); give the spool file's path", EXIT_USAGE)
    return path


def _nothing_to_replay(path: Path) -> bool:
    """Whether an explicit `--spool` names neither a file, nor the `.replaying-*` files a crashed replay left, nor
    the journal of a process that is gone."""
    return not path.exists() and not _spool_file(path).pending_files()


def _spool_file(path: Path) -> LedgerSpool:
    from agentrt.services.ledger import LedgerSpool

    return LedgerSpool(path)


async def _replay(spool: Path | None) -> ReplayReport:
    from agentrt.db.engine import close_database, init_database
    from agentrt.services.ledger import LedgerConfig, LLMRequestTracker, roll_up_pending

    await init_database()
    try:
        config = LedgerConfig.from_env()
        tracker = LLMRequestTracker(replace(config, spool_path=spool or config.spool_path))
        report = await tracker.replay_spool()
        if report.inserted:
            # Replayed rows may be days old: fold every not-yet-rolled-up row into the usage rollup.
            try:
                await roll_up_pending()
            except Exception as exc:  # the replay itself succeeded; the rollup can be repaired later
                warning = f'warning: rows replayed, but the usage rollup was not updated: {redacted(str(exc))}'
                err_console.print(warning, markup=False, highlight=False)
        return report
    finally:
        await close_database()
