"""`create_app()`: the FastAPI application of the HTTP API, and its lifespan.

Routes: `/api/v1/chat` (streamed, Vercel AI protocol), `/api/v1/chat/ag-ui` (AG-UI, when `ag-ui-protocol` is
installed), `/api/v1/conversations...` (list, messages, delete, a non-streamed turn), `/api/v1/llm-audit/...`,
`/api/v1/costs`, `/api/v1/budget`, `/api/v1/me`, `/health/live`, `/health/ready`; OpenAPI at `/openapi.json`, docs
at `/docs`. The web UI (`api/static/`: plain HTML, CSS and JavaScript modules, no build step) is served at `/` with
`web_ui=True`, which is what `agentrt serve` runs (`create_served_app`); `static_dir` mounts a directory of your own
there instead.

The rule this project exists for holds here too: no route or dependency yields (or holds) a database session.
FastAPI runs a yield-dependency's exit after the response is sent, for a streamed chat after the whole stream, so a
`Depends(get_db)` session would stay checked out for the whole model run. Each operation opens its own
`async with get_read_only_session(account=...)` / `get_db_session(account=...)` instead
(`tests/api/test_no_session_dependency.py`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic_ai import Agent
from pydantic_ai.models import Model

from agentrt import __version__
from agentrt.agents.observability import spans_exported
from agentrt.agents.runtime import configure_observability, runtime_block
from agentrt.agents.simple_chat import default_chat_agent
from agentrt.agents.turn_input import validate_run_arguments
from agentrt.api import audit, budget, chat, conversations, costs, health, me
from agentrt.api.body_limit import BodySizeLimit
from agentrt.api.cut_off import CutOffAnswer
from agentrt.api.docs_pages import install_docs_pages
from agentrt.api.error_handlers import install_error_handlers
from agentrt.api.head_requests import HeadAsGet
from agentrt.api.message_schemas import document_messages
from agentrt.api.response_headers import ResponseHeaders
from agentrt.api.runtime_start import RuntimeStart, StartsRuntime, start_database_and_replay
from agentrt.api.schema_gate import SchemaGate
from agentrt.api.stopping import refusing_waiting_turns_on_stop
from agentrt.api.turn_stream import ChatConfig
from agentrt.api.url_text import Utf8Url
from agentrt.api.web_ui import WEB_UI_DIR, WEB_UI_HEADERS, FilesMount, WebUIFiles
from agentrt.db.engine import current_settings
from agentrt.db.errors import DatabaseNotInitializedError
from agentrt.db.settings import Settings, get_settings
from agentrt.services.heap import freeze_startup_heap
from agentrt.services.warnings_log import log_warnings
from agentrt.tools.dependencies import SessionDependencies


def create_app(
    *,
    agent: Agent[SessionDependencies, str] | None = None,
    model: Model | str | None = None,
    settings: Settings | None = None,
    manage_runtime: bool = True,
    static_dir: Path | None = None,
    web_ui: bool = False,
    freeze_heap: bool = False,
    refuse_on_stop: bool = False,
) -> FastAPI:
    """Build the HTTP API.

    Args:
        agent: the chat agent; `simple_chat`'s (`default_chat_agent()`) when omitted.
        model: the model for every turn; when omitted, the agent's own model, else `AGENTRT_MODEL`.
        settings: the runtime settings; read from the environment (and `.env`) when omitted.
        manage_runtime: start the database at start-up and shut the runtime down (background work drained, ledger
            flushed, pool closed) at shutdown, unless an `agentrt_runtime()` block around or inside the lifespan is
            still open (the last to end shuts down: `runtime_block`). False when the embedding program manages the
            runtime itself. Mounted in another app (whose server runs only that app's lifespan), the first request
            starts it instead, and the other app's shutdown calls `shutdown_runtime()`.
        static_dir: a directory to serve at `/` (`index.html` for `/`), e.g. a web UI of your own.
        web_ui: serve the packaged web UI at `/` (when `static_dir` is not given). Nothing is served at `/` when
            neither is given.
        freeze_heap: once the runtime has started, freeze the process's start-up objects out of the cyclic GC's way
            (`freeze_startup_heap`); what `agentrt serve` does, for a process that only serves this app.
        refuse_on_stop: while the app runs, a stop signal (SIGTERM, Ctrl-C) first refuses the chat turns waiting for
            admission (503 `shutting_down` at once, instead of at the end of the server's grace period); what
            `agentrt serve` does (`api/stopping.py`). It wraps the process's signal handlers: for a process that
            serves only this app.

    Raises:
        InvalidInputError: `agent` is not a pydantic-ai `Agent` a turn can run (its `deps_type` not
            `SessionDependencies`, its `output_type` not `str`), or `model` is neither a model name nor a `Model`.
    """

    start = RuntimeStart(settings, by_lifespan=not manage_runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not manage_runtime:
            yield
            return
        start.by_lifespan = True
        configure_observability()
        # One of the runtime's blocks, as an `agentrt_runtime()` is: run inside (or around) one of a program's own, it
        # shut the runtime down under that block at its end (QA). Alone (`agentrt serve`), its end shuts down, and
        # lets go of the embedded server: uvicorn ends its process (and stops its workers) by SIGTERM after this,
        # skipping exit handlers.
        async with runtime_block(release_embedded_server=True):
            await start_database_and_replay(settings)
            if freeze_heap:
                freeze_startup_heap()
            with refusing_waiting_turns_on_stop() if refuse_on_stop else contextlib.nullcontext():
                yield

    app = FastAPI(
        title='agentrt',
        version=__version__,
        summary='Pydantic AI chat agents on PostgreSQL: streamed chat, audit, costs and conversations per account.',
        lifespan=lifespan,
        # FastAPI's documentation pages, served by install_docs_pages with a Content-Security-Policy.
        docs_url=None,
        redoc_url=None,
        **_telemetry_option(),
    )
    install_docs_pages(app)
    # A wrong agent or model is the program's mistake: refused here, at build time, not at each chat request.
    validate_run_arguments(model=model, usage_limits=None, toolsets=(), instructions=(), agent=agent)
    app.state.agentrt_chat = ChatConfig(
        agent or default_chat_agent(),
        model,
        keepalive_seconds=lambda: _settings(settings).http_stream_keepalive_seconds,
        send_timeout_seconds=lambda: _settings(settings).stream_send_timeout_seconds,
    )
    install_error_handlers(app)
    # Mounted in another app, this one's lifespan never runs (Starlette runs the served app's only): the first request
    # starts the runtime instead.
    app.add_middleware(HeadAsGet)  # innermost: HEAD on a GET route is that GET's answer without its body
    app.add_middleware(SchemaGate)  # a schema left behind (AGENTRT_AUTO_MIGRATE=false): 503, not the routes' 500s
    app.add_middleware(StartsRuntime, start=start)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=lambda: _max_body_bytes(settings),
        body_timeout=lambda: _settings(settings).http_body_timeout_seconds,
    )
    app.add_middleware(CutOffAnswer)  # around every route: a request the shutdown cancels answers 503, not 500
    app.add_middleware(Utf8Url)  # a URL that is not text is refused before anything else reads it
    app.add_middleware(ResponseHeaders)  # outermost: on every response, the refusals of the layers inside included
    app.include_router(chat.router)
    document_messages(app)
    if importlib.util.find_spec('ag_ui') is not None:
        from agentrt.api import chat_agui

        app.include_router(chat_agui.router)
    for module in (conversations, audit, costs, budget, me, health):
        app.include_router(module.router)
    # Mounted last: every API route is matched before a file is looked for (and a path of the API is never a file's).
    files = None
    if static_dir is not None:
        files = WebUIFiles(directory=static_dir)
    elif web_ui:
        files = WebUIFiles(directory=WEB_UI_DIR, headers=WEB_UI_HEADERS)
    if files is not None:
        app.router.routes.append(FilesMount('/', files, router=app.router, name='static'))
    return app


def create_served_app() -> FastAPI:
    """What `agentrt serve` runs in each worker: `create_app()` with the web UI, unless `AGENTRT_HTTP_WEB_UI=false`,
    the start-up heap frozen (`freeze_heap`), waiting turns refused on a stop signal (`refuse_on_stop`) and Python
    warnings logged as one line each (`log_warnings`): the process serves only this app."""
    log_warnings()
    return create_app(web_ui=get_settings().http_web_ui, freeze_heap=True, refuse_on_stop=True)


def _telemetry_option() -> dict[str, Any]:
    """FastAPI's own request spans and metrics (newer FastAPI) only when spans leave the process.

    They go to the global OpenTelemetry providers, which `configure_observability()` sets up (logfire's) only when
    spans are exported (Logfire, OTLP or the console); like the runtime's other instrumentation, they are on only
    then: otherwise they would cost CPU on every request and every streamed event (~6 ms a turn) for spans nobody
    reads.
    """
    if 'telemetry' not in inspect.signature(FastAPI).parameters:
        return {}
    on = spans_exported()
    return {'telemetry': {'tracing': on, 'metrics': on, 'logs': on}}


def _max_body_bytes(settings: Settings | None) -> int:
    return _settings(settings).http_max_body_bytes


def _settings(settings: Settings | None) -> Settings:
    """The app's settings: those it was given, else the running runtime's, else the environment's."""
    if settings is not None:
        return settings
    try:
        return current_settings()
    except DatabaseNotInitializedError:
        return get_settings()
