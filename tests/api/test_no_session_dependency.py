"""The rule of issue 13 item 6, enforced: no route or FastAPI dependency yields (or takes) a database session.

FastAPI runs a yield-dependency's exit code after the response is sent, so for a streamed chat after the whole
stream: a `Depends(get_db)` session would stay checked out while the model runs. Every route opens its own
short `async with get_read_only_session()` (or calls a service that does) instead.
"""

from __future__ import annotations

import ast
import inspect
import typing
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.api.app import create_app
from agentrt.db.session import Unscoped, get_db_session

API_DIR = Path(__file__).resolve().parents[2] / 'api'


def _routes(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, 'original_router'):  # FastAPI >= 0.160 wraps included routers
            yield from _routes(route.original_router.routes)


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    for dependency in dependant.dependencies:
        yield dependency
        yield from _dependants(dependency)


def _handles_a_session(call: Any) -> bool:
    target = call if inspect.isfunction(call) or inspect.ismethod(call) else getattr(call, '__call__', call)  # noqa: B004
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # a class without annotations, a builtin: nothing to find
        return False
    return any(hint is AsyncSession or AsyncSession in typing.get_args(hint) for hint in hints.values())


def session_problems(app: FastAPI) -> tuple[list[str], int]:
    """What breaks the rule in `app` (yielding dependencies, sessions as parameters), and how many were checked."""
    problems: list[str] = []
    checked = 0
    for route in _routes(app.router.routes):
        if _handles_a_session(route.endpoint):
            problems.append(f'{route.path}: the endpoint takes a session')
        for dependant in _dependants(route.dependant):
            checked += 1
            call = dependant.call
            if inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call):
                problems.append(f'{route.path}: {call} is a yield dependency')
            if _handles_a_session(call):
                problems.append(f'{route.path}: {call} takes or returns a session')
    return problems, checked


def test_no_route_or_dependency_yields_or_handles_a_session() -> None:
    problems, checked = session_problems(create_app(manage_runtime=False))
    assert problems == []
    assert checked >= 10  # the key checks: every route but health has them


def test_the_check_finds_a_session_dependency() -> None:
    async def get_db() -> AsyncIterator[AsyncSession]:
        async with get_db_session(account=Unscoped.ADMIN) as session:
            yield session

    async def with_session(session: AsyncSession = Depends(get_db)) -> None:  # noqa: B008
        return None

    app = FastAPI()
    app.get('/bad')(with_session)
    problems, _ = session_problems(app)
    assert len(problems) == 3  # the endpoint takes one; the dependency yields, and returns, one


def test_no_api_module_handles_a_session_object() -> None:
    """Sessions appear in the API only as `async with get_*_session() as session:` blocks, never passed around."""
    for path in sorted(API_DIR.glob('*.py')):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == 'sqlalchemy.ext.asyncio':
                raise AssertionError(f'{path.name} imports from sqlalchemy.ext.asyncio')
            if isinstance(node, ast.Call) and getattr(node.func, 'id', None) in ('Depends', 'Security'):
                names = [ast.unparse(arg) for arg in node.args]
                assert not any('session' in name.lower() for name in names), (path.name, names)
