"""`AgentrtGroup`: the `agentrt` root command, the CLI's one error boundary, with its commands imported lazily.

Every command runs inside `AgentrtGroup.main`: a usage error, an interruption or anything a command raised ends there
as one `error:` line and its exit code (`support.report`); `LazyCommand` names a command by `'module:attribute'`, so
`agentrt --help` and `agentrt --version` import none of them.
"""

from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import typer
from typer._click import Command, Context, HelpFormatter
from typer._click import exceptions as click_exceptions  # typer vendors click: these are what it raises
from typer.core import TyperCommand, TyperGroup, TyperOption

from agentrt.agents.cli.pipes import reader_may_leave
from agentrt.agents.cli.support import EXIT_SIGNAL_BASE, EXIT_USAGE, Stopped, err_console, error_line, report
from agentrt.agents.cli_entry import stopped_server

__all__ = ['AgentrtGroup', 'LazyCommand', 'ScriptCommand']


def _flags_take_no_value() -> None:
    """Show no value type beside a flag in `--help` (`--verbose -v`, not `--verbose -v <bool>`).

    typer 0.29's rich help gives every option its type, a flag's too, which reads as if it took one: `agentrt
    --verbose true` was then "No such command 'true'" (QA). Its plain help, like click's, shows none.
    """
    shown_type = getattr(TyperOption, 'display_type_rich', None)
    if shown_type is None or getattr(shown_type, 'flags_take_no_value', False):  # another typer, or done
        return

    def display_type_rich(self: TyperOption, ctx: Context) -> str | None:
        return None if self.is_flag and self.metavar is None else shown_type(self, ctx)

    display_type_rich.flags_take_no_value = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_take_no_value()


def _usage_errors_name_their_command() -> None:
    """Give a usage error its command's context when the parser raised it without one.

    typer's vendored click raises "Option '--session' requires an argument." with no context, so the boundary's hint
    named the root's help (`see 'agentrt --help'`) where every other usage error of `agentrt chat` names `agentrt
    chat --help` (QA): the context of the command whose arguments were being parsed is the one to name.
    """
    parse_args = Command.parse_args
    if getattr(parse_args, 'names_its_command', False):  # done
        return

    def parse_naming_the_command(self: Command, ctx: Context, args: list[str]) -> list[str]:
        try:
            return parse_args(self, ctx, args)
        except click_exceptions.UsageError as exc:
            if exc.ctx is None:
                exc.ctx, exc.cmd = ctx, ctx.command
            raise

    parse_naming_the_command.names_its_command = True  # type: ignore[attr-defined]
    Command.parse_args = parse_naming_the_command  # type: ignore[method-assign]


_usage_errors_name_their_command()


@dataclass(frozen=True)
class LazyCommand:
    """A command of `agentrt`, imported only when it runs (or its own `--help` is asked for).

    `target` is `'module:attribute'`: a `typer.Typer` (a group of subcommands, e.g. `agentrt db ...`) or a command
    function. `help` is its line in `agentrt --help`, which lists every command without importing any.
    """

    name: str
    target: str
    help: str

    def load(self) -> Command:
        """Import the command and build it."""
        module, _, attribute = self.target.partition(':')
        found = getattr(importlib.import_module(module), attribute)
        if isinstance(found, typer.Typer):  # a group, even of one subcommand (`agentrt ledger replay`)
            command: Command = typer.main.get_group(found)
        else:
            command = typer.main.get_command(_single_command(self.name, found))
        command.name = self.name
        return command


class _Unloaded(TyperCommand):
    """What `agentrt --help` lists for a command not imported yet: its name and help line."""

    def __init__(self, lazy: LazyCommand) -> None:
        super().__init__(lazy.name, help=lazy.help)
        self.lazy = lazy


def _single_command(name: str, function: Callable[..., Any]) -> typer.Typer:
    # No completion options: `agentrt --install-completion` has them; a command's own (`agentrt chat --help`
    # listed --install-completion and --show-completion) did the same for the whole `agentrt`.
    app = typer.Typer(add_completion=False)
    app.command(name)(function)
    return app


class AgentrtGroup(TyperGroup):
    """The root command: the CLI's one error boundary (see the module docstring), and its commands loaded lazily.

    A subclass lists its commands in `lazy_commands` (see `agentrt.agents.cli`); each module is imported when its
    command is used, inside the boundary, so `agentrt --help` and `agentrt --version` import none of them.
    """

    lazy_commands: ClassVar[Sequence[LazyCommand]] = ()

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self._listing = False
        for lazy in self.lazy_commands:
            self.commands.setdefault(lazy.name, _Unloaded(lazy))

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        command = self.commands.get(cmd_name)
        if isinstance(command, _Unloaded) and not self._listing:
            command = self.commands[cmd_name] = command.lazy.load()
        return command

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        self._listing = True  # list the commands by their help lines, without importing them
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        return _bounded(
            lambda: super(AgentrtGroup, self).main(args, prog_name, complete_var, standalone_mode=False, **extra),
            args,
            standalone_mode,
        )


class ScriptCommand(TyperCommand):
    """A command of `agentrt` run on its own by a script of `scripts/` (`seed_demo_data.py` is `agentrt db seed`),
    inside the same error boundary: its usage line and its errors' hints name the script as it is run
    (`seed_demo_data.py [OPTIONS]`), not a command path the script does not take (`seed_demo_data.py db seed`)."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        return _bounded(
            lambda: super(ScriptCommand, self).main(args, prog_name, complete_var, standalone_mode=False, **extra),
            args,
            standalone_mode,
        )


def _bounded(main: Callable[[], Any], args: Sequence[str] | None, standalone_mode: bool) -> Any:
    """Run a command's click `main` (not standalone) inside the error boundary; exit with its code when
    `standalone_mode`, else return it."""
    with reader_may_leave() as output:
        code = _boundary(main, args)
    if output is not None and output.not_written is not None and code == 0:
        error_line(f'the output could not be written ({output.not_written}); the command ran to its end', redact=False)
        code = 1
    if not standalone_mode:
        return code
    raise SystemExit(code)


def _boundary(main: Callable[[], Any], args: Sequence[str] | None) -> int:
    try:
        code = main()
    except click_exceptions.NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx else '')
        code = EXIT_USAGE
    except click_exceptions.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else 'agentrt'
        error_line(f"{exc.format_message()} (see '{where} --help')", redact=False)
        code = EXIT_USAGE
    except click_exceptions.ClickException as exc:
        error_line(exc.format_message(), redact=False)
        code = exc.exit_code
    except typer.Abort:
        error_line('interrupted', redact=False)
        code = EXIT_SIGNAL_BASE + signal.SIGINT
    except BaseException as exc:  # the boundary: everything a command raised ends here
        if isinstance(exc, SystemExit):
            raise
        if isinstance(exc, Stopped) and (server := stopped_server(sys.argv[1:] if args is None else args)):
            # Stopped before its own handling took over (the CLI still loading it): a stop ends it, as later.
            err_console.print(exc.before_start(server), highlight=False)
            return 0
        code = report(exc)
    return code if isinstance(code, int) else 0
