"""The command table: commands imported only when used, `--version`, the licence, constants kept in step."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import tomllib

import pytest

from agentrt import __version__
from agentrt.agents.cli import COMMANDS, app
from agentrt.agents.cli import chat as chat_cli
from agentrt.agents.cli import costs as costs_cli
from agentrt.agents.cli import keys as keys_cli
from agentrt.db.models import API_KEY_SCOPES
from agentrt.services.demo_data import MEDICAL_ACCOUNT
from agentrt.services.ledger import COST_GROUPINGS
from tests.agents.cli.helpers import ROOT, invoke, logging_restored

HEAVY = ('sqlalchemy', 'asyncpg', 'pydantic_ai', 'agentrt.db.engine', 'agentrt.services', 'agentrt.agents.simple_chat')


async def test_help_and_version_import_no_command_and_no_runtime() -> None:
    """`agentrt --help`, `--version` and each command's `--help` load neither the database nor the agents."""
    names = [command.name for command in COMMANDS]
    script = textwrap.dedent(
        f"""
        import sys
        from typer.testing import CliRunner
        from agentrt.agents.cli import app
        runs = [['--help'], ['--version'], *([name, '--help'] for name in {names!r})]
        for args in runs:
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, (args, result.output)
            loaded = [name for name in {HEAVY!r} if name in sys.modules]
            print(' '.join(args), loaded)
            assert not loaded, (args, loaded)
        """
    )
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, '-c', script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_root_lists_every_command_in_table_order() -> None:
    from typer.main import get_group
    from typer.testing import CliRunner

    with logging_restored():
        help_text = CliRunner().invoke(app, ['--help']).output
    listing = help_text[help_text.index('Commands') :]
    positions = [listing.index(f' {command.name} ') for command in COMMANDS]
    assert positions == sorted(positions)
    assert all(command.help in help_text for command in COMMANDS)
    group = get_group(app)
    for command in COMMANDS:
        loaded = command.load()
        assert loaded.name == command.name and group.get_command(None, command.name) is not None  # type: ignore[arg-type]


def test_completion_options_are_the_roots_only() -> None:
    # `agentrt chat --help` (and costs, serve, worker: the commands that are one function) listed
    # --install-completion and --show-completion, which install or show the completion of the whole `agentrt`.
    from typer.testing import CliRunner

    with logging_restored():
        assert '--install-completion' in CliRunner().invoke(app, ['--help']).output
        for command in COMMANDS:
            shown = CliRunner().invoke(app, [command.name, '--help'], env={'COLUMNS': '200'})
            assert shown.exit_code == 0 and '--help' in shown.output, (command.name, shown.output)
            assert '-completion' not in shown.output, command.name


def test_help_shows_a_type_beside_options_that_take_a_value_and_none_beside_flags() -> None:
    # typer 0.29 showed `--verbose -v <bool>`, as if `agentrt --verbose true` worked ("No such command 'true'", QA).
    from typer.testing import CliRunner

    with logging_restored():
        root = CliRunner().invoke(app, ['--help'], env={'COLUMNS': '200'}).output
        chat = CliRunner().invoke(app, ['chat', '--help'], env={'COLUMNS': '200'}).output
    assert '<bool>' not in root + chat
    assert '--verbose' in root and '--help' in chat
    assert re.search(r'--delay +<float>', chat) and re.search(r'--account +-a +<str>', chat)


async def test_version() -> None:
    shown = await invoke('--version')
    assert shown.exit_code == 0 and shown.stdout.strip() == f'agentrt {__version__}'


def test_trace_on_the_root_turns_on_console_spans_for_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    monkeypatch.setenv('LOGFIRE_CONSOLE', 'false')
    with logging_restored():
        result = CliRunner().invoke(app, ['--trace', 'db'])  # the group without a subcommand: its help, exit 2
    assert result.exit_code == 2
    assert os.environ['LOGFIRE_CONSOLE'] == 'true'  # read by configure_observability(), and by `serve`'s workers


def test_the_licence_file_matches_the_declared_licence() -> None:
    declared = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['license']
    licence = (ROOT / 'LICENSE').read_text()
    assert declared == 'MIT' and licence.startswith('MIT License')
    assert 'Permission is hereby granted, free of charge' in licence


