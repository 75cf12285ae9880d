"""README.md stays true: its Python example runs as written (the block is read from the README, so the two cannot
drift apart), and its tables of settings, exit codes and routes are read back against the code."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select

from agentrt.db.models import ConversationRow
from agentrt.db.session import Unscoped, get_db_session

README = Path(__file__).resolve().parents[1] / 'README.md'


def python_example() -> str:
    """The first ```python block of the section "Using it from Python"."""
    text = README.read_text()
    section = text[text.index('## Using it from Python') :]
    section = section[: section.index('\n## ', 3)]
    match = re.search(r'```python\n(.*?)```', section, re.DOTALL)
    assert match is not None, 'README.md: no python block under "Using it from Python"'
    return match.group(1)


def test_the_example_is_a_whole_program() -> None:
    code = python_example()
    compile(code, 'README.md', 'exec')
    assert 'asyncio.run(main())' in code and 'agentrt_runtime()' in code and 'toolsets=[my_tools]' in code


async def test_the_python_example_runs_as_written(demo_data: None, database_url: str, tmp_path: Path) -> None:
    script = tmp_path / 'example.py'
    script.write_text(python_example())
    env = {**os.environ, 'DATABASE_URL': database_url, 'AGENTRT_LEDGER_SPOOL': str(tmp_path / 'spool.jsonl')}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,  # anywhere: the installed `agentrt` package is what it imports
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert 'Cardiology providers in Seattle who accept Medicare' in out and 'None' in out  # unpriced: cost None
    assert 'Boston' in out and 'RunUsage(' in out  # the streamed turn finished and was saved
    assert 'Traceback' not in result.stderr
    async with get_db_session(account=Unscoped.ADMIN) as session:
        saved = (await session.execute(select(func.count()).where(ConversationRow.conversation_id == 's-1'))).scalar()
    assert saved == 1


async def test_the_python_examples_tool_runs_when_a_model_calls_it(demo_data: None) -> None:
    """The demo model never calls `count_entries`, so the run above cannot tell a broken tool: a model that does."""
    from pydantic_ai import ModelResponse, TextPart, ToolCallPart
    from pydantic_ai.messages import ModelMessage, ToolReturnPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel

    from agentrt.agents.simple_chat import simple_chat
    from agentrt.db.models import DirectoryEntry
    from tests.agents.conftest import account_id

    code = python_example().replace('asyncio.run(main())', '')  # the program's definitions, without its run
    namespace: dict[str, object] = {'__name__': 'readme_example'}
    exec(compile(code, 'README.md', 'exec'), namespace)

    def ask_for_the_count(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        returns = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        if returns:
            return ModelResponse(parts=[TextPart(f'{returns[-1].content} entries')])
        return ModelResponse(parts=[ToolCallPart('count_entries', {})])

    result = await simple_chat(
        'How many entries?',
        session_id='readme-tool',
        account='acme-health',
        model=FunctionModel(ask_for_the_count),
        toolsets=[namespace['my_tools']],  # type: ignore[list-item]
    )
    acme = await account_id('acme-health')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        query = select(func.count()).select_from(DirectoryEntry).where(DirectoryEntry.account_id == acme)
        expected = (await session.execute(query)).scalar_one()
    assert result.output == f'{expected} entries'


# The README's tables, read back: a setting, an exit code or a route that changes without its row fails here.


def _table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row of `text`, its header first (not the separator row)."""
    rows = [[cell.strip() for cell in line.strip().strip('|').split('|')] for line in text.splitlines()]
    return [cells for cells in rows if len(cells) > 1 and not all(set(cell) <= set('-:') for cell in cells)]


def _readme_default(value: object) -> str:
    """A setting's default as the README writes it."""
    if value is None:
        return 'unset'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_every_setting_has_a_readme_row_with_its_default() -> None:
    from agentrt.db.settings import Settings

    documented: dict[str, str] = {}
    for cells in _table_rows(README.read_text()):
        names = re.findall(r'`([A-Z_]+)`', cells[0])
        if len(cells) < 3 or not names or not cells[0].startswith('`'):
            continue
        defaults = [part.strip().strip('`') for part in cells[1].split(' / ')]
        first = names[0]
        for index, name in enumerate(names):
            # `AGENTRT_HTTP_HOST` / `_PORT`: a suffix replaces as many words of the first name as it has.
            full = first.rsplit('_', name.count('_'))[0] + name if name.startswith('_') else name
            documented.setdefault(full, defaults[index] if len(defaults) == len(names) else defaults[0])
    unset_by_design = {'AGENTRT_DATA_DIR', 'AGENTRT_LEDGER_SPOOL'}  # computed from the data directory: said in words
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if alias is None:
            continue
        name = next(choice for choice in alias.choices if isinstance(choice, str) and choice.isupper())  # type: ignore[union-attr]
        assert name in documented, f'README.md: no table row for {name}'
        if name not in unset_by_design:
            assert documented[name] == _readme_default(field.default), f'README.md: {name} default'


