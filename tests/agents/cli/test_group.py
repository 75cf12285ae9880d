"""The CLI's error boundary (`agents/cli/group.py`): a usage error's hint names the help of the command it is about."""

from __future__ import annotations

import pytest

from tests.agents.cli.helpers import invoke


@pytest.mark.parametrize(
    ('args', 'command'),
    [
        (['chat', '--session'], 'chat'),
        (['chat', 'hi', '--account'], 'chat'),
        (['chat', '-m'], 'chat'),
        (['costs', '--since'], 'costs'),
        (['audit', 'list', '--page'], 'audit list'),
        (['budget', 'set', '--limit'], 'budget set'),
    ],
)
async def test_an_option_without_its_value_points_to_its_commands_help(args: list[str], command: str) -> None:
    # It said `(see 'agentrt --help')`, the root's help, where every other usage error of the command names its own:
    # the parser raised it without the command's context (QA).
    result = await invoke(*args)
    assert result.exit_code == 2
    option = args[-1]
    assert result.stderr == f"error: Option '{option}' requires an argument. (see 'agentrt {command} --help')\n"
