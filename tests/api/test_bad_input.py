"""Bad query values, paths and bodies on every route: a clear 4xx naming the problem, never a 500, nothing run."""

from __future__ import annotations

import base64
import json

import httpx2

from agentrt.services.conversations import PostgresConversationStore
from agentrt.services.ledger import get_request_tracker
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, auth
from tests.factories import ledger_rows

AUDIT = '/api/v1/llm-audit/interactions'


def _cursor(moment: str, key: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([moment, key]).encode()).decode().rstrip('=')


BAD_QUERIES: list[tuple[str, dict[str, str]]] = [
    (AUDIT, {'page': '0'}),
    (AUDIT, {'page': '-1'}),
    (AUDIT, {'page': '1' + '0' * 30}),
    (AUDIT, {'page': '1.5'}),
    (AUDIT, {'page': 'NaN'}),
    (AUDIT, {'page_size': '0'}),
    (AUDIT, {'page_size': '1000'}),
    (AUDIT, {'page_size': '9' * 40}),
    (AUDIT, {'success': 'maybe'}),
    (AUDIT, {'since': 'yesterday'}),
    (AUDIT, {'since': '2026-13-45'}),
    (AUDIT, {'since': '99999-01-01'}),
    (AUDIT, {'since': '1e30'}),
    (AUDIT, {'until': '9' * 40}),
    (AUDIT, {'since': '9999-12-31T23:00:00-05:00'}),
    (AUDIT, {'since': '2026-03-02', 'until': '2026-03-01'}),
    (AUDIT, {'model': 'gpt\x00-4o'}),
    (AUDIT, {'model': 'x' * 201}),
    (AUDIT, {'agent': ''}),
    (AUDIT, {'conversation_id': 'a\nb'}),
    (AUDIT, {'cursor': 'garbage!'}),
    (AUDIT, {'cursor': base64.urlsafe_b64encode(b'{"a": 1}').decode()}),
    (AUDIT, {'cursor': base64.urlsafe_b64encode(json.dumps(['2026-03-01T00:00:00+00:00', 'nope']).encode()).decode()}),
    (AUDIT, {'cursor': base64.urlsafe_b64encode(json.dumps(['2026-03-01T00:00:00', 'x']).encode()).decode()}),
    (AUDIT, {'cursor': 'A' * 601}),
    (
        AUDIT,
        {
            'page': '2',
            'cursor': 'WyIyMDI2LTAzLTAxVDEyOjAwOjAwKzAwOjAwIiwiMDFhMjMwMTQtZWE4Ny03OTFjLWFmZTctODIzMTc0ZDI3NGE1Il0',
        },
    ),
    (f'{AUDIT}/not-a-uuid', {}),
    (f'{AUDIT}/{"1" * 40}', {}),
    (f'{AUDIT}/01a23014', {}),
    ('/api/v1/costs', {'by': 'hour'}),
    ('/api/v1/costs', {'source': 'cache'}),
    ('/api/v1/costs', {'since': 'never'}),
    ('/api/v1/costs', {'model': '\x7f'}),
    ('/api/v1/conversations', {'limit': '0'}),
    ('/api/v1/conversations', {'limit': '101'}),
    ('/api/v1/conversations', {'cursor': 'x'}),
    # hand-made cursors of the right shape: a moment past the ends once in UTC, an id PostgreSQL cannot take (500s)
    ('/api/v1/conversations', {'cursor': _cursor('0001-01-01T00:00:00+14:00', 'x')}),
    ('/api/v1/conversations', {'cursor': _cursor('9999-12-31T23:59:59-14:00', 'x')}),
    ('/api/v1/conversations', {'cursor': _cursor('2026-01-01T00:00:00+00:00', 'a\x00b')}),
    ('/api/v1/conversations', {'cursor': _cursor('2026-01-01T00:00:00+00:00', 'a\ud800b')}),
    (AUDIT, {'cursor': _cursor('0001-01-01T00:00:00+14:00', '01a23014-ea87-791c-afe7-823174d274a5')}),
    (AUDIT, {'cursor': _cursor('9999-12-31T23:59:59-14:00', '01a23014-ea87-791c-afe7-823174d274a5')}),
    ('/api/v1/conversations/c1', {'format': 'xml'}),
    (f'/api/v1/conversations/{"c" * 201}', {}),
    ('/api/v1/conversations/a%20b', {}),
    ('/api/v1/conversations/-x', {}),
    ('/api/v1/conversations/a%00b', {}),
    ('/api/v1/conversations/a%07b', {}),
]


async def test_bad_query_values_are_422_naming_the_problem(keys: Keys, client: httpx2.AsyncClient) -> None:
    wrong = []
    for path, params in BAD_QUERIES:  # one test, one set-up: each case is a request, not a fixture
        response = await client.get(path, params=params, headers=auth(keys.acme))
        body = response.json()
        if response.status_code != 422 or not _names_the_problem(body):
            wrong.append((path, params, response.status_code, body))
    assert wrong == []


def _names_the_problem(body: dict[str, object]) -> bool:
    if not str(body.get('error_id', '')).startswith('err_'):
        return False
    detail = body['detail']
    if body['type'] == 'invalid_request':  # FastAPI's validation: every bad field and where it is, no value echoed
        return isinstance(detail, list) and all(e['loc'] and e['msg'] and 'input' not in e for e in detail)
    return body['type'] == 'invalid_input' and bool(body.get('field')) and bool(detail)


