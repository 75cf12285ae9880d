"""The interactive chat's history file holds what was typed (secrets included: it is not redacted), so it is
private: never another user's file, never a symlink's target, never readable by others."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agentrt.agents.cli.chat_input import _private_file


def test_a_missing_history_file_is_created_owner_only(tmp_path: Path) -> None:
    path = tmp_path / 'deeper' / 'chat-history'
    assert _private_file(path) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_existing_history_file_readable_by_others_is_made_owner_only(tmp_path: Path) -> None:
    path = tmp_path / 'chat-history'
    path.write_text('+my password is hunter2\n')
    path.chmod(0o644)
    assert _private_file(path) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == '+my password is hunter2\n'


def test_a_history_path_that_is_a_symlink_is_not_used(tmp_path: Path) -> None:
    target = tmp_path / 'elsewhere'
    target.write_text('someone else\n')
    path = tmp_path / 'chat-history'
    path.symlink_to(target)
    assert _private_file(path) == 'a symlink, not followed'
    assert target.read_text() == 'someone else\n'


@pytest.mark.skipif(os.geteuid() != 0, reason='giving a file to another user needs root')
def test_a_history_file_another_user_made_first_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / 'chat-history'
    path.write_text('')
    path.chmod(0o666)
    os.chown(path, 65534, 65534)
    assert _private_file(path) == "another user's file"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666


def test_a_history_path_that_is_a_directory_is_not_used(tmp_path: Path) -> None:
    assert _private_file(tmp_path) == 'Is a directory'


def test_a_history_file_whose_directory_is_missing_is_not_used_unless_its_directory_may_be_made(
    tmp_path: Path,
) -> None:
    # AGENTRT_CHAT_HISTORY=/nonexistent/dir/hist made `/nonexistent/dir/` (as root): only the default location's
    # directory is made (QA).
    path = tmp_path / 'nonexistent' / 'dir' / 'hist'
    assert _private_file(path, make_parents=False) == f'its directory {path.parent} does not exist'
    assert not (tmp_path / 'nonexistent').exists()
    assert _private_file(path) == path