def test_constants_the_cli_keeps_to_stay_fast_agree_with_their_sources() -> None:
    assert chat_cli.DEFAULT_ACCOUNT == MEDICAL_ACCOUNT
    assert costs_cli.COST_GROUPINGS == COST_GROUPINGS
    assert keys_cli.API_KEY_SCOPES == API_KEY_SCOPES


@pytest.mark.parametrize('signum', [signal.SIGHUP, signal.SIGTERM])
async def test_a_signal_while_the_command_exits_does_not_cut_its_exit_short(signum: signal.Signals) -> None:
    # After the command's own clean shutdown, the interpreter's exit still runs the embedded server's release (the
    # last user stops it) and the spans' last export (atexit). A SIGHUP or SIGTERM then, with the command's handlers
    # gone, killed the process where it stood: `agentrt chat "..."` answered, saved, then died of the signal (129) in
    # the middle of that release. Here an exit handler of the program's own stands for that release.
    program = textwrap.dedent(
        """
        import atexit, sys, time
        from agentrt.agents.cli import main
        atexit.register(lambda: (print('exiting', flush=True), time.sleep(3), print('released', flush=True)))
        sys.argv = ['agentrt', '--version']
        main()
        """
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, '-c', program, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    assert (await process.stdout.readline()).decode().startswith('agentrt ')
    assert await process.stdout.readline() == b'exiting\n'
    process.send_signal(signum)
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert (process.returncode, out, err) == (0, b'released\n', b'')


async def test_ctrl_c_while_the_command_exits_lets_the_exit_finish_and_a_second_quits_at_once() -> None:
    # Ctrl-C during that release interrupted it with a traceback ("Exception ignored in atexit callback ...
    # KeyboardInterrupt"), exit code 0, the embedded server left running without a user. The first now lets the exit
    # finish, in one line; a second ends a stuck exit at once (exit code 130).
    # Registered as the command runs, as the embedded server's start registers its release (the CLI's own last
    # callback, registered before, ignores a Ctrl-C after them all).
    program = textwrap.dedent(
        """
        import atexit, sys, time
        import agentrt.agents.cli as cli
        seconds = int(sys.argv[1])
        command = cli.app

        def app():
            atexit.register(lambda: (print('exiting', flush=True), time.sleep(seconds), print('released')))
            command()

        cli.app = app
        sys.argv = ['agentrt', '--version']
        cli.main()
        """
    )
    finished = await _interrupted_exit(program, '2', interrupts=1)
    assert finished == (
        0,
        b'released\n',
        b'interrupted: the command has ended; finishing its exit (Ctrl-C again to quit at once)\n',
    )
    rc, out, err = await _interrupted_exit(program, '60', interrupts=2)
    assert (rc, out) == (130, b'')
    assert err.endswith(b'error: interrupted while exiting: its clean-up was cut short\n') and b'Traceback' not in err


async def test_ctrl_c_in_the_interpreters_last_moments_does_not_kill_the_process() -> None:
    # After the exit's callbacks, the interpreter puts a Python signal handler back to the default: a Ctrl-C in the
    # 0.3 s left (its modules torn down) killed the process with SIGINT, no word said (status -2; qa121). Here an
    # object torn down with the program's module sends it.
    program = textwrap.dedent(
        """
        import os, signal, sys, time
        from agentrt.agents.cli import main

        class TornDownLast:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                os.write(1, b'torn down\\n')

        last = TornDownLast()
        sys.argv = ['agentrt', '--version']
        main()
        """
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, '-c', program, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, (process.returncode, err)
    assert out.endswith(b'torn down\n') and err == b'', (out, err)


async def _interrupted_exit(program: str, seconds: str, *, interrupts: int) -> tuple[int | None, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, '-c', program, seconds, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None and process.stderr is not None
    assert (await process.stdout.readline()).decode().startswith('agentrt ')
    assert await process.stdout.readline() == b'exiting\n'
    process.send_signal(signal.SIGINT)
    if interrupts == 2:  # once the first was answered
        assert (await process.stderr.readline()).startswith(b'interrupted: ')
        process.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode, out, err