def test_the_exit_code_table_is_the_clis() -> None:
    from agentrt.agents.cli import support

    text = README.read_text()
    section = text[text.index('| Exit code | Meaning |') :]
    rows = {cells[0]: cells[1] for cells in _table_rows(section[: section.index('\n\n')])[1:]}
    by_class = {cls.__name__: code for cls, code in support.exit_codes()}
    constants = {value for name, value in vars(support).items() if name.startswith('EXIT_') and isinstance(value, int)}
    codes = {int(code) for code in rows if code.isdigit()}
    assert codes - {0} == constants - {support.EXIT_SIGNAL_BASE}, 'README.md: the exit code table lists other codes'
    for code, meaning in rows.items():
        for name in re.findall(r'`([A-Za-z]+Error)`', meaning):
            assert by_class.get(name) == int(code), f'README.md: {name} exits {by_class.get(name)}, not {code}'


def _unnamed(path: str) -> str:
    """A route's path with its parameters unnamed: the README writes `{id}` where the code has `{conversation_id}`."""
    return re.sub(r'\{[^}]*\}', '{}', path)


def test_the_route_table_is_the_apps() -> None:
    from agentrt.api.app import create_app

    text = README.read_text()
    section = text[text.index('| Route | Scope | What |') :]
    documented = set()
    for cells in _table_rows(section[: section.index('\n\n')])[1:]:
        for method, path in re.findall(r'`(GET|POST|DELETE|PUT|PATCH) ([^`?]+)', cells[0]):
            documented.add((method, _unnamed(path.strip())))
    paths = create_app().openapi()['paths']  # the routes as published (FastAPI nests included routers)
    served = {(method.upper(), _unnamed(path)) for path, operations in paths.items() for method in operations}
    assert served <= documented, f'routes the README does not list: {sorted(served - documented)}'
    assert documented <= served | {('POST', '/api/v1/chat/ag-ui')}, f'listed, not served: {sorted(documented - served)}'


def test_the_error_table_is_agents_errors() -> None:
    import agentrt.agents.errors as errors

    text = README.read_text()
    section = text[text.index('| Error | When | What to do |') :]
    rows = _table_rows(section[: section.index('\n\n')])[1:]
    documented = {re.match(r'`(\w+)`', cells[0]).group(1): cells[0] for cells in rows}  # type: ignore[union-attr]
    assert set(documented) == set(errors.__all__) - {'AgentRuntimeError'}
    for name, cell in documented.items():
        cls = getattr(errors, name)
        for attribute in re.findall(r'`\.(\w+)`', cell):
            # Set in the constructor of the class or of a base of ours: read from the source, no instance needed.
            sources = [inspect.getsource(base) for base in cls.__mro__ if base.__module__.startswith('agentrt')]
            assert any(f'self.{attribute}' in source for source in sources), f'README.md: {name}.{attribute}'


# Pointers into the README from the code (docstrings, error hints): each names a section or a bold lead-in that exists.
_POINTER = re.compile(r'README,? "([^"]{3,80})"')
_PRODUCT_FOLDERS = ('agents', 'api', 'db', 'services', 'tools')


def _readme_places() -> list[str]:
    """The README's headings and its bold lead-ins (`**Input is checked first**`), as their text."""
    text = README.read_text()
    headings = re.findall(r'^#+ (.+)$', text, re.MULTILINE)
    return headings + re.findall(r'\*\*([^*\n]+)\*\*', text)


def test_every_readme_pointer_in_the_code_names_a_place_in_the_readme() -> None:
    # agents/turn_input.py sent readers to README "Input rules", a heading that never existed.
    places = _readme_places()
    root = README.parent
    pointers = [
        (path.relative_to(root), name)
        for folder in _PRODUCT_FOLDERS
        for path in sorted((root / folder).rglob('*.py'))
        for name in _POINTER.findall(path.read_text())
    ]
    assert len(pointers) >= 5  # the pattern still finds them
    missing = [(str(path), name) for path, name in pointers if not any(place.startswith(name) for place in places)]
    assert missing == []


async def test_the_accounts_example_makes_an_account_a_turn_runs_for(database_url: str, tmp_path: Path) -> None:
    """README's "Accounts of your own": the rows it adds are a tenant `simple_chat` runs a turn for."""
    text = README.read_text()
    section = text[text.index('### Accounts of your own') :]
    match = re.search(r'```python\n(.*?)```', section, re.DOTALL)
    assert match is not None, 'README.md: no python block under "Accounts of your own"'
    script = tmp_path / 'accounts.py'
    script.write_text(match.group(1))
    env = {k: v for k, v in os.environ.items() if not k.startswith(('LOGFIRE_', 'OTEL_'))}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**env, 'DATABASE_URL': database_url, 'AGENTRT_LEDGER_SPOOL': str(tmp_path / 'spool.jsonl')},
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'I have no directory to search for this account.', done.stdout + done.stderr
    async with get_db_session(account=Unscoped.ADMIN) as session:
        saved = await session.execute(select(func.count()).where(ConversationRow.conversation_id == 'first'))
        assert saved.scalar_one() == 1
