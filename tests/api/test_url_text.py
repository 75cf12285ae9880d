"""A URL whose path or query is not UTF-8 once percent-decoded: a 422 naming the parameter, never a silent U+FFFD."""

from __future__ import annotations

import httpx2
import pytest

from agentrt.api.url_text import url_refusal
from agentrt.services.ledger import get_request_tracker
from tests.api.conftest import Keys, auth
from tests.factories import ledger_rows

AUDIT = '/api/v1/llm-audit/interactions'
SURROGATE = '%ED%A0%80'  # U+D800 as UTF-8 would encode it, if it could: half of a UTF-16 pair

# (method, URL, field): before, the filters matched nothing and answered 200 with an empty page; the ids were refused
# as holding a U+FFFD the client never sent.
NOT_TEXT = [
    ('GET', f'{AUDIT}?model=%FF', 'model'),
    ('GET', f'{AUDIT}?agent={SURROGATE}', 'agent'),
    ('GET', f'{AUDIT}?conversation_id=a%C0%AFb', 'conversation_id'),
    ('GET', f'/api/v1/costs?model={SURROGATE}', 'model'),
    ('GET', '/api/v1/costs?by=day&agent=x%E9y', 'agent'),
    ('GET', '/api/v1/conversations?cursor=%FF', 'cursor'),
    ('GET', '/api/v1/me?%FF=1', 'query'),
    ('GET', '/api/v1/conversations/c%FF', 'path'),
    ('DELETE', f'/api/v1/conversations/{SURROGATE}', 'path'),
    ('POST', '/api/v1/conversations/%C3/turns', 'path'),
    ('GET', f'{AUDIT}/{SURROGATE}', 'path'),
    ('POST', f'/api/v1/chat?agent={SURROGATE}', 'agent'),
    ('POST', '/api/v1/chat/ag-ui?agent=%FF', 'agent'),
]


@pytest.mark.parametrize(('method', 'url', 'field'), NOT_TEXT)
async def test_a_url_that_is_not_utf8_is_a_422_naming_the_parameter(
    keys: Keys, client: httpx2.AsyncClient, method: str, url: str, field: str
) -> None:
    headers = {**auth(keys.acme), 'content-type': 'application/json'}
    response = await client.request(method, url, headers=headers, content=b'{"message": "hi"}')
    body = response.json()
    assert response.status_code == 422, response.text
    assert body['type'] == 'invalid_input' and body['field'] == field and body['error_id'].startswith('err_'), body
    assert 'is not UTF-8 text' in body['detail'], body
    if SURROGATE in url:
        assert f'{SURROGATE} at byte' in body['detail'] and 'lone surrogate' in body['detail'], body
    await get_request_tracker().flush()
    assert await ledger_rows() == []


async def test_percent_encoded_utf8_is_still_read_as_its_text(keys: Keys, client: httpx2.AsyncClient) -> None:
    response = await client.get(f'{AUDIT}?model=caf%C3%A9+%F0%9F%98%80&agent=a%2Bb', headers=auth(keys.acme))
    assert response.status_code == 200, response.text
    assert url_refusal(b'/api/v1/conversations/caf%C3%A9', b'x=%E2%82%AC&&y&=z') is None
