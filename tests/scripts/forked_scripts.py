"""Run several `scripts/*.py` at once, each in a process of its own forked from one that imported them all first.

Importing the runtime (pydantic-ai, SQLAlchemy, FastAPI...) costs about 2 s of CPU per Python process: for the
benchmark smoke test, which runs every benchmark with `--quick`, that was half its CPU. Here one parent process
imports every script's modules once (`import bench_x` runs a script's imports but not its `__main__` block), then
forks a child per script that runs the file as `__main__` (`runpy.run_path`) with its own `sys.argv`, its output in
a file of its own, and the normal interpreter exit (exit handlers, exit code) when it is done. A script that cannot be
imported fails its own run, with the traceback in its output.

Run as `python forked_scripts.py SPEC.json`; SPEC is `{"scripts_dir": ..., "runs": {name: [args...]}, "logs": dir}`.
The parent prints `{name: exit code}` as JSON once every child has ended.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import runpy
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any


def run_forked(
    scripts_dir: Path, runs: dict[str, list[str]], logs: Path, *, env: dict[str, str], timeout: float
) -> dict[str, tuple[int, str]]:
    """Run `scripts_dir/<name>.py ARGS` for each name of `runs`, at once; return each one's exit code and output."""
    logs.mkdir(parents=True, exist_ok=True)
    spec = logs / 'spec.json'
    spec.write_text(json.dumps({'scripts_dir': str(scripts_dir), 'runs': runs, 'logs': str(logs)}))
    parent = subprocess.Popen(
        [sys.executable, __file__, str(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group: on a timeout, the children go too
    )
    try:
        out, err = parent.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(parent.pid, 9)
        out, err = parent.communicate()
        err += f'\n(timed out after {timeout} s)'
    codes: dict[str, int] = json.loads(out) if parent.returncode == 0 else {}
    return {name: (codes.get(name, -1), _read(logs / f'{name}.log') + ('' if name in codes else err)) for name in runs}


def _read(path: Path) -> str:
    return path.read_text(errors='replace') if path.exists() else ''


def _main(spec_path: str) -> None:
    spec: dict[str, Any] = json.loads(Path(spec_path).read_text())
    scripts_dir = Path(spec['scripts_dir'])
    sys.path.insert(0, str(scripts_dir))  # as for `python scripts/x.py`: its own folder first (bench_common)
    failed_imports: dict[str, str] = {}
    for name in spec['runs']:
        try:
            importlib.import_module(name)
        except BaseException:
            failed_imports[name] = traceback.format_exc()
    gc.freeze()  # the imported modules: shared with the children, never scanned or copied by their collections
    sys.stdout.flush()
    sys.stderr.flush()
    children: dict[int, str] = {}
    for name, args in spec['runs'].items():
        pid = os.fork()
        if pid == 0:
            _become(name, scripts_dir / f'{name}.py', args, Path(spec['logs']) / f'{name}.log', failed_imports)
        children[pid] = name
    codes = {}
    for pid, name in children.items():
        _, status = os.waitpid(pid, 0)
        codes[name] = os.waitstatus_to_exitcode(status)
    print(json.dumps(codes))


def _become(name: str, script: Path, args: list[str], log: Path, failed_imports: dict[str, str]) -> None:
    """In the child: run `script` as `__main__`; the interpreter then exits as that script's process would."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if name in failed_imports:
        sys.stderr.write(failed_imports[name])
        sys.exit(1)
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name='__main__')
    sys.exit(0)


if __name__ == '__main__':
    _main(sys.argv[1])
