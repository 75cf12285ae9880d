"""Link the layer folders into `build/namespace/agentrt/`, the shape static tools need to see the `agentrt` package.

The folders install under `agentrt.*` through setuptools' package-dir mapping, which an editable install serves
with an import hook. mypy and import-linter do not run import hooks: they look for an `agentrt/` directory. This
script makes one from the mapping in pyproject.toml (symlinks, so edits and new modules show up at once), and
`make typecheck` / `.ci/run` point the tools at it (`mypy_path`, `PYTHONPATH`).

Run:  python scripts/namespace_tree.py   (prints the directory to put on the tools' path)
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / 'build' / 'namespace'


def build_tree(root: Path = ROOT, tree: Path = TREE) -> Path:
    """(Re)create `tree/agentrt` from `[tool.setuptools.package-dir]`; return `tree`."""
    mapping: dict[str, str] = tomllib.loads((root / 'pyproject.toml').read_text())['tool']['setuptools']['package-dir']
    package = tree / 'agentrt'
    if package.exists():
        shutil.rmtree(package)
    package.mkdir(parents=True)
    for entry in (root / mapping['agentrt']).iterdir():  # the root package's own files: __init__.py, py.typed
        (package / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name == 'agentrt':
            continue
        prefix, _, layer = name.partition('.')
        if prefix != 'agentrt' or '.' in layer:
            raise SystemExit(f'unexpected package-dir entry {name!r}: only agentrt.<layer> = <folder> is supported')
        (package / layer).symlink_to(root / folder, target_is_directory=True)
    return tree


if __name__ == '__main__':
    print(build_tree())
