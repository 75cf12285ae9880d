"""Standard output that cannot take all of a command's output (`agentrt.agents.cli.pipes`)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agentrt.agents.cli.pipes import reader_may_leave
from tests.agents.cli.helpers import ROOT
from tests.mounts import small_file_system


def test_an_output_the_disk_takes_only_in_part_is_said_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One write of 44 KB (a `--json` document, a table) to a disk with 4 KiB left: the buffered stream wrote what fit
    # and dropped the rest without an error: a truncated file, exit 0 (qa124).
    disk = tmp_path / 'disk'
    with small_file_system(disk, 1) as mounted:
        if not mounted:
            pytest.skip('mounting a tmpfs is not allowed here')
        room = 4096
        (disk / 'fill').write_bytes(b'\0' * (1024 * 1024 - room))
        with open(disk / 'out.json', 'w', encoding='utf-8') as out:
            monkeypatch.setattr(sys, 'stdout', out)
            with reader_may_leave() as output:
                print('x' * 44_000)
                print('and more')
            assert output is not None
            monkeypatch.undo()
        written = (disk / 'out.json').stat().st_size
    assert 0 < written < 44_000
    assert output.not_written == 'No space left on device' and output.reader_left


def test_an_output_with_room_is_written_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / 'out.txt', 'w', encoding='utf-8', errors='replace') as out:
        monkeypatch.setattr(sys, 'stdout', out)
        with reader_may_leave() as output:
            print('x' * 44_000)
            sys.stdout.write('é and a lone \ud800 surrogate\n')
            print('last', flush=True)
        monkeypatch.undo()
    assert output is not None and output.not_written is None
    assert (tmp_path / 'out.txt').read_text() == 'x' * 44_000 + '\né and a lone ? surrogate\nlast\n'


def test_a_stream_without_a_descriptor_is_written_through(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, 'stdout', out)
    with reader_may_leave() as output:
        print('hello')
    monkeypatch.undo()
    assert output is not None and out.getvalue() == 'hello\n'


def test_a_command_whose_output_the_disk_takes_in_part_exits_1_saying_so(
    tmp_path: Path, demo_data: None, database_url: str
) -> None:
    # `agentrt audit list --json > export.json` on a disk with 4 KiB left: 4,096 bytes of 44 KB written, exit 0 and
    # nothing said, a truncated JSON document for the script that asked (qa124). Here the list of one demo turn's
    # requests, appended to a file whose last page has 1,096 bytes left, on a disk with no page left.
    env = {**os.environ, 'DATABASE_URL': database_url}
    chat = [sys.executable, '-m', 'agentrt.agents.cli', 'chat', 'Cardiologists in Seattle', '--delay', '0']
    subprocess.run(chat, cwd=ROOT, env=env, capture_output=True, timeout=120, check=True)
    disk = tmp_path / 'disk'
    with small_file_system(disk, 1) as mounted:
        if not mounted:
            pytest.skip('mounting a tmpfs is not allowed here')
        (disk / 'fill').write_bytes(b'\0' * (1024 * 1024 - 4096))
        (disk / 'out.json').write_bytes(b' ' * 3000)
        with open(disk / 'out.json', 'a') as out:
            done = subprocess.run(
                [sys.executable, '-m', 'agentrt.agents.cli', 'audit', 'list', '--json'],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.PIPE, text=True, timeout=60,
            )  # fmt: skip
        written = (disk / 'out.json').stat().st_size
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (
        'error: the output could not be written (No space left on device); the command ran to its end'
    )
    assert written == 4096


def test_a_standard_error_that_cannot_be_written_keeps_the_commands_exit_code() -> None:
    # `agentrt --bogus 2>/dev/full`: the error line's write failed out of the error boundary, so every failure exited 1
    # and a usage error's 2 was lost (qa124).
    with open('/dev/full', 'w') as full:
        done = subprocess.run(
            [sys.executable, '-m', 'agentrt.agents.cli', '--bogus'],
            cwd=ROOT, env=os.environ, stdout=subprocess.DEVNULL, stderr=full, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2


def test_a_non_blocking_output_is_waited_for_not_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its program set O_NONBLOCK on the pipe (some runners do): a write past the pipe's 64 KiB found it full (EAGAIN),
    # and the rest was taken for not written, exit 1 (qa126). It waits until the reader takes more.
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    received = bytearray()

    def read_late() -> None:
        time.sleep(0.5)  # the pipe fills meanwhile
        while chunk := os.read(read_end, 65536):
            received.extend(chunk)

    reader = threading.Thread(target=read_late)
    reader.start()
    with open(write_end, 'w', encoding='utf-8') as out:
        monkeypatch.setattr(sys, 'stdout', out)
        with reader_may_leave() as output:
            print('x' * 300_000)
        monkeypatch.undo()
    reader.join(10)
    os.close(read_end)
    assert output is not None and output.not_written is None
    assert bytes(received) == b'x' * 300_000 + b'\n'
