"""The app itself: OpenAPI, nothing served at `/` unless asked, static files when asked, health."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI
from pydantic_ai import Agent

from agentrt.api import app as app_module
from agentrt.api import health, schema_gate
from agentrt.api.app import create_app, create_served_app
from agentrt.api.web_ui import WEB_UI_DIR
from agentrt.db import engine
from agentrt.db.errors import DatabaseUnavailableError, InvalidInputError
from agentrt.db.migrate import head_revision
from agentrt.db.settings import Settings
from agentrt.services.conversations._arguments import CONVERSATION_ID_CHARS
from agentrt.tools.dependencies import SessionDependencies
from tests.agents.cli.helpers import invoke, scratch_database
from tests.api.conftest import TEST_POOL_OUT, Keys, auth, serve
from tests.stalling_proxy import StallingDatabase


async def test_openapi_lists_every_route_and_the_key_scheme(client: httpx2.AsyncClient) -> None:
    spec = (await client.get('/openapi.json')).json()
    assert set(spec['paths']) >= {
        '/api/v1/chat',
        '/api/v1/chat/ag-ui',
        '/api/v1/conversations',
        '/api/v1/conversations/{conversation_id}',
        '/api/v1/conversations/{conversation_id}/turns',
        '/api/v1/llm-audit/interactions',
        '/api/v1/llm-audit/interactions/{interaction_id}',
        '/api/v1/costs',
        '/health/live',
        '/health/ready',
    }
    assert spec['components']['securitySchemes']['ApiKey'] == {
        'type': 'http',
        'scheme': 'bearer',
        'bearerFormat': 'art_<prefix>_<secret>',
        'description': 'An API key from `agentrt keys create`, sent as `Authorization: Bearer art_...`.',
    }
    audit = spec['paths']['/api/v1/llm-audit/interactions']['get']
    page_size = next(p for p in audit['parameters'] if p['name'] == 'page_size')
    assert page_size['schema']['maximum'] == 100
    assert audit['responses']['200']['content']['application/json']['schema'] == {
        '$ref': '#/components/schemas/InteractionPage'
    }


def test_openapi_declares_the_error_statuses_each_route_answers() -> None:
    # A request by id answered 404 and a turn 409 or 502 (README's status table) without OpenAPI saying so: a client
    # generated from it had no model for those bodies.
    paths = create_app().openapi()['paths']
    declared = {
        (method.upper(), path): set(op['responses']) for path, ops in paths.items() for method, op in ops.items()
    }
    body = {'400', '413', '415'}
    wanted = {
        ('POST', '/api/v1/chat'): {'409'} | body,
        ('POST', '/api/v1/chat/ag-ui'): {'409'} | body,
        ('POST', '/api/v1/conversations/{conversation_id}/turns'): {'409', '429', '502'} | body,
        ('GET', '/api/v1/conversations/{conversation_id}'): {'404'},
        ('DELETE', '/api/v1/conversations/{conversation_id}'): {'404', '409'},
        ('GET', '/api/v1/llm-audit/interactions/{interaction_id}'): {'404'},
    }
    missing = {route: sorted(statuses - declared[route]) for route, statuses in wanted.items()}
    assert {route: gone for route, gone in missing.items() if gone} == {}
    # A conditional read's 304 and the ETag it is keyed by (only the parameter's description named them)
    read = paths['/api/v1/conversations/{conversation_id}']['get']['responses']
    assert '304' in read and 'ETag' in read['304']['headers'] and 'ETag' in read['200']['headers']
    for (method, path), statuses in declared.items():
        for status in statuses - {'200', '204', '304'}:
            content = paths[path][method.lower()]['responses'][status].get('content', {})
            if not path.startswith('/health'):  # readiness answers its report, not an error body
                assert 'application/json' in content, (method, path, status)  # an error body's model, not a bare line


def test_openapi_types_the_required_fields_of_the_ag_ui_body() -> None:
    # The body was an object with three required keys of any type: a generated client (or schemathesis) took
    # `{"threadId": null, "runId": null, "messages": null}` for a valid body, which the route refuses with 422.
    paths = create_app().openapi()['paths']
    schema = paths['/api/v1/chat/ag-ui']['post']['requestBody']['content']
    properties = schema['application/json']['schema']['properties']
    assert {name: properties[name]['type'] for name in ('threadId', 'runId', 'messages')} == {
        'threadId': 'string',
        'runId': 'string',
        'messages': 'array',
    }
    # Each message as ag_ui.core reads it: its id, and a role it knows (any object was valid, and refused).
    from ag_ui.core import RunAgentInput

    model = RunAgentInput.model_json_schema(by_alias=True)['properties']['messages']['items']
    assert properties['messages']['items']['required'] == ['id', 'role']
    assert properties['messages']['minItems'] == 1  # `[]` read as valid, and was refused (422)
    assert properties['messages']['items']['properties']['role']['enum'] == sorted(model['discriminator']['mapping'])
    # The same conversation id rule as the other chat's `id`, as long as the store's column.
    vercel = paths['/api/v1/chat']['post']['requestBody']['content']['application/json']['schema']['properties']['id']
    for rule in ('maxLength', 'pattern'):
        assert properties['threadId'][rule] == vercel[rule]
        assert properties['runId'][rule] == vercel[rule]  # checked by the same rule (`validate_protocol_id`)
    assert vercel['maxLength'] == CONVERSATION_ID_CHARS


def test_openapi_gives_the_messages_the_shapes_pydantic_ai_reads_and_writes() -> None:
    # Each message of a chat body was any object (schemathesis's bodies of `{}` messages read as valid and were
    # refused, 422), then `{id, role, parts}` with the parts untyped: now pydantic-ai's `UIMessage`, every kind of part
    # included. A conversation's messages were a list of anything: now `UIMessage` or pydantic-ai's `ModelMessage`.
    from pydantic_ai.ui.vercel_ai.request_types import UIMessage

    from agentrt.api.message_schemas import ISO_DURATION, iso_durations
    from agentrt.services.message_json import message_adapter

    document = create_app().openapi()
    body = document['paths']['/api/v1/chat']['post']['requestBody']['content']['application/json']
    messages = body['schema']['properties']['messages']
    assert messages['minItems'] == 1 and messages['items'] == {'$ref': '#/components/schemas/UIMessage'}
    schemas = document['components']['schemas']
    read = schemas['ConversationMessages']['properties']['messages']
    assert read['items'] == {
        'anyOf': [{'$ref': '#/components/schemas/UIMessage'}, {'$ref': '#/components/schemas/ModelMessage'}]
    }
    template = '#/components/schemas/{model}'
    for name, model in (
        ('UIMessage', UIMessage.model_json_schema(by_alias=True, ref_template=template)),
        ('ModelMessage', message_adapter.json_schema(mode='serialization', by_alias=True, ref_template=template)),
    ):
        model = iso_durations(model)
        assert {part: schemas[part] for part in model['$defs']} == model.pop('$defs')
        assert schemas[name] == model
    # Their parts' kinds beside the API's own schemas.
    assert {'TextUIPart', 'ToolCallPart', 'ModelRequest', 'ErrorOut'} <= set(schemas)
    # A response's duration is what pydantic writes (`PT0.010479S`), not the `duration` format (no fractions).
    if 'duration' in schemas['ModelResponse']['properties']:  # 2.78 has it, 2.68 does not
        duration = schemas['ModelResponse']['properties']['duration']['anyOf'][0]
        assert duration == {'type': 'string', 'pattern': ISO_DURATION}
    assert not [schema for schema in _subschemas(document) if schema.get('format') == 'duration']
    for written in ('PT0.010479S', 'P1DT2H3M4.5S', '-PT1S', 'P21D', 'PT0S'):
        assert re.fullmatch(ISO_DURATION.strip('^$'), written), written
    for not_a_duration in ('P', 'PT', '-P', 'P1DT', 'PT1', 'P1H', '1D', 'PT1.S', ''):
        assert not re.fullmatch(ISO_DURATION.strip('^$'), not_a_duration), not_a_duration
    # Every reference in the document resolves.
    names = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document)))
    assert names and names <= set(schemas)


def _subschemas(schema: Any) -> list[dict[str, Any]]:
    if isinstance(schema, list):
        return [found for item in schema for found in _subschemas(item)]
    if not isinstance(schema, dict):
        return []
    return [schema, *(found for value in schema.values() for found in _subschemas(value))]


async def test_nothing_is_served_at_the_root_unless_a_static_directory_is_given(
    client: httpx2.AsyncClient, tmp_path: Path
) -> None:
    assert (await client.get('/')).status_code == 404
    (tmp_path / 'index.html').write_text('<h1>chat</h1>')
    app = create_app(manage_runtime=False, static_dir=tmp_path)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url='http://test') as static:
        page = await static.get('/')
        assert page.text == '<h1>chat</h1>' and 'content-security-policy' not in page.headers  # your page, your rules
        assert (await static.get('/health/live')).json() == {'status': 'alive'}  # the API still wins


async def test_the_web_ui_is_served_with_every_file_it_loads_and_a_strict_policy() -> None:
    app = create_app(manage_runtime=False, web_ui=True)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url='http://test') as ui:
        page = await ui.get('/')
        assert page.status_code == 200 and page.headers['content-type'].startswith('text/html')
        policy = page.headers['content-security-policy']
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and 'unsafe' not in policy
        assert page.headers['x-content-type-options'] == 'nosniff'
        # Every file the page and its modules load is there, scripts with a JavaScript type (modules need one).
        wanted = set(re.findall(r'(?:src|href)="([\w./-]+\.(?:js|css|svg))"', page.text))
        for module in (WEB_UI_DIR / 'js').glob('*.js'):
            wanted |= {f'js/{name}' for name in re.findall(r"from '\./([\w.-]+\.js)'", module.read_text())}
        assert {'js/app.js', 'app.css', 'js/chat.js', 'js/stream.js'} <= wanted
        for name in sorted(wanted):
            response = await ui.get(f'/{name}')
            assert response.status_code == 200, name
            if name.endswith('.js'):
                assert response.headers['content-type'].split(';')[0] in ('text/javascript', 'application/javascript')
        # An unknown API path is still the API's JSON error, not a page.
        missing = await ui.get('/api/v1/no-such-route')
        assert missing.status_code == 404 and missing.json()['type'] == 'not_found'


@pytest.mark.parametrize(
    'header',
    ['bytes=5-2', 'items=0-1', 'Items=0-5', 'bytes=abc', 'bytes=-', 'bytes=1_0-20', 'bytes=0x1-2', 'bytes=,', 'bytes'],
)
async def test_a_range_that_is_not_a_byte_range_set_is_ignored_and_the_whole_file_served(header: str) -> None:
    # RFC 9110 section 14.2: an unknown unit MUST be ignored, an invalid range set may be; Starlette answered 400
    # in plain text, and `1_0` (Python's int takes `_`) was read as 10, a wrong 206.
    whole = (WEB_UI_DIR / 'index.html').read_bytes()
    app = create_app(manage_runtime=False, web_ui=True)
    async for url in serve(app):
        async with httpx2.AsyncClient(base_url=url) as ui:
            response = await ui.get('/index.html', headers={'Range': header})
            assert (response.status_code, response.content) == (200, whole), header
            assert 'content-range' not in response.headers
            # A valid range still answers its bytes (two ranges as multipart).
            part = await ui.get('/index.html', headers={'Range': 'bytes=0-9, 20-'})
            assert part.status_code == 206 and part.headers['content-type'].startswith('multipart/byteranges')
            one = await ui.get('/index.html', headers={'Range': 'bytes=1-4'})
            assert (one.status_code, one.content, one.headers['content-range']) == (
                206,
                whole[1:5],
                f'bytes 1-4/{len(whole)}',
            )
            suffix = await ui.get('/index.html', headers={'Range': 'bytes=-3'})
            assert (suffix.status_code, suffix.content) == (206, whole[-3:])


@pytest.mark.parametrize('web_ui', [True, False], ids=['web UI', 'API only'])
async def test_a_method_a_route_does_not_serve_is_405_naming_the_ones_it_does(web_ui: bool) -> None:
    """The web UI's files, mounted at `/`, took every request whose method an API route did not serve (Starlette
    prefers a mount that matches to a route whose method differs): `HEAD /health/live` was 404, and `OPTIONS` or
    `DELETE /api/v1/chat` 405 with `Allow: GET, HEAD`, the files' methods, where the route serves POST."""
    app = create_app(manage_runtime=False, web_ui=web_ui)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url='http://test') as client:
        for method, path, allowed in [
            ('HEAD', '/api/v1/chat', 'POST'),
            ('OPTIONS', '/api/v1/chat', 'POST'),
            ('DELETE', '/api/v1/chat', 'POST'),
            ('PUT', '/api/v1/conversations', 'GET, HEAD'),
            ('POST', '/api/v1/conversations/c-1', 'GET, HEAD, DELETE'),
            ('GET', '/api/v1/conversations/c-1/turns', 'POST'),
        ]:
            response = await client.request(method, path)
            assert (response.status_code, response.headers.get('allow')) == (405, allowed), (method, path)
            if method != 'HEAD':
                assert response.json()['type'] == 'method_not_allowed', (method, path)
        # A trailing slash is redirected to the route's path, as the API alone does (it was the files' 404, or 405
        # with their methods), by the path alone.
        for method, path in [('POST', '/api/v1/chat/'), ('GET', '/api/v1/conversations/'), ('HEAD', '/health/live/')]:
            response = await client.request(method, path)
            assert (response.status_code, response.headers.get('location')) == (307, path[:-1])
        if web_ui:  # the files keep their own methods
            assert (await client.head('/')).status_code == 200
            assert (await client.options('/app.css')).headers.get('allow') == 'GET, HEAD'


