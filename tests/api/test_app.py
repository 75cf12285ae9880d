"""The app itself: OpenAPI, nothing served at `/` unless asked, static files when asked, health."""

from __future__ import annotations

import re
from pathlib import Path

import httpx2
import pytest

from agentrt.api import health
from agentrt.api.app import create_app
from agentrt.db.migrate import head_revision
from tests.api.conftest import TEST_POOL_OUT, Keys, auth


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


async def test_nothing_is_served_at_the_root_unless_a_static_directory_is_given(
    client: httpx2.AsyncClient, tmp_path: Path
) -> None:
    assert (await client.get('/')).status_code == 404
    (tmp_path / 'index.html').write_text('<h1>chat</h1>')
    app = create_app(manage_runtime=False, static_dir=tmp_path)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url='http://test') as static:
        assert (await static.get('/')).text == '<h1>chat</h1>'
        assert (await static.get('/health/live')).json() == {'status': 'alive'}  # the API still wins


async def test_ready_reports_the_revision_and_the_pool(client: httpx2.AsyncClient) -> None:
    response = await client.get('/health/ready')
    body = response.json()
    assert response.status_code == 200 and body['status'] == 'ready'
    assert body['database'] == {'ok': True, 'revision': head_revision(), 'head': head_revision(), 'error': None}
    assert {key: body['pool'][key] for key in TEST_POOL_OUT} == TEST_POOL_OUT
    assert body['pool']['checked_out'] == 0 and body['background']['failed'] == 0


async def test_ready_is_503_when_the_schema_is_behind_or_the_database_does_not_answer(
    client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, '_head', lambda: '9999_future')
    behind = await client.get('/health/ready')
    assert behind.status_code == 503 and behind.json()['status'] == 'unavailable'
    assert behind.json()['database']['ok'] is True
    monkeypatch.setattr(health, 'READY_TIMEOUT_S', 0.000001)
    slow = await client.get('/health/ready')
    assert slow.status_code == 503 and slow.json()['database']['error'] == 'no answer within 1e-06 s'


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