BAD_TURNS: list[tuple[str, str]] = [
    ('{}', 'missing message'),
    ('{"message": ""}', 'empty'),
    ('{"message": "   "}', 'blank'),
    ('{"message": 42}', 'not text'),
    ('{"message": "hi", "extra": 1}', 'unknown field'),
    ('{"message": "hi", "agent": ""}', 'empty agent'),
    ('{"message": "hi", "agent": "' + 'a' * 65 + '"}', 'long agent'),
    ('{"message": "hi", "agent": "nobody"}', 'unknown agent'),
    ('{"message": "' + 'x' * 32_001 + '"}', 'over AGENTRT_MESSAGE_MAX_CHARS'),
    ('{"message": "hi", "agent": "bad slug"}', 'agent with a space'),
    ('[1, 2]', 'array'),
    ('{"message": ', 'truncated JSON'),
    ('not json', 'not JSON'),
]


async def test_bad_turn_bodies_are_refused_before_anything_runs(keys: Keys, client: httpx2.AsyncClient) -> None:
    wrong = []
    for content, why in BAD_TURNS:
        response = await client.post(
            '/api/v1/conversations/c1/turns',
            content=content,
            headers={**auth(keys.acme), 'content-type': 'application/json'},
        )
        if response.status_code != 422 or not response.json()['error_id'].startswith('err_'):
            wrong.append((why, response.status_code, response.text))
    assert wrong == []
    await get_request_tracker().flush()
    assert await ledger_rows() == []


async def test_a_turn_body_not_declared_json_is_415_as_on_the_streamed_routes(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    # It was a 422 saying the body "should be a valid dictionary": FastAPI reads only a JSON-typed body as JSON.
    path = '/api/v1/conversations/c1/turns'
    for media_type in ('text/plain', 'application/x-www-form-urlencoded', 'application/json-seq', None):
        headers = {**auth(keys.acme), **({'content-type': media_type} if media_type else {})}
        response = await client.post(path, content='{"message": "hi"}', headers=headers)
        assert response.status_code == 415 and response.json()['type'] == 'unsupported_media_type', response.text
    charset = await client.post(
        path,
        content='{"message": "Dermatologists"}',
        headers={**auth(keys.acme), 'content-type': 'application/json; charset=utf-8'},
    )
    assert charset.status_code == 200, charset.text
    keyless = await client.post(path, content='{"message": "hi"}', headers={'content-type': 'text/plain'})
    assert keyless.status_code == 401  # the key first


async def test_a_body_that_is_not_utf8_or_nested_too_deep_is_named_as_such(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    # FastAPI's own words were "There was an error parsing the body", naming neither the body's fault nor the fix.
    headers = {**auth(keys.acme), 'content-type': 'application/json'}
    for content in (
        b'{"message": "\xff\xfe"}',
        b'{"message": "hi", "agent": ' + b'[' * 100_000 + b']' * 100_000 + b'}',
    ):
        response = await client.post('/api/v1/conversations/c1/turns', content=content, headers=headers)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body['field'] == 'body' and body['error_id'].startswith('err_'), body
        assert 'not JSON this server can read' in body['detail'] and 'UTF-8' in body['detail'], body
    await get_request_tracker().flush()
    assert await ledger_rows() == []


async def test_bodies_over_the_limit_or_with_a_lying_length_are_refused(keys: Keys, client: httpx2.AsyncClient) -> None:
    huge = json.dumps({'message': 'x' * (4 * 1024 * 1024)})
    response = await client.post('/api/v1/conversations/c1/turns', content=huge, headers=auth(keys.acme))
    assert response.status_code == 413 and response.json()['type'] == 'body_too_large'

    async def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(5):
            yield b'x' * (1024 * 1024)

    streamed = await client.post(
        '/api/v1/chat', content=chunks(), headers={**auth(keys.acme), 'content-type': 'application/json'}
    )
    assert streamed.status_code == 413
    bad_length = await client.post('/api/v1/chat', content=b'{}', headers={**auth(keys.acme), 'content-length': 'abc'})
    assert bad_length.status_code == 400


async def test_a_nul_in_a_message_is_stored_as_a_replacement_character_a_lone_surrogate_refused(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    headers = {**auth(keys.acme), 'content-type': 'application/json'}
    path = '/api/v1/conversations/odd/turns'
    response = await client.post(path, content='{"message": "cardiologists\\u0000in Seattle"}', headers=headers)
    assert response.status_code == 200, response.text
    stored = await PostgresConversationStore(await account_id('acme-health')).load('odd')
    assert stored is not None
    prompts = [part.content for m in stored.messages for part in m.parts if part.part_kind == 'user-prompt']
    assert prompts == ['cardiologists\ufffdin Seattle']  # as simple_chat stores it (the store cannot hold a NUL)
    # JSON text with a lone surrogate is not valid UTF-8 once decoded: FastAPI's parser refuses the body.
    refused = await client.post(path, content='{"message": "\\ud800 Seattle"}', headers=headers)
    assert refused.status_code == 422 and refused.json()['detail'][0]['loc'] == ['body', 'message']
