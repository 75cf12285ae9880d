"""The layer folders install as `agentrt.*`: from the repository root too, and nothing imports them bare."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARE = ('agents', 'tools', 'services', 'db', 'api')


def _modules(layers: list[str]) -> list[str]:
    """Every module of the layers (the editable install maps each layer to its folder, so walk them one by one)."""
    skip = ('agentrt.db.migrations.env', '.__main__')  # alembic's env migrates when imported; __main__ runs the CLI
    names = []
    for layer in layers:
        package = importlib.import_module(layer)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, f'{layer}.') if not m.name.endswith(skip)]
    return names


def test_every_module_comes_from_its_mapped_folder_and_none_loads_a_bare_package() -> None:
    # pytest runs from the repository root with it on sys.path, where bare `agents/` and `db/` folders sit.
    mapping: dict[str, str] = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']['package-dir']
    names = _modules([name for name in mapping if name != 'agentrt'])
    assert len(names) > 50
    for name in names:
        module = importlib.import_module(name)
        layer = '.'.join(name.split('.')[:2])
        folder = ROOT / mapping[layer]
        assert Path(str(module.__file__)).is_relative_to(folder), (name, module.__file__)
    assert not [name for name in sys.modules if name.split('.')[0] in BARE]


def test_the_lint_rule_rejects_bare_imports(tmp_path: Path) -> None:
    probe = tmp_path / 'probe.py'
    probe.write_text(
        'import db.session\nfrom agents.simple_chat import simple_chat\nfrom services import tenancy\n'
        'from tools.directory_tools import directory_toolset\nfrom agentrt.db.session import get_db_session\n'
        'from api.app import create_app\nfrom agentrt.api.app import create_app as factory\n'
    )
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'ruff',
            'check',
            '--no-cache',
            '--select',
            'TID251',
            '--config',
            ROOT / 'pyproject.toml',
            probe,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    flagged = [line for line in result.stdout.splitlines() if line.startswith('TID251')]
    assert [line.split('`')[1] for line in flagged] == ['db', 'agents', 'services', 'tools', 'api'], result.stdout


def test_python_dash_m_agentrt_is_the_command_line(tmp_path: Path) -> None:
    # `python -m agentrt` works where the `agentrt` script is not on PATH (a virtual environment not activated).
    import agentrt

    for args, expected in ((['--version'], f'agentrt {agentrt.__version__}'), (['--help'], 'python -m agentrt')):
        result = subprocess.run(
            [sys.executable, '-m', 'agentrt', *args], capture_output=True, text=True, cwd=tmp_path, check=False
        )
        assert result.returncode == 0 and expected in result.stdout, result.stdout + result.stderr
