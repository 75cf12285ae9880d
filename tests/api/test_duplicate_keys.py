"""A key given twice in one object of a JSON body: a 422 naming it on every JSON-body route (the last was kept)."""

from __future__ import annotations

import importlib.util

import httpx2
import pytest

from agentrt.api.duplicate_keys import loads_with_unique_keys
from agentrt.db.errors import InvalidInputError
from tests.api.conftest import Keys, auth

_PASTED = 'sk-proj-' + 'Qx7vLm2Rt9Wz4Kp8Hs3Nd6Yb1Fc5Jg0Ae'
_VERCEL_PART = '{"type": "text", "text": "hi"}'


def _message(part: str) -> str:
    """A Vercel AI user message of one part, as JSON text (a repeated key cannot be built as a dict)."""
    return '{"id": "m1", "role": "user", "parts": [' + part + ']}'


_BODIES = [
    ('/api/v1/conversations/c1/turns', '{"message": "a", "message": "b"}', 'message'),
    ('/api/v1/conversations/c1/turns', '{"message": "a", "agent": null, "agent": null}', 'agent'),
    ('/api/v1/chat', '{"id": "c1", "id": "c2", "messages": [' + _message(_VERCEL_PART) + ']}', 'id'),
    (  # in the last message of a history the client sent whole
        '/api/v1/chat',
        '{"id": "c1", "messages": ['
        + _message(_VERCEL_PART)
        + ', '
        + _message('{"type": "text", "text": "a", "text": "b"}')
        + ']}',
        'messages.1.parts.0.text',
    ),
]
if importlib.util.find_spec('ag_ui') is not None:
    _BODIES.append(
        (
            '/api/v1/chat/ag-ui',
            '{"threadId": "t1", "runId": "r1", "state": null, "tools": [], "context": [], "forwardedProps": null, '
            '"messages": [{"id": "m1", "role": "user", "content": "a", "role": "user"}]}',
            'messages.0.role',
        )
    )


@pytest.mark.parametrize(('path', 'body', 'field'), _BODIES)
async def test_a_key_twice_in_a_body_is_422_naming_it(
    keys: Keys, client: httpx2.AsyncClient, path: str, body: str, field: str
) -> None:
    headers = {**auth(keys.acme), 'Content-Type': 'application/json'}
    response = await client.post(path, content=body.encode(), headers=headers)
    refused = response.json()
    assert (response.status_code, refused['type'], refused['field']) == (422, 'invalid_input', field), refused
    assert 'more than once' in refused['detail'], refused


async def test_a_secret_given_twice_as_a_key_is_redacted_where_it_is_named(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    body = f'{{"message": "hi", "{_PASTED}": 1, "{_PASTED}": 2}}'
    headers = {**auth(keys.acme), 'Content-Type': 'application/json'}
    response = await client.post('/api/v1/conversations/c1/turns', content=body.encode(), headers=headers)
    assert response.status_code == 422 and '[REDACTED]' in response.json()['field'], response.text
    assert _PASTED[8:] not in response.text, response.text


def test_the_first_repeated_key_is_named_where_it_is() -> None:
    assert loads_with_unique_keys('{"a": [{"b": 1}], "c": {"b": 2}}') == {'a': [{'b': 1}], 'c': {'b': 2}}
    with pytest.raises(InvalidInputError) as raised:
        loads_with_unique_keys('[1, {"k": {"z": 1, "z": 1}}, {"y": 1, "y": 2}]')
    assert raised.value.field == '1.k.z'
