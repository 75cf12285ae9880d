"""Packaging check: the wheel installs next to the OpenAI Agents SDK, every module imports, `agentrt --help` works.

Builds the wheel, checks that it holds every module of the layer folders under `agentrt/` (and nothing at the top
level but `agentrt`), installs it with `openai-agents` (which owns the top-level `agents` package) into a fresh
virtual environment, then, from a directory outside the repository: imports both, imports every `agentrt` module but
the HTTP API's and the job queue's, reads the packaged migrations, runs `agentrt --help`, and checks that `agentrt
serve` without the `http` extra and `agentrt worker` without the `queue` extra say how to install them. Then it adds
the `http`, `agui` and `queue` extras and imports the HTTP API's and the job queue's modules.
Any failure prints what went wrong and exits 1.

Slow (a virtual environment and two installs), so `.ci/run` runs it as its own step, not in the test suite.

Run:  python scripts/check_wheel_install.py   (needs `build`, from the dev extra)
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import textwrap
import tomllib
import zipfile
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]

# Run inside the fresh environment, from a directory with no `agents/` or `db/` folders in it.
IMPORT_CHECK = textwrap.dedent("""
    import importlib, pkgutil, sys
    import agents, agentrt
    from agentrt.db.migrate import head_revision

    assert hasattr(agents, 'Agent') and hasattr(agents, 'Runner'), f'`agents` is not the OpenAI Agents SDK: {agents}'
    for module in (agents, agentrt):
        assert 'site-packages' in str(module.__file__), f'{module.__name__} comes from {module.__file__}'
    # Not imported: alembic's env (it runs migrations when imported) and `__main__` modules (they run the CLI).
    skip = ('agentrt.db.migrations.env', '.__main__')
    names = [m.name for m in pkgutil.walk_packages(agentrt.__path__, 'agentrt.') if not m.name.endswith(skip)]
    http = sys.argv[1] == 'http'
    extras = ('agentrt.api.', 'agentrt.services.jobs')  # the HTTP API and the job queue need their extras
    names = [name for name in names if name.startswith(extras) == http]
    for name in names:
        importlib.import_module(name)
    if http:  # the web UI: its page and every file the page and its modules load are installed
        import re
        from agentrt.api.web_ui import WEB_UI_DIR
        page = (WEB_UI_DIR / 'index.html').read_text()
        wanted = set(re.findall(r'(?:src|href)="([\w./-]+\.(?:js|css|svg))"', page))
        for module in (WEB_UI_DIR / 'js').glob('*.js'):
            wanted |= {'js/' + name for name in re.findall(r"from '\./([\w.-]+\.js)'", module.read_text())}
        missing = sorted(name for name in wanted if not (WEB_UI_DIR / name).is_file())
        assert 'js/app.js' in wanted and not missing, f'the installed web UI lacks {missing}'
    assert head_revision(), 'the packaged migrations have no head revision'
    print(f'agentrt {agentrt.__version__}: {len(names)} modules import beside the OpenAI Agents SDK ({sys.argv[1]})')
