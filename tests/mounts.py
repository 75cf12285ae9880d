"""Places no process may write to, root included, for the tests of what is refused there: a read-only bind mount,
an immutable file or directory (`chattr +i`) and a small file system that fills up (a tmpfs)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def read_only_bind(directory: Path) -> Iterator[bool]:
    """`directory` bind-mounted read-only onto itself while the block runs; False where mounting is not allowed."""
    mounted = subprocess.run(['mount', '--bind', str(directory), str(directory)], capture_output=True).returncode == 0
    try:
        if mounted:
            remount = ['mount', '-o', 'remount,ro,bind', str(directory), str(directory)]
            mounted = subprocess.run(remount, capture_output=True).returncode == 0
        yield mounted
    finally:
        subprocess.run(['umount', str(directory)], capture_output=True)


@contextmanager
def immutable(path: Path) -> Iterator[bool]:
    """`path` made immutable (`chattr +i`: not written, renamed or deleted, by root either) while the block runs;
    False where the file system or the process cannot."""
    made = subprocess.run(['chattr', '+i', str(path)], capture_output=True).returncode == 0
    try:
        yield made
    finally:
        if made:
            subprocess.run(['chattr', '-i', str(path)], capture_output=True)


@contextmanager
def bind(directory: Path, onto: Path) -> Iterator[bool]:
    """`directory` bind-mounted onto `onto` (made if missing) while the block runs: the same directory under another
    name; False where mounting is not allowed."""
    onto.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(['mount', '--bind', str(directory), str(onto)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(['umount', str(onto)], capture_output=True)


@contextmanager
def small_file_system(directory: Path, megabytes: int, inodes: int | None = None) -> Iterator[bool]:
    """A tmpfs of `megabytes` (and at most `inodes` files) mounted on `directory` (made if missing) while the block
    runs: a disk that fills up; False where mounting is not allowed."""
    directory.mkdir(parents=True, exist_ok=True)
    options = f'size={megabytes}m' + ('' if inodes is None else f',nr_inodes={inodes}')
    mount = ['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(directory)]
    mounted = subprocess.run(mount, capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(['umount', str(directory)], capture_output=True)