async def test_a_method_files_do_not_take_on_a_path_nothing_serves_is_404_as_its_get() -> None:
    """With the web UI mounted at `/`, `POST /api/v1/nosuch` (or `/api/v1/chat/ag-ui` without the agui extra) was
    405 with `Allow: GET, HEAD`, where a GET of the same path is 404: a typo in a path looked like the wrong method."""
    app = create_app(manage_runtime=False, web_ui=True)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url='http://test') as client:
        for method, path in [('POST', '/api/v1/nosuch'), ('PUT', '/nosuch.css'), ('DELETE', '/js/nosuch.js')]:
            assert (await client.get(path)).status_code == 404, path
            response = await client.request(method, path)
            assert (response.status_code, response.json()['type']) == (404, 'not_found'), (method, path)
            assert 'allow' not in response.headers
        # A file there keeps its 405 naming the methods it takes.
        for method, path in [('POST', '/'), ('PUT', '/app.css'), ('DELETE', '/index.html')]:
            response = await client.request(method, path)
            assert (response.status_code, response.headers.get('allow')) == (405, 'GET, HEAD'), (method, path)


def test_agentrt_serve_runs_the_web_ui_unless_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    def mounted(app: FastAPI) -> bool:
        return any(getattr(route, 'name', None) == 'static' for route in app.routes)

    monkeypatch.setattr(app_module, 'get_settings', lambda: Settings(http_web_ui=True))
    assert mounted(create_served_app())
    monkeypatch.setattr(app_module, 'get_settings', lambda: Settings(http_web_ui=False))
    assert not mounted(create_served_app())
    assert not mounted(create_app(manage_runtime=False))  # a library user's app: the API only, unless asked


