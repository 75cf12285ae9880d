"""A process named by its pid and start (`agentrt.db.processes`): the same process stays the same however the wall
clock moves, a process that is gone or a zombie has no start, and the embedded server's users and the budgets' holders
that rely on it keep a live process when the clock moves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from psutil import _pslinux

from agentrt.db.embedded import _prune
from agentrt.db.embedded_datadir import USERS_FILE
from agentrt.db.processes import process_start, same_process
from agentrt.services.budgets import is_alive, this_process

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the start since boot is read on Linux')


def test_a_process_keeps_its_start_when_the_wall_clock_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    me = process_start(os.getpid())
    assert me is not None and 0 < me < psutil.Process().create_time() - psutil.boot_time() + 1
    created = psutil.Process(os.getpid()).create_time()
    before = _pslinux.boot_time()
    monkeypatch.setattr(_pslinux, 'boot_time', lambda: before + 7)
    assert psutil.Process(os.getpid()).create_time() == pytest.approx(created + 7)  # what was compared before
    assert process_start(os.getpid()) == me


def test_a_process_that_is_gone_or_a_zombie_has_no_start() -> None:
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    assert process_start(int(gone.stdout)) is None
    assert process_start(0) is None and process_start(-5) is None
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    try:
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not yet waited for
            pass
        assert process_start(child.pid) is None
    finally:
        child.wait()


def test_a_command_name_with_spaces_and_parentheses_is_read_past(tmp_path: Path) -> None:
    odd = tmp_path / 'a b) (c'
    odd.symlink_to(sys.executable)
    child = subprocess.Popen([str(odd), '-c', 'import time; time.sleep(30)'])
    try:
        started = process_start(child.pid)
        assert started is not None
        assert started == pytest.approx(psutil.Process(child.pid).create_time() - psutil.boot_time(), abs=1.0)
    finally:
        child.kill()
        child.wait()


def test_the_embedded_servers_users_and_a_budgets_holder_stay_alive_when_the_wall_clock_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    me = str(os.getpid())
    holder = this_process()
    (tmp_path / USERS_FILE).write_text(json.dumps({me: process_start(os.getpid())}))
    before = _pslinux.boot_time()
    monkeypatch.setattr(_pslinux, 'boot_time', lambda: before + 7)
    # Before: this process was pruned from the server's users (so the next process to leave took itself for the last
    # and stopped the server under it), and its budget holds were swept as a dead process's.
    assert _prune(tmp_path) == {me: process_start(os.getpid())}
    assert is_alive(holder.pid, holder.started)


def test_a_start_an_earlier_version_recorded_still_names_its_process(tmp_path: Path) -> None:
    """Users and holders recorded as psutil's wall-clock `create_time()` (before `process_start`) by processes still
    running through an upgrade: kept while they run, not taken for dead."""
    me = str(os.getpid())
    recorded = psutil.Process(os.getpid()).create_time()
    (tmp_path / USERS_FILE).write_text(json.dumps({me: recorded, '1': recorded}))  # pid 1 started at another time
    assert _prune(tmp_path) == {me: recorded}
    assert is_alive(os.getpid(), recorded)
    assert not same_process(os.getpid(), recorded - 100)
    assert not same_process(os.getpid(), (process_start(os.getpid()) or 0) + 2)
