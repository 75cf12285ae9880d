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
from tests.factories import ledger_rows
from tests.programs import run_program

README = Path(__file__).resolve().parents[1] / 'README.md'


def python_example() -> str:
    """The first ```python block of the section "Using it from Python"."""
    text = README.read_text()
    section = text[text.index('## Using it from Python') :]
    section = section[: section.index('\n## ', 3)]
    match = re.search(r'```python\n(.*?)```', section, re.DOTALL)
    assert match is not None, 'README.md: no python block under "Using it from Python"'
    return match.group(1)


def tasks_example() -> str:
    """The ```python block of "Turns in tasks of your own"."""
    text = README.read_text()
    section = text[text.index('**Turns in tasks of your own.**') :]
    match = re.search(r'```python\n(.*?)```', section, re.DOTALL)
    assert match is not None, 'README.md: no python block under "Turns in tasks of your own"'
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


async def test_turns_in_tasks_stopped_as_the_readme_says_end_quietly_and_billed(
    demo_data: None, database_url: str, tmp_path: Path
) -> None:
    # Turns left running as `asyncio.run` ends print asyncio's tracebacks and Python's "never awaited" warnings from
    # pydantic-ai's teardown (QA); the README says what a service does instead, and this runs it as written.
    done = await run_program(
        '-c', tasks_example(), database_url=database_url, AGENTRT_LEDGER_SPOOL=str(tmp_path / 'spool.jsonl')
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for printed in ('Traceback', 'an error occurred', 'never awaited', 'WARNING', 'ledger:'):
        assert printed not in done.stderr, done.stderr[-3000:]
    rows = await ledger_rows(chat_session_id='in-a-task')
    statuses = [row['status'] for row in rows]
    assert statuses == ['complete', 'complete', 'cancelled']  # the demo's tools, then the answer it cut, once each


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


def _documented_defaults() -> dict[str, str]:
    """Each variable of the README's tables (`| `NAME` | default | meaning |`), with its default as written."""
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
    return documented


def test_every_setting_has_a_readme_row_with_its_default() -> None:
    from agentrt.db.settings import Settings

    documented = _documented_defaults()
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
    done = await run_program(
        str(script), database_url=database_url, cwd=tmp_path, AGENTRT_LEDGER_SPOOL=str(tmp_path / 'spool.jsonl')
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'I have no directory to search for this account.', done.stdout + done.stderr
    async with get_db_session(account=Unscoped.ADMIN) as session:
        saved = await session.execute(select(func.count()).where(ConversationRow.conversation_id == 'first'))
        assert saved.scalar_one() == 1


# What README.md and AGENTS.md name, read back against the code: files, environment variables, CLI flags, the
# `agentrt.*` names they point at and the HTTP statuses they promise. Each check reads text only (no process, no
# database): a module split or a flag renamed without its documentation fails here.
_ROOT = README.parent
_AGENTS_MD = _ROOT / 'AGENTS.md'
_SOURCE_FOLDERS = (*_PRODUCT_FOLDERS, 'src', 'tests', 'scripts', '.ci', 'docs')
_PLACEHOLDERS = {'agents/x.py', 'env.py'}  # examples, not files


def _docs() -> dict[str, str]:
    return {'README.md': README.read_text(), 'AGENTS.md': _AGENTS_MD.read_text()}


def _repository_files() -> list[str]:
    """The repository's own files (not the virtual environment's or the build's), as paths from its root."""
    files = [path.name for path in _ROOT.iterdir() if path.is_file()]
    for folder in _SOURCE_FOLDERS:
        files += [
            str(path.relative_to(_ROOT)) for path in (_ROOT / folder).rglob('*') if '__pycache__' not in path.parts
        ]
    return files


def test_every_file_the_docs_name_exists() -> None:
    # AGENTS.md's table names a wing's modules by their own name (`_tracker.py`) after the wing's folder: a named file
    # is found when some file of the repository ends with it.
    files = _repository_files()
    missing = []
    for doc, text in _docs().items():
        named = re.findall(r'`([\w./-]+\.(?:py|toml|md|js|css|html|sql|json|sh|cfg|ini|txt|png)|[\w./-]+/)`', text)
        named += re.findall(r'\]\(([\w./-]+)\)', text)  # a link or an image: [BENCHMARKS.md](BENCHMARKS.md)
        for name in sorted(set(named) - _PLACEHOLDERS):
            if name.startswith(('/', 'build/', 'bench-results/')):  # the host's files (`/etc/...`), what a run makes
                continue
            if not any(f'/{file}/'.endswith(f'/{name}') or f'/{file}'.endswith(f'/{name}') for file in files):
                missing.append((doc, name))
    assert missing == []


def _heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def test_every_link_within_a_doc_names_one_of_its_headings() -> None:
    # The README's contents line, and links such as [Web UI](#web-ui): a heading renamed without them led nowhere.
    broken = []
    for doc, text in _docs().items():
        anchors = {_heading_anchor(heading) for heading in re.findall(r'^#{1,6} (.+)$', text, flags=re.MULTILINE)}
        broken += [(doc, link) for link in re.findall(r'\]\(#([^)]+)\)', text) if link not in anchors]
    assert broken == []
    repro = 'Repro: parallel tools on one shared session'
    assert _heading_anchor(repro) == 'repro-parallel-tools-on-one-shared-session'


def test_every_environment_variable_the_code_reads_is_in_the_readme() -> None:
    # AGENTRT_DEBUG, AGENTRT_CHAT_HISTORY and the HTTP server's variables are read outside `Settings`, so the
    # settings check above cannot see them.
    text = README.read_text()
    read = set()
    for folder in (*_PRODUCT_FOLDERS, 'src'):
        for path in (_ROOT / folder).rglob('*.py'):
            read |= set(re.findall(r"""['"]((?:AGENTRT|OTEL|LOGFIRE)_[A-Z_]*[A-Z])['"]""", path.read_text()))
    assert 'AGENTRT_DEBUG' in read and 'AGENTRT_HTTP_WORKERS' in read  # the pattern still finds them
    # `AGENTRT_HTTP_HOST` / `_PORT` / `_WORKERS`: a row names the variables after the first by their last word.
    named = set(re.findall(r'\b[A-Z][A-Z_]*[A-Z]\b', text))
    unnamed = [name for name in sorted(read) if name not in named and f'/ `_{name.rsplit("_", 1)[1]}`' not in text]
    assert unnamed == []


def _cli_options() -> tuple[set[str], dict[tuple[str, ...], set[str]]]:
    """The root's options, and each command's (`('budget', 'set')`, `('chat',)`) with its group's."""
    import typer

    from agentrt.agents.cli import COMMANDS, app

    def options(command: object) -> set[str]:
        params = getattr(command, 'params', [])
        return {opt for param in params for opt in (*param.opts, *getattr(param, 'secondary_opts', ()))}

    commands: dict[tuple[str, ...], set[str]] = {}
    for lazy in COMMANDS:
        command = lazy.load()
        commands[(lazy.name,)] = options(command)
        for name, sub in getattr(command, 'commands', {}).items():
            commands[(lazy.name, name)] = options(sub) | options(command)
    return options(typer.main.get_command(app)), commands


def test_every_cli_flag_the_docs_give_is_the_commands() -> None:
    root, commands = _cli_options()
    every = root.union(*commands.values())
    # pip, ruff, mypy, pytest, docker (`docker run --init`); the benchmark scripts' own (`bench_*.py --quick --out`);
    # schemathesis's (README "Development"); uvicorn's and gunicorn's graceful stop (README "Using it from Python")
    others = {
        '--timeout-graceful-shutdown',
        '--graceful-timeout',
        '--help',
        '--check',
        '--strict',
        '--config-settings',
        '--dist',
        '--durations',
        '--quick',
        '--out',
        '--init',
        '--checks',
        '--exclude-checks',
        '--generation-allow-x',
        '--max-examples',
    }
    wrong = []
    for doc, text in _docs().items():
        wrong += [(doc, flag) for flag in set(re.findall(r'(?<![\w-])(--[a-z][-a-z]*)', text)) - every - others]
        # `agentrt [root flags] command [subcommand] ... --flag`, up to the end of a shell command or a code span.
        for line in re.findall(r'agentrt((?: --?[a-z][-a-z]*)*) ([a-z]+)(?: ([a-z]+))?([^`\n|&;#]*)', text):
            before, name, sub, rest = line
            wrong += [(doc, flag) for flag in re.findall(r'(?<![\w-])(-[-a-z]+)', before) if flag not in root]
            key = (name, sub) if (name, sub) in commands else (name,)
            if key in commands:
                flags = re.findall(r'(?<![\w-])(--?[a-z][-a-z]*)', rest)
                wrong += [(doc, f'agentrt {" ".join(key)} {f}') for f in flags if f not in commands[key] | {'--help'}]
    assert sorted(set(wrong)) == []


def test_every_agentrt_name_the_docs_give_resolves() -> None:
    # `agentrt.agents.context_window.ContextWindow`, `agentrt.services.heap.freeze_startup_heap`, ...: a module or a
    # name moved away leaves a pointer to nothing. (`agentrt.account` and the like are span attributes: not modules.)
    import importlib

    broken = []
    for doc, text in _docs().items():
        for reference in sorted(set(re.findall(r'`(agentrt\.(?:agents|api|db|services|tools)(?:\.\w+)*)', text))):
            parts = reference.split('.')
            found: object = None
            for end in range(len(parts), 1, -1):
                try:
                    found = importlib.import_module('.'.join(parts[:end]))
                except ImportError:
                    continue
                for attribute in parts[end:]:
                    found = getattr(found, attribute, None)
                break
            if found is None:
                broken.append((doc, reference))
    assert broken == []


def test_the_http_status_table_is_what_the_app_answers() -> None:
    from agentrt.api.app import create_app

    text = README.read_text()
    section = text[text.index('| Status | When |') :]
    rows = {cells[0]: cells[1] for cells in _table_rows(section[: section.index('\n\n')])[1:]}
    paths = create_app().openapi()['paths']
    declared = {int(status) for ops in paths.values() for op in ops.values() for status in op['responses']}
    errors = {status for status in declared if status >= 400}
    documented = {int(status) for status in rows}
    # 405 (routing), 431 (`agentrt serve`'s HTTP protocol, before any route) and 500 (anything unforeseen) are no
    # route's answer to declare.
    assert errors <= documented and documented - errors == {405, 431, 500}, (sorted(errors), sorted(documented))
    api_source = ''.join(path.read_text() for path in (_ROOT / 'api').glob('*.py'))
    types = {
        name
        for meaning in rows.values()
        for name in re.findall(r'type `([a-z_]+)`|`([a-z_]+)`:', meaning)
        for name in name
    }
    unknown = sorted(name for name in types - {''} if f"'{name}'" not in api_source)
    assert unknown == []


def test_every_make_target_the_docs_give_is_the_makefiles() -> None:
    targets = set(re.findall(r'^([a-z][-a-z]*):', (_ROOT / 'Makefile').read_text(), re.MULTILINE))
    named = {name for text in _docs().values() for name in re.findall(r'`make ([a-z][-a-z]*)', text)}
    assert named and named <= targets, sorted(named - targets)


def test_the_cli_options_read_from_the_environment_have_their_readme_default() -> None:
    # `agentrt serve`'s host, port, workers and shutdown seconds are typer options with an `envvar`, not settings.
    from agentrt.agents.cli import COMMANDS

    documented = _documented_defaults()
    with_env = [param for lazy in COMMANDS for param in getattr(lazy.load(), 'params', []) if param.envvar]
    assert len(with_env) >= 4
    for param in with_env:
        assert documented.get(param.envvar) == _readme_default(param.default), f'README.md: {param.envvar} default'


def test_the_database_url_parameters_are_the_ones_it_takes() -> None:
    # `prepared_statement_cache_size` was taken without a row, where the README says any other parameter is refused.
    from agentrt.db import database_url

    text = README.read_text()
    section = text[text.index('| Parameter | Effect |') :]
    table = section[: section.index('\n\n')]
    documented = {name for cells in _table_rows(table)[1:] for name in re.findall(r'`(\w+)`', cells[0])}
    taken = (set(database_url.SUPPORTED_PARAMETERS) | set(database_url._URL_PARAMETERS)) - {
        'ssl'
    }  # ssl=true: in a note
    assert documented == taken
    refused = section[section.index('Refused with advice') :].split('\n\n')[0]
    named = set(re.findall(r'`(\w+)', refused))  # `pgbouncer=true`; `keepalives*`: every keepalives_ parameter
    assert {name for name in database_url._REFUSED if name not in named and name.split('_')[0] not in named} == set()


def test_the_pg_variables_checked_are_the_ones_the_readme_names() -> None:
    from agentrt.db import pg_environment

    text = README.read_text()
    paragraph = text[text.index('The `PG*` variables of the environment') :].split('\n\n')[0]
    named = set(re.findall(r'`(PG[A-Z_]+)', paragraph))
    checked = {*pg_environment._ASYNCPG_READS, *pg_environment._LIBPQ_READS, *pg_environment._LIBPQ_ONLY}
    assert checked | {'PGCONNECT_TIMEOUT', 'PGSSLMODE'} <= named


def test_the_python_version_the_readme_asks_for_is_the_packages() -> None:
    required = re.search(r"requires-python = '>=(3\.\d+)'", (_ROOT / 'pyproject.toml').read_text())
    assert required is not None and f'Python {required.group(1)} or later' in README.read_text()