def test_an_agent_or_model_a_turn_cannot_run_is_refused_when_the_app_is_built() -> None:
    # Built with such an agent, every chat request failed mid-run (its tools got SessionDependencies where they
    # expected their own deps), each after a billed model request.
    @dataclass
    class OtherDeps:
        tenant: str

    with pytest.raises(InvalidInputError, match="the agent's deps_type is OtherDeps") as info:
        create_app(manage_runtime=False, agent=Agent(None, deps_type=OtherDeps))
    assert info.value.field == 'agent'
    # A structured output reached the HTTP turn's text answer as a model object.
    with pytest.raises(InvalidInputError, match="the agent's output_type is list") as info:
        create_app(manage_runtime=False, agent=Agent(None, deps_type=SessionDependencies, output_type=list[int]))
    assert info.value.field == 'agent'
    with pytest.raises(InvalidInputError, match='model must be a model name') as info:
        create_app(manage_runtime=False, model=42)  # type: ignore[arg-type]
    assert info.value.field == 'model'
    assert create_app(manage_runtime=False, agent=Agent(None, deps_type=SessionDependencies))


async def test_ready_reports_the_revision_and_the_pool(client: httpx2.AsyncClient) -> None:
    response = await client.get('/health/ready')
    body = response.json()
    assert response.status_code == 200 and body['status'] == 'ready'
    assert body['database'] == {'ok': True, 'revision': head_revision(), 'head': head_revision(), 'error': None}
    assert {key: body['pool'][key] for key in TEST_POOL_OUT} == TEST_POOL_OUT
    assert body['pool']['checked_out'] == 0 and body['background']['failed'] == 0