""")


def main() -> int:
    """Build, inspect, install and exercise the wheel; 0 when all is well."""
    with tempfile.TemporaryDirectory(prefix='agentrt-wheel-check-') as tmp:
        work = Path(tmp)
        wheel = build_wheel(work / 'dist')
        check_contents(wheel)
        python = make_venv(work / 'venv')
        install = [str(python), '-m', 'pip', 'install', '-q', str(wheel), 'openai-agents']
        run(install, 'install the wheel with openai-agents')
        outside = work / 'elsewhere'
        outside.mkdir()
        imported = run(
            [str(python), '-c', IMPORT_CHECK, 'core'], 'import agentrt beside the OpenAI Agents SDK', cwd=outside
        )
        print(imported, end='')
        help_text = run([str(python.parent / 'agentrt'), '--help'], 'agentrt --help', cwd=outside)
        for command in ('chat', 'db', 'audit', 'costs', 'ledger', 'budget', 'keys', 'serve', 'worker'):
            if command not in help_text:
                fail(f'`agentrt --help` does not list the {command!r} command:\n{help_text}')
        check_without_extra(python.parent / 'agentrt', outside, 'serve', 'http')
        check_without_extra(python.parent / 'agentrt', outside, 'worker', 'queue')
        extras = f'{wheel}[http,agui,queue]'
        run([str(python), '-m', 'pip', 'install', '-q', extras], 'install the http, agui and queue extras')
        imported = run(
            [str(python), '-c', IMPORT_CHECK, 'http'],
            'import the HTTP API and the job queue with their extras',
            cwd=outside,
        )
        print(imported, end='')
    print('wheel check passed')
    return 0


def build_wheel(out_dir: Path) -> Path:
    """The sdist, then the wheel from it, into `out_dir`; the path of the wheel.

    Building from the sdist (in a temporary directory) rather than the work tree means a stale `build/lib` left by
    an earlier build can never slip files into the wheel that the package list would not put there.
    """
    output = run([sys.executable, '-m', 'build', '--outdir', str(out_dir), str(ROOT)], 'build the sdist and the wheel')
    # setuptools still ships a package left out of `packages`, as data, with only a warning: make it an error.
    ignored = sorted(set(re.findall(r"Python recognizes '([\w.]+)' as an importable package", output)))
    if ignored:
        fail(f'packages missing from [tool.setuptools] packages in pyproject.toml: {", ".join(ignored)}')
    wheels = list(out_dir.glob('agentrt-*.whl'))
    if len(wheels) != 1:
        fail(f'expected one wheel in {out_dir}, found {wheels}')
    return wheels[0]


def check_contents(wheel: Path) -> None:
    """Every module of every mapped folder is in the wheel under `agentrt/`, with the package data."""
    setuptools = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']
    mapping: dict[str, str] = setuptools['package-dir']
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {'agentrt/py.typed', 'agentrt/db/migrations/script.py.mako', 'agentrt/api/static/index.html'}
    for package, folder in mapping.items():
        prefix = package.replace('.', '/')
        for source in (ROOT / folder).rglob('*.py'):
            if '__pycache__' not in source.parts:
                expected.add(f'{prefix}/{source.relative_to(ROOT / folder).as_posix()}')
    # Package data (the migrations' template, the redaction rules, the web UI's files): every file its patterns match.
    for package, patterns in setuptools.get('package-data', {}).items():
        owner = next(
            (p for p in sorted(mapping, key=len, reverse=True) if package == p or package.startswith(p + '.')), None
        )
        if owner is None:
            continue
        folder = ROOT / mapping[owner] / package[len(owner) :].lstrip('.').replace('.', '/')
        prefix = package.replace('.', '/')
        for pattern in patterns:
            for source in folder.glob(pattern):
                if source.is_file():
                    expected.add(f'{prefix}/{source.relative_to(folder).as_posix()}')
    missing = sorted(expected - names)
    if missing:
        fail(f'{wheel.name} lacks {len(missing)} file(s), e.g. {missing[:10]} (a package missing from `packages`?)')
    tops = {name.split('/')[0] for name in names if not name.split('/')[0].endswith('.dist-info')}
    if tops != {'agentrt'}:
        fail(f'{wheel.name} installs top-level names other than agentrt: {sorted(tops)}')
    print(f'{wheel.name}: {len(expected)} expected files present, only `agentrt` at the top level')


def check_without_extra(agentrt: Path, cwd: Path, command: str, extra: str) -> None:
    """`agentrt COMMAND` without the extra it needs: exit 2 with the command that installs it, no traceback."""
    print(f'-- agentrt {command} without the {extra} extra', flush=True)
    result = subprocess.run([str(agentrt), command], capture_output=True, text=True, cwd=cwd, check=False)
    said = ' '.join(result.stderr.split())  # the console wraps long lines
    if result.returncode != 2 or f"pip install 'agentrt[{extra}]'" not in said or 'Traceback' in result.stderr:
        fail(
            f'`agentrt {command}` without the {extra} extra: exit {result.returncode}\n{result.stdout}\n{result.stderr}'
        )


def make_venv(path: Path) -> Path:
    """A fresh virtual environment; its python."""
    run([sys.executable, '-m', 'venv', str(path)], 'create a virtual environment')
    return path / 'bin' / 'python'


def run(command: list[str], what: str, cwd: Path | None = None) -> str:
    """Run `command`, returning its output; on a non-zero exit, print it all and fail."""
    print(f'-- {what}', flush=True)
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)
    if result.returncode != 0:
        fail(f'{what} failed (exit {result.returncode}): {" ".join(command)}\n{result.stdout}\n{result.stderr}')
    return result.stdout + result.stderr


def fail(message: str) -> NoReturn:
    """Print the problem on stderr and exit 1."""
    print(f'wheel check FAILED: {message}', file=sys.stderr)
    raise SystemExit(1)


if __name__ == '__main__':
    sys.exit(main())