async def test_ready_is_503_when_the_schema_is_behind_or_the_database_does_not_answer(
    client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(health, '_head', lambda: '9999_future')
    behind = await client.get('/health/ready')
    assert behind.status_code == 503 and behind.json()['status'] == 'unavailable'
    assert behind.json()['database']['ok'] is True
    monkeypatch.setattr(health, 'READY_TIMEOUT_S', 0.000001)
    with caplog.at_level(logging.WARNING, logger='agentrt'):
        slow = await client.get('/health/ready')
        again = await client.get('/health/ready')
    error = slow.json()['database']['error']
    assert slow.status_code == 503 and error.startswith('no answer within 1e-06 s (error id err_'), error
    assert again.json()['database']['error'] == error  # the same cause: the same id, not logged again
    # A server that does not answer (frozen, blocked on a lock) is logged once, as a refused connection is (QA).
    [logged] = [r.getMessage() for r in caplog.records if 'readiness' in r.getMessage()]
    assert 'database check failed: no answer within 1e-06 s' in logged


async def test_ready_answers_within_its_timeout_while_the_database_hangs(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database that hangs (a proxy that stops forwarding and keeps its sockets open): the probe answered 503 after
    # 3 s, not 1, the cancelled session's clean-up waiting on the hung connection first, so a probe with Kubernetes'
    # default timeout (1 s) failed on the client's side (QA).
    for name in ('error_id', 'cause', 'repeats'):  # this test's outage is its own: the next tests' starts none
        monkeypatch.setattr(health._Outage, name, getattr(health._Outage, name))
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    saved_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    saved, engine._runtime = engine._runtime, None
    try:
        async with StallingDatabase(database_url).running() as proxy:
            try:
                await engine.init_database(Settings(database_url=proxy.url), migrate=False)
                transport = httpx2.ASGITransport(app=create_app(manage_runtime=False))
                async with httpx2.AsyncClient(transport=transport, base_url='http://test', timeout=30) as client:
                    assert (await client.get('/health/ready')).status_code == 200  # its connection through the proxy
                    proxy.stall()
                    started = time.monotonic()
                    hung = await client.get('/health/ready')
                    took = time.monotonic() - started
                    assert hung.status_code == 503, hung.text
                    assert hung.json()['database']['error'].startswith('no answer within 1 s (error id err_')
                    assert took < health.READY_TIMEOUT_S + 0.5, f'answered after {took:.2f} s'
                    # The connection given up in the background: back to the pool or discarded, none left out.
                    for _ in range(100):
                        if engine.pool_status().checked_out == 0:
                            break
                        await asyncio.sleep(0.1)
                    assert engine.pool_status().checked_out == 0
                    proxy.resume()
                    assert (await client.get('/health/ready')).status_code == 200
            finally:
                await engine.close_database()
    finally:
        engine._runtime = saved
        gc.collect()  # a task whose exception nobody retrieved says so as it is collected
        loop.set_exception_handler(saved_handler)
    assert not unhandled, unhandled


async def test_ready_on_a_schema_a_newer_version_migrated(
    client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rolling upgrade (or a rollback of the package): the server starts on the newer schema, with a warning, as every
    # command does; its readiness said 503 "unavailable" for as long as it ran, though it serves.
    newest = head_revision()
    monkeypatch.setattr(health, '_head', lambda: '0012_row_level_security')  # this version's newest, one behind
    monkeypatch.setattr(health, '_known', lambda: frozenset({'0012_row_level_security'}))
    response = await client.get('/health/ready')
    assert response.status_code == 200 and response.json()['status'] == 'ready'
    assert response.json()['database'] == {
        'ok': True,
        'revision': newest,
        'head': '0012_row_level_security',
        'error': None,
    }


def _readme_section(heading: str) -> str:
    text = (Path(__file__).resolve().parents[2] / 'README.md').read_text()
    section = text[text.index(heading) :]
    return section[: section.index('\n## ', 3)]


async def test_the_readmes_curl_examples_work_as_written(keys: Keys, client: httpx2.AsyncClient) -> None:
    section = _readme_section('## Serving over HTTP')
    body = re.search(r"-d '(\{.*?\})'", section, re.DOTALL)
    audit = re.search(r"curl -s '(http://127\.0\.0\.1:8000)(/api/v1/llm-audit/interactions\?[^']*)'", section)
    assert body is not None and audit is not None
    chat = await client.post(
        '/api/v1/chat', content=body.group(1), headers={**auth(keys.acme), 'content-type': 'application/json'}
    )
    assert chat.status_code == 200 and chat.text.rstrip().endswith('data: [DONE]')
    page = (await client.get(audit.group(2), headers=auth(keys.acme))).json()
    assert (page['page'], page['page_size'], page['total']) == (1, 20, 3)


async def test_an_outage_is_logged_once_however_often_readiness_is_probed(
    client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A load balancer probes every few seconds, each process answers: every failed probe logged a WARNING with the same
    # cause, a line per probe and process for as long as PostgreSQL or PgBouncer was away.
    working = health.get_read_only_session
    cause = 'cannot connect to PostgreSQL: [Errno 111] Connection refused'

    def away(**_: Any) -> Any:
        raise DatabaseUnavailableError(cause)

    caplog.set_level(logging.INFO, logger='agentrt.api')
    monkeypatch.setattr(health, 'get_read_only_session', away)
    answers = [await client.get('/health/ready') for _ in range(5)]
    assert {answer.status_code for answer in answers} == {503}
    errors = {answer.json()['database']['error'] for answer in answers}
    assert len(errors) == 1, 'every probe names the one logged failure'
    logged = [record for record in caplog.records if record.name == 'agentrt.api']
    assert [record.levelname for record in logged] == ['WARNING']
    assert cause in logged[0].getMessage() and errors.pop().split('error id ')[1].rstrip(')') in logged[0].getMessage()
    monkeypatch.setattr(health, 'get_read_only_session', working)
    assert (await client.get('/health/ready')).status_code == 200
    assert (await client.get('/health/ready')).status_code == 200
    back = [record.getMessage() for record in caplog.records if record.name == 'agentrt.api'][1:]
    assert len(back) == 1 and 'answers again' in back[0] and '4 more failed' in back[0]
    monkeypatch.setattr(health, 'get_read_only_session', away)
    assert (await client.get('/health/ready')).status_code == 503
    assert [r.levelname for r in caplog.records if r.name == 'agentrt.api'] == ['WARNING', 'INFO', 'WARNING']
    monkeypatch.setattr(health, 'get_read_only_session', working)
    assert (await client.get('/health/ready')).status_code == 200  # the process's outage ended for the next tests


async def test_api_requests_on_a_schema_left_behind_answer_503_saying_to_upgrade(
    keys: Keys, client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # With AGENTRT_AUTO_MIGRATE=false on a schema behind, the app starts (readiness 503) and its routes ran on tables
    # that are not there: 500 internal_error, an UndefinedColumnError traceback (QA). The runtime started on a schema
    # behind, and read so again, stands in for a database an upgrade has not migrated.
    runtime = engine._require()
    monkeypatch.setattr(runtime, 'schema_behind', '0016_budget_windows')
    reads: list[str] = []

    async def still_behind(_: object) -> str | None:
        reads.append('read')
        return None if upgraded else '0016_budget_windows'

    upgraded = False
    monkeypatch.setattr(schema_gate, 'revision_behind', still_behind)
    with caplog.at_level(logging.WARNING, logger='agentrt'):
        listed = await client.get('/api/v1/conversations', headers=auth(keys.acme))
        turn = await client.post('/api/v1/conversations/gated/turns', json={'message': 'hi'}, headers=auth(keys.acme))
    for refused in (listed, turn):
        body = refused.json()
        assert refused.status_code == 503 and body['type'] == 'schema_behind', body
        assert f'at revision 0016_budget_windows; this version needs {head_revision()}' in body['detail']
        assert 'agentrt db upgrade' in body['detail'] and refused.headers['retry-after'] == '30'
    assert sum('schema is behind' in record.getMessage() for record in caplog.records) == 1  # said once
    assert len(reads) == 1  # read again at most every RECHECK_S
    assert (await client.get('/health/live')).status_code == 200
    # Upgraded meanwhile: the next read after RECHECK_S sees it, and the gate stays open without reading again.
    upgraded = True
    monkeypatch.setattr(schema_gate, 'RECHECK_S', 0.0)
    for _ in range(2):
        assert (await client.get('/api/v1/conversations', headers=auth(keys.acme))).status_code == 200
    assert len(reads) == 2 and runtime.schema_behind is None


async def test_the_schema_gates_log_line_escapes_the_path_it_was_asked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The gate runs before the key is checked, and logged the path raw (percent-decoded): `%0A` forged a log line of
    # its own and `%1B` put a terminal's escapes in it, from a request with no valid key (qa140).
    monkeypatch.setattr(engine._require(), 'schema_behind', '0017_claim_holders')

    async def still_behind(_: object) -> str | None:
        return '0017_claim_holders'

    monkeypatch.setattr(schema_gate, 'revision_behind', still_behind)
    transport = httpx2.ASGITransport(app=create_app(manage_runtime=False))
    async with httpx2.AsyncClient(transport=transport, base_url='http://test') as client:
        with caplog.at_level(logging.WARNING, logger='agentrt'):
            path = '/api/v1/conversations/a%0AWARNING:  forged%1B%5B2J%1B%5D0%3BGATE%07'
            refused = await client.get(path, headers={'Authorization': 'Bearer x'})
    assert refused.status_code == 503, refused.text
    [line] = [record.getMessage() for record in caplog.records if 'schema is behind' in record.getMessage()]
    assert line.isprintable(), line
    expected = r'GET /api/v1/conversations/a\nWARNING:  forged\x1b[2J\x1b]0;GATE\x07: '
    assert f'{refused.json()["error_id"]} {expected}' in line, line


async def test_an_app_started_on_a_real_schema_left_behind_refuses_api_requests(database_url: str) -> None:
    # The previous release's database (0017), AGENTRT_AUTO_MIGRATE=false: the runtime starts (allow_behind, as the
    # app's start does) and says the schema is behind; an API request is a 503 before anything reads a missing table.
    async with scratch_database(database_url, 'gate') as behind:
        upgraded = await invoke('db', 'upgrade', '0017_claim_holders', env={'DATABASE_URL': behind})
        assert upgraded.exit_code == 0, upgraded.stderr
        saved, engine._runtime = engine._runtime, None
        try:
            await engine.init_database(Settings(database_url=behind, auto_migrate=False), allow_behind=True)
            assert engine.schema_left_behind() == '0017_claim_holders'
            transport = httpx2.ASGITransport(app=create_app(manage_runtime=False))
            async with httpx2.AsyncClient(transport=transport, base_url='http://test') as client:
                refused = await client.get('/api/v1/budget', headers={'Authorization': 'Bearer art_0123456789ab_x'})
                ready = await client.get('/health/ready')
        finally:
            await engine.close_database()
            engine._runtime = saved
    assert refused.status_code == 503 and refused.json()['type'] == 'schema_behind', refused.text
    assert 'at revision 0017_claim_holders' in refused.json()['detail']
    assert ready.status_code == 503


async def test_the_schema_gate_holds_for_a_mounted_app_and_passes_a_request_it_cannot_check(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mounted (`outer.mount('/agent', create_app())`), the request's path kept the prefix and the gate let every
    # route run on the schema behind (500s); and a recheck that met the driver's own connect error (the socket gone)
    # was a 500 itself, where a route answers 503 database_unavailable in an outage (QA).
    runtime = engine._require()
    monkeypatch.setattr(runtime, 'schema_behind', '0017_claim_holders')

    async def still_behind(_: object) -> str | None:
        return '0017_claim_holders'

    monkeypatch.setattr(schema_gate, 'revision_behind', still_behind)
    outer = FastAPI()
    outer.mount('/agent', create_app(manage_runtime=False))
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=outer), base_url='http://test') as client:
        refused = await client.get('/agent/api/v1/me', headers=auth(keys.acme))
        assert refused.status_code == 503 and refused.json()['type'] == 'schema_behind', refused.text

        async def socket_gone(_: object) -> str | None:
            raise FileNotFoundError(2, 'No such file or directory')

        monkeypatch.setattr(schema_gate, 'revision_behind', socket_gone)
        monkeypatch.setattr(schema_gate, 'RECHECK_S', 0.0)
        passed = await client.get('/agent/api/v1/me', headers=auth(keys.acme))
    assert passed.status_code == 200, passed.text  # passed on: the database answers the route itself here
