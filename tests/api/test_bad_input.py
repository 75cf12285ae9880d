"""Bad query values, paths and bodies on every route: a clear 4xx naming the problem, never a 500, nothing run."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
from collections.abc import Callable
from datetime import UTC, datetime

import httpx2
import pytest

from agentrt.api.cursors import encode_cursor
from agentrt.db.engine import current_settings
from agentrt.services.conversations import PostgresConversationStore
from agentrt.services.ledger import get_request_tracker
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, auth, chat_body
from tests.factories import ledger_rows

AUDIT = '/api/v1/llm-audit/interactions'


def _cursor(moment: str, key: str, listing: str = 'conversations-created') -> str:
    """A hand-made cursor of the right shape (for an account id no key has: its moment or key is checked first)."""
    return base64.urlsafe_b64encode(json.dumps([listing, 0, moment, key]).encode()).decode().rstrip('=')


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
    (AUDIT, {'cursor': _cursor('0001-01-01T00:00:00+14:00', '01a23014-ea87-791c-afe7-823174d274a5', 'audit')}),
    (AUDIT, {'cursor': _cursor('9999-12-31T23:59:59-14:00', '01a23014-ea87-791c-afe7-823174d274a5', 'audit')}),
    ('/api/v1/conversations/c1', {'format': 'xml'}),
    (f'/api/v1/conversations/{"c" * 201}', {}),
    ('/api/v1/conversations/a%00b', {}),
]


async def test_bad_query_values_are_422_naming_the_problem(keys: Keys, client: httpx2.AsyncClient) -> None:
    wrong = []
    for path, params in BAD_QUERIES:  # one test, one set-up: each case is a request, not a fixture
        response = await client.get(path, params=params, headers=auth(keys.acme))
        body = response.json()
        if response.status_code != 422 or not _names_the_problem(body):
            wrong.append((path, params, response.status_code, body))
    assert wrong == []


async def test_page_and_cursor_together_are_422_saying_so(keys: Keys, client: httpx2.AsyncClient) -> None:
    # A cursor this API would hand acme (its listing, its account): the refusal is for the pair, not the cursor.
    cursor = encode_cursor(
        datetime(2026, 3, 1, 12, tzinfo=UTC),
        '01a23014-ea87-791c-afe7-823174d274a5',
        listing='audit',
        account_id=await account_id('acme-health'),
    )
    alone = await client.get(AUDIT, params={'cursor': cursor}, headers=auth(keys.acme))
    assert alone.status_code == 200, alone.text
    both = await client.get(AUDIT, params={'page': '2', 'cursor': cursor}, headers=auth(keys.acme))
    assert both.status_code == 422 and both.json()['field'] == 'cursor', both.text
    assert both.json()['detail'] == 'give page or cursor, not both'


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
    # FastAPI's own words were "There was an error parsing the body", naming neither the body's fault nor the fix;
    # then one message for all three causes, which sent a client with a 5,000-digit number to look for bad UTF-8.
    headers = {**auth(keys.acme), 'content-type': 'application/json'}
    for content, named in (
        (b'{"message": "\xff\xfe"}', 'byte 13 (0xFF) is not UTF-8'),
        (b'{"message": "hi", "agent": ' + b'[' * 100_000 + b']' * 100_000 + b'}', 'nests deeper'),
        (b'{"message": "hi", "agent": ' + b'9' * 5000 + b'}', 'a number of more than 4,300 digits'),
    ):
        response = await client.post('/api/v1/conversations/c1/turns', content=content, headers=headers)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body['field'] == 'body' and body['error_id'].startswith('err_'), body
        assert named in body['detail'], body
    await get_request_tracker().flush()
    assert await ledger_rows() == []


async def test_a_bad_conversation_id_is_called_a_conversation_id(keys: Keys, client: httpx2.AsyncClient) -> None:
    # The messages were `simple_chat`'s, which calls it a session id: a word the HTTP API uses nowhere.
    # A read or a delete of such an id looks it up (an older version may have stored it): test_legacy_conversation_ids
    bad = 'caf\u00e9'
    for response in (
        await client.post(f'/api/v1/conversations/{bad}/turns', json={'message': 'hi'}, headers=auth(keys.acme)),
        await client.post('/api/v1/chat', json=chat_body(bad, 'hi'), headers=auth(keys.acme)),
    ):
        assert response.status_code == 422, response.text
        detail = response.json()['detail']
        assert detail.startswith('the conversation id ') and 'has a character that is not allowed' in detail, detail


async def test_a_turn_body_that_is_not_json_says_what_the_parser_found(keys: Keys, client: httpx2.AsyncClient) -> None:
    # FastAPI's message was "JSON decode error" and the offset alone: its parser's reason was left out.
    headers = {**auth(keys.acme), 'content-type': 'application/json'}
    for content, reason in (
        (b'{"message": "hi"} xx', 'Extra data'),
        (b'{"message": "hi",}', 'Expecting property name enclosed in double quotes'),
        (b'{"message": ', 'Expecting value'),
        # Python's reason ends in "at" where its own message adds the place: the place is added (it read as cut off)
        (b'{"message": "a\x00b"}', 'Invalid control character at position 14'),
        (b'{"message": "ab', 'Unterminated string starting at position 12'),
    ):
        response = await client.post('/api/v1/conversations/c1/turns', content=content, headers=headers)
        assert response.status_code == 422, response.text
        [error] = response.json()['detail']
        assert error['type'] == 'json_invalid' and error['msg'] == f'JSON decode error: {reason}', error


async def test_bodies_over_the_limit_or_with_a_lying_length_are_refused(keys: Keys, client: httpx2.AsyncClient) -> None:
    huge = json.dumps({'message': 'x' * (4 * 1024 * 1024)})
    response = await client.post('/api/v1/conversations/c1/turns', content=huge, headers=auth(keys.acme))
    assert response.status_code == 413 and response.json()['type'] == 'body_too_large'

    async def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(5):
            yield b'x' * (1024 * 1024)

    for path in ('/api/v1/chat', '/api/v1/chat/ag-ui', '/api/v1/conversations/c1/turns'):
        streamed = await client.post(
            path, content=chunks(), headers={**auth(keys.acme), 'content-type': 'application/json'}
        )
        assert streamed.status_code == 413, (path, streamed.text)
        assert streamed.json()['type'] == 'body_too_large', path
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
    assert refused.json()['field'] == 'message'  # as the runtime's own 422s name it


# Where a lone surrogate escape goes in a string: at its start, inside, at its end (the parser's message varied).
SURROGATE_TEXTS = [('\ud800 Seattle', 0), ('cardio\udc00logists', 6), ('Seattle \udbff', 8)]


def _turn_bodies(text: str) -> list[tuple[dict[str, object], str]]:
    return [({'message': text}, 'message'), ({'message': 'hi', 'agent': text}, 'agent')]


def _vercel_bodies(text: str) -> list[tuple[dict[str, object], str]]:
    return [(chat_body('c1', text), 'messages.0.parts.0.text'), (chat_body(text, 'hi'), 'id')]


def _ag_ui_bodies(text: str) -> list[tuple[dict[str, object], str]]:
    def body(thread: str, content: str) -> dict[str, object]:
        return {'threadId': thread, 'runId': 'r1', 'messages': [{'id': 'u1', 'role': 'user', 'content': content}]}

    return [(body('t1', text), 'messages.0.content'), (body(text, 'hi'), 'threadId')]


async def test_a_lone_surrogate_escape_is_a_422_that_says_so_on_every_chat_route(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    # It was pydantic's words: "unexpected end of hex escape at line 1 column 113" (or "lone leading surrogate in hex
    # escape") on the streamed routes, "unable to parse raw data as a unicode string" on the turns route.
    headers = {**auth(keys.acme), 'content-type': 'application/json'}
    routes = [
        ('/api/v1/conversations/c1/turns', _turn_bodies),
        ('/api/v1/chat', _vercel_bodies),
        ('/api/v1/chat/ag-ui', _ag_ui_bodies),
    ]
    wrong = []
    for path, bodies in routes:
        for text, position in SURROGATE_TEXTS:
            escape = json.dumps(text[position])[1:-1]
            for body, field in bodies(text):
                response = await client.post(path, content=json.dumps(body), headers=headers)  # ASCII: \u escapes
                said = _said(response.json(), field)
                expected = f'the text has an invalid unicode escape, {escape} at position {position}: a lone surrogate'
                if response.status_code != 422 or said is None or expected not in said:
                    wrong.append((path, field, text.encode('unicode_escape'), response.status_code, response.text))
    assert wrong == []
    await get_request_tracker().flush()
    assert await ledger_rows() == []


async def test_a_lone_surrogate_escape_in_a_key_is_named_as_a_key_of_its_object(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    headers = {**auth(keys.acme), 'content-type': 'application/json'}
    vercel = chat_body('c1', 'hi')
    vercel['messages'][0]['parts'][0]['te\ud800xt'] = 'x'
    cases = [
        ('/api/v1/conversations/c1/turns', {'message': 'hi', 'ag\udc00ent': 'x'}, 'body'),
        ('/api/v1/chat', vercel, 'messages.0.parts.0'),
        ('/api/v1/chat/ag-ui', {'thread\ud800Id': 't1', 'runId': 'r1', 'messages': []}, 'body'),
    ]
    for path, body, field in cases:
        response = await client.post(path, content=json.dumps(body), headers=headers)
        said = _said(response.json(), field)
        assert response.status_code == 422 and said is not None, response.text
        assert 'a key has an invalid unicode escape' in said and 'a lone surrogate' in said, said


def _said(body: dict[str, object], field: str) -> str | None:
    """The error message for `field`: the turns route reports FastAPI's list (`loc`), the streamed routes `field`."""
    assert str(body['error_id']).startswith('err_')
    if body['type'] == 'invalid_request':
        location = ['body'] if field == 'body' else ['body', *field.split('.')]
        messages = [error['msg'] for error in body['detail'] if error['loc'] == location]  # type: ignore[attr-defined]
        return messages[0] if messages else None
    return str(body['detail']) if body['type'] == 'invalid_input' and body.get('field') == field else None


async def test_a_lone_surrogate_nested_deep_is_still_a_422(keys: Keys, client: httpx2.AsyncClient) -> None:
    # Read again by Python's parser and walked, a body nested deeper than either goes must not become a 500.
    headers = {**auth(keys.acme), 'content-type': 'application/json'}
    for depth in (900, 5_000):
        content = '{"id": "c1", "messages": ' + '[' * depth + '"\\ud800"' + ']' * depth + '}'
        response = await client.post('/api/v1/chat', content=content, headers=headers)
        assert response.status_code == 422 and response.json()['type'] == 'invalid_input', response.text


TURN_BODIES = [
    ('/api/v1/conversations/coded/turns', {'message': 'hi'}),
    ('/api/v1/chat', chat_body('coded', 'hi')),
    (
        '/api/v1/chat/ag-ui',
        {'threadId': 'coded', 'runId': 'r1', 'messages': [{'id': 'u1', 'role': 'user', 'content': 'hi'}]},
    ),
]


@pytest.mark.parametrize(('path', 'body'), TURN_BODIES)
@pytest.mark.parametrize(('coding', 'compressed'), [('gzip', True), ('gzip', False), ('deflate', False), ('br', False)])
async def test_a_body_in_a_content_coding_is_415_naming_it(
    keys: Keys, client: httpx2.AsyncClient, path: str, body: dict[str, object], coding: str, compressed: bool
) -> None:
    # A body claiming gzip but sent plain ran the turn as if it were plain; a gzipped one was "not UTF-8".
    content = json.dumps(body).encode()
    headers = {**auth(keys.acme), 'content-type': 'application/json', 'content-encoding': coding}
    response = await client.post(path, content=gzip.compress(content) if compressed else content, headers=headers)
    refused = response.json()
    assert response.status_code == 415, response.text
    assert refused['type'] == 'unsupported_media_type' and refused['field'] == 'Content-Encoding', refused
    assert f"Content-Encoding '{coding}' is not served" in refused['detail'] and refused['error_id'].startswith('err_')
    await get_request_tracker().flush()
    assert await ledger_rows() == []
    assert await PostgresConversationStore(await account_id('acme-health')).load('coded') is None


@pytest.mark.parametrize(('path', 'body'), TURN_BODIES)
@pytest.mark.parametrize('charset', ['latin-1', 'ISO-8859-1', 'utf-16', '"utf-32"'])
async def test_a_json_body_declared_in_a_charset_other_than_utf8_is_415(
    keys: Keys, client: httpx2.AsyncClient, path: str, body: dict[str, object], charset: str
) -> None:
    # It was read as UTF-8 whatever it said; a UTF-16 body was taken on the turns route and refused on the others.
    headers = {**auth(keys.acme), 'content-type': f'application/json; charset={charset}'}
    response = await client.post(path, content=json.dumps(body), headers=headers)
    refused = response.json()
    assert response.status_code == 415 and refused['field'] == 'Content-Type', response.text
    assert f'charset={charset.strip(chr(34)).lower()} is not served: JSON is UTF-8' in refused['detail'], refused
    await get_request_tracker().flush()
    assert await ledger_rows() == []


@pytest.mark.parametrize('content_type', ['application/json; charset=UTF-8', 'application/json;charset="utf8"'])
async def test_a_json_body_declared_utf8_is_read(keys: Keys, client: httpx2.AsyncClient, content_type: str) -> None:
    response = await client.post(
        '/api/v1/conversations/c1/turns',
        content='{"message": "Dermatologists"}',
        headers={**auth(keys.acme), 'content-type': content_type},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ('headers', 'status', 'field'),
    [({'content-length': 'abc'}, 400, 'Content-Length'), ({'content-length': str(10**12)}, 413, None)],
)
async def test_a_body_refused_before_it_is_read_gets_the_usual_error_body(
    keys: Keys, client: httpx2.AsyncClient, headers: dict[str, str], status: int, field: str | None
) -> None:
    # These two answers were written apart from the one mapping: no error id, no log line to find.
    response = await client.post('/api/v1/chat', content=b'{}', headers={**auth(keys.acme), **headers})
    body = response.json()
    assert response.status_code == status and body['error_id'].startswith('err_') and body.get('field') == field, body


async def _raw_exchange(url: str, head: str, pieces: list[bytes], pause: float) -> tuple[int, bytes, dict[str, str]]:
    """Send a request's head and its body in `pieces`, `pause` seconds apart, over a real connection; its answer's
    status, head and JSON body (the connection left to the server to close)."""
    host, port = url.removeprefix('http://').split(':')
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode())
        for piece in pieces:
            await asyncio.sleep(pause)
            writer.write(piece)
            await writer.drain()
        async with asyncio.timeout(30):  # a guard: the answer comes within the body timeout, or never
            return await _read_answer(reader)
    finally:
        writer.close()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes, dict[str, str]]:
    """An HTTP answer's status, head (lower case) and JSON body, read from `reader`."""
    status_line = await reader.readline()
    response_head = (await reader.readuntil(b'\r\n\r\n')).lower()
    length = int(response_head.split(b'content-length: ')[1].split(b'\r\n')[0])
    return int(status_line.split()[1]), response_head, json.loads(await reader.readexactly(length))


@pytest.mark.parametrize('framing', ['content-length', 'chunked'])
async def test_a_body_that_stops_arriving_is_a_408_and_the_connection_closed(
    keys: Keys, live_url: str, monkeypatch: pytest.MonkeyPatch, framing: str
) -> None:
    # uvicorn puts no limit on the wait for a request's body: headers and then nothing (or part of the body) held the
    # connection and the request's task for as long as the client liked.
    monkeypatch.setattr(current_settings(), 'http_body_timeout_seconds', 0.5)
    length = 'Content-Length: 100' if framing == 'content-length' else 'Transfer-Encoding: chunked'
    head = (
        f'POST /api/v1/conversations/stalled/turns HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {keys.acme}\r\n'
        f'Content-Type: application/json\r\n{length}\r\n\r\n'
    )
    first = b'{"message": ' if framing == 'content-length' else b'c\r\n{"message": \r\n'
    started = asyncio.get_running_loop().time()
    status, response_head, body = await _raw_exchange(live_url, head, [first], pause=0)
    waited = asyncio.get_running_loop().time() - started
    assert (status, body['type']) == (408, 'request_timeout'), body
    assert 'stopped arriving' in body['detail'] and '0.5 s' in body['detail'] and body['error_id'].startswith('err_')
    assert b'connection: close' in response_head and 0.4 < waited < 10
    async with httpx2.AsyncClient(base_url=live_url) as client:  # nothing ran, the server goes on
        assert (await client.get('/api/v1/conversations/stalled', headers=auth(keys.acme))).status_code == 404


async def test_a_body_sent_in_pieces_within_the_timeout_is_read(
    keys: Keys, live_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The limit is on the wait for each piece and on the body's average rate after the timeout, not the whole body: a
    # slow client that keeps sending is served.
    monkeypatch.setattr(current_settings(), 'http_body_timeout_seconds', 0.5)
    payload = json.dumps({'message': 'Dermatologists in Boston' + ' ' * 1500}).encode()
    pieces = [payload[i : i + 300] for i in range(0, len(payload), 300)]
    head = (
        f'POST /api/v1/conversations/slow-body/turns HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {keys.acme}\r\n'
        f'Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n'
    )
    status, _, body = await _raw_exchange(live_url, head, pieces, pause=0.3)  # 1.8 s in all, 0.3 s a piece
    assert len(pieces) == 6 and status == 200 and 'Boston' in body['output'], body


async def test_a_body_that_trickles_in_is_a_408_once_its_allowance_is_spent(
    keys: Keys, live_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the wait for each piece was bounded: a client sending a byte a minute held its connection for as long as it
    # liked (QA: 200 connections at a byte every 5 s, unanswered after 76 s; a 4 MiB body would take 48 days).
    monkeypatch.setattr(current_settings(), 'http_body_timeout_seconds', 0.5)
    host, port = live_url.removeprefix('http://').split(':')
    reader, writer = await asyncio.open_connection(host, int(port))

    async def trickle() -> None:
        with contextlib.suppress(OSError):
            for _ in range(200):  # a byte every 0.1 s: never a pause of 0.5 s
                writer.write(b' ')
                await writer.drain()
                await asyncio.sleep(0.1)

    writer.write(
        (
            f'POST /api/v1/conversations/trickle/turns HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {keys.acme}'
            '\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n'
        ).encode()
    )
    started = asyncio.get_running_loop().time()
    sender = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(15):  # the old rule answered after the 20 s of the trickle (a 422)
            status, response_head, body = await _read_answer(reader)
    finally:
        sender.cancel()
        writer.close()
    waited = asyncio.get_running_loop().time() - started
    assert status == 408 and body['type'] == 'request_timeout', body
    assert 'arrived too slowly' in body['detail'] and 'at least 500 bytes a second' in body['detail'], body
    assert b'connection: close' in response_head and 0.4 < waited < 5, waited


# (route, parameter, value, words of the message): these answered 200, a blank filter with an empty page, a number
# read as a Unix time (-1 was 1969-12-31T23:59:59Z); a control character was "String should match pattern '^[^...'".
FILTER_VALUES = [
    (AUDIT, 'model', ' ', 'is blank'),
    (AUDIT, 'agent', '\t ', 'control character (U+0009) at position 0'),
    (AUDIT, 'conversation_id', '   ', 'is blank'),
    ('/api/v1/costs', 'model', 'gpt\x00-4o', 'control character (U+0000) at position 3'),
    ('/api/v1/costs', 'agent', '\u3000', 'is blank'),
    (AUDIT, 'since', '-1', 'is a number, not a time'),
    (AUDIT, 'until', '1.5', 'is a number, not a time'),
    (AUDIT, 'since', '1700000000', 'is a number, not a time'),
    ('/api/v1/costs', 'since', '2026', 'is a number, not a time'),
    ('/api/v1/costs', 'until', '20260301', 'is a number, not a time'),
    # Said "Value should have at most 200 items after validation", as of a list (QA).
    (AUDIT, 'model', 'm' * 10_000, 'should have at most 200 characters, not 10,000'),
    (AUDIT, 'conversation_id', 'c' * 201, 'should have at most 200 characters, not 201'),
]


@pytest.mark.parametrize(('path', 'name', 'value', 'said'), FILTER_VALUES)
async def test_a_blank_filter_or_a_number_for_a_time_is_a_422_saying_so(
    keys: Keys, client: httpx2.AsyncClient, path: str, name: str, value: str, said: str
) -> None:
    response = await client.get(path, params={name: value}, headers=auth(keys.acme))
    assert response.status_code == 422, response.text
    (error,) = response.json()['detail']
    assert error['loc'] == ['query', name] and said in error['msg'], error
    assert error['msg'].startswith(('is ', 'has ', 'should ')), error  # not pydantic's "Value error, "


async def test_filters_with_inner_spaces_and_iso_times_still_match(keys: Keys, client: httpx2.AsyncClient) -> None:
    params = {'agent': 'Provider Finder', 'since': '2026-03-01', 'until': '2099-01-01T00:00:00Z'}
    response = await client.get(AUDIT, params=params, headers=auth(keys.acme))
    assert response.status_code == 200, response.text


async def test_a_chat_body_without_trigger_is_the_submit_message_that_openapi_says_is_its_default(
    keys: Keys, client: httpx2.AsyncClient
) -> None:
    # It was a 422 with pydantic's words, "Unable to extract tag using discriminator 'trigger'", for a body the
    # published schema allows (trigger not required, default submit-message).
    body = chat_body('no-trigger', 'Dermatologists in Boston')
    del body['trigger']
    body['messages'].insert(0, {'id': 'm0', 'role': 'user', 'parts': [{'type': 'text', 'text': 'earlier'}]})
    response = await client.post('/api/v1/chat', json=body, headers=auth(keys.acme))
    assert response.status_code == 200, response.text
    stored = await PostgresConversationStore(await account_id('acme-health')).load('no-trigger')
    assert stored is not None
    prompts = [part.content for m in stored.messages for part in m.parts if part.part_kind == 'user-prompt']
    assert prompts == ['Dermatologists in Boston']


@pytest.mark.parametrize('trigger', ['launch', None, 5, ''])
async def test_a_chat_trigger_that_is_not_served_is_a_422_naming_trigger(
    keys: Keys, client: httpx2.AsyncClient, trigger: object
) -> None:
    response = await client.post('/api/v1/chat', json=chat_body('c1', 'hi', trigger=trigger), headers=auth(keys.acme))
    body = response.json()
    assert response.status_code == 422 and body['field'] == 'trigger', body
    assert body['detail'] == "trigger: must be 'submit-message' (or left out)", body


def _vercel_part(**part: object) -> dict[str, object]:
    body = chat_body('c1', 'hi')
    body['messages'] = [
        {'id': 'm0', 'role': 'user', 'parts': [{'type': 'text', 'text': 'earlier'}]},
        {'id': 'm1', 'role': 'user', 'parts': [part]},
    ]
    return body


def _ag_ui_content(content: object) -> dict[str, object]:
    return {'threadId': 't1', 'runId': 'r1', 'messages': [{'id': 'u1', 'role': 'user', 'content': content}]}


# The fields were pydantic's locations, with the names of union members no client sends: 'messages.0.parts.0.
# TextUIPart.text', 'messages.0.user.content.str'.
FIELDS_AS_SENT = [
    ('/api/v1/chat', _vercel_part(type='text'), 'messages.1.parts.0.text', 'Field required'),
    ('/api/v1/chat', _vercel_part(type='text', text=5), 'messages.1.parts.0.text', 'valid string'),
    ('/api/v1/chat', _vercel_part(type='text', text='hi', state='bogus'), 'messages.1.parts.0.state', "'streaming'"),
    ('/api/v1/chat/ag-ui', _ag_ui_content(None), 'messages.0.content', 'valid string'),
    ('/api/v1/chat/ag-ui', _ag_ui_content(5), 'messages.0.content', 'valid string'),
]


@pytest.mark.parametrize(('path', 'body', 'field', 'said'), FIELDS_AS_SENT)
async def test_a_bad_field_of_a_chat_body_is_named_as_the_client_sent_it(
    keys: Keys, client: httpx2.AsyncClient, path: str, body: dict[str, object], field: str, said: str
) -> None:
    response = await client.post(path, json=body, headers=auth(keys.acme))
    refused = response.json()
    assert response.status_code == 422 and refused['field'] == field, refused
    assert refused['detail'].startswith(f'{field}: ') and said in refused['detail'], refused


# pydantic-ai's adapter skips a role, a content type or a media source its ag-ui-protocol does not know, with a
# UserWarning: a 500 under `-W error` (this suite; schemathesis found it), and in a server a warning on stderr and a
# turn without what was skipped ("hi" alone). Each is in the user's message, the one the turn reads: refused.
AG_UI_SKIPPED = [
    ('critic', 'hi', "role='critic'"),
    ('user', [{'type': 'text', 'text': 'hi'}, {'type': 'hologram', 'value': 'x'}], "type='hologram'"),
    (
        'user',
        [{'type': 'text', 'text': 'hi'}, {'type': 'image', 'source': {'type': 'psychic', 'value': 'x'}}],
        'psychic',
    ),
]


@pytest.mark.parametrize(('role', 'content', 'named'), AG_UI_SKIPPED, ids=['role', 'content-type', 'source-type'])
async def test_ag_ui_content_the_server_cannot_read_is_a_422_naming_it(
    keys: Keys, client: httpx2.AsyncClient, role: str, content: object, named: str
) -> None:
    body = {
        'threadId': 'agui-skipped',
        'runId': 'r1',
        'messages': [
            {'id': 'u0', 'role': 'user', 'content': 'earlier'},
            {'id': 'u1', 'role': role, 'content': content},
        ],
    }
    response = await client.post('/api/v1/chat/ag-ui', json=body, headers=auth(keys.acme))
    refused = response.json()
    assert response.status_code == 422 and refused['field'] == 'messages.1', refused
    assert (
        refused['detail'].startswith('messages.1: AG-UI content this server cannot read (')
        and named in refused['detail']
    )
    assert await ledger_rows() == []  # refused before anything ran


TURN_ROUTES = ['/api/v1/chat', '/api/v1/chat/ag-ui', '/api/v1/conversations/c1/turns']
NOT_UTF8_JSON: list[tuple[Callable[[str], bytes], str, list[str]]] = [
    (lambda text: b'\xef\xbb\xbf' + text.encode(), 'starts with a byte order mark', TURN_ROUTES),
    (lambda text: text.encode('utf-16'), 'starts with a byte order mark', TURN_ROUTES),
    (lambda text: text.encode('utf-16-le'), 'a NUL byte at byte 1', TURN_ROUTES),
    # The turns route: FastAPI's own parser refuses it first, a 400 (test_a_body_that_is_not_utf8_or_nested_...).
    (lambda text: text.replace('hi', 'caf\xe9').encode('latin-1'), 'not UTF-8 text: %E9 at byte', TURN_ROUTES[:2]),
]


@pytest.mark.parametrize(
    ('path', 'encode', 'said'), [(path, encode, said) for encode, said, paths in NOT_UTF8_JSON for path in paths]
)
async def test_a_turn_body_that_is_not_utf8_json_is_a_422_saying_so(
    keys: Keys, client: httpx2.AsyncClient, path: str, encode: Callable[[str], bytes], said: str
) -> None:
    # It was the parser's "Invalid JSON: expected value at line 1 column 1", which names neither fault nor fix; the
    # turns route ran the turn of a body in UTF-16 or with a byte order mark, which the streamed routes refuse.
    bodies = {'/api/v1/chat': chat_body('c1', 'hi'), '/api/v1/chat/ag-ui': _ag_ui_content('hi')}
    text = json.dumps(bodies.get(path, {'message': 'hi'}))
    headers = {**auth(keys.acme), 'content-type': 'application/json'}
    response = await client.post(path, content=encode(text), headers=headers)
    refused = response.json()
    assert response.status_code == 422 and refused['field'] == 'body' and said in refused['detail'], refused
    assert 'percent-encode' not in refused['detail'], 'advice for a URL, not a body'


@pytest.mark.parametrize(
    ('if_match', 'said'),
    [
        (b'W/"' + b'9' * 190 + b'"', 'If-Match: the revision is 190 characters long; the limit is 64'),
        (b'"a\x00b"', 'PostgreSQL cannot store'),
        # Empty, it was taken for no header and deleted whatever the revision (a QA run), though a client that sends
        # If-Match means a condition, one lost on its way (an empty variable in a template).
        (b'', 'If-Match is empty: send a revision this API returned, or * to delete'),
        (b'   ', 'If-Match is empty'),
        # Quotes that enclose nothing: a 409 ("changed meanwhile; retry") sent the client to retry for ever (QA).
        (b'"unterminated', "If-Match: '\"unterminated' is not an entity tag"),
        (b'"ok", W/abc', "If-Match: 'W/abc' is not an entity tag"),
        (b'a"b', 'is not an entity tag'),
        # `*` stands alone: in a list it was the revision `*`, a 409 retried for ever (QA).
        (b'"zzz", *', 'If-Match: * (whatever revision is there) stands alone'),
        (b'*,*', 'If-Match: * (whatever revision is there) stands alone'),
    ],
)
async def test_an_if_match_no_revision_can_be_is_a_422_naming_the_header_and_deletes_nothing(
    keys: Keys, client: httpx2.AsyncClient, if_match: bytes, said: str
) -> None:
    # It named the store's own argument: "the expected_revision is 190 characters long", field expected_revision.
    turn = await client.post('/api/v1/conversations/kept/turns', json={'message': 'hi'}, headers=auth(keys.acme))
    assert turn.status_code == 200, turn.text
    response = await client.delete('/api/v1/conversations/kept', headers={**auth(keys.acme), 'If-Match': if_match})
    refused = response.json()
    assert response.status_code == 422 and refused['field'] == 'If-Match', refused
    assert refused['detail'].startswith('If-Match') and said in refused['detail'], refused
    assert await PostgresConversationStore(await account_id('acme-health')).load('kept') is not None


# A secret a client pasted where a key of its body goes: its field (or pydantic's location) named it unredacted, while
# the detail beside it and the log line said [REDACTED].
_PASTED = 'sk-proj-' + 'Qx7vLm2Rt9Wz4Kp8Hs3Nd6Yb1Fc5Jg0Ae'


@pytest.mark.parametrize(
    ('path', 'body'),
    [
        ('/api/v1/chat', _vercel_part(type='text', text='hi', **{_PASTED: 1})),
        ('/api/v1/conversations/c1/turns', {'message': 'hi', _PASTED: 1}),
    ],
    ids=['vercel', 'turns'],
)
async def test_a_secret_sent_as_a_key_of_a_body_is_redacted_in_the_field_it_names(
    keys: Keys, client: httpx2.AsyncClient, path: str, body: dict[str, object]
) -> None:
    response = await client.post(path, json=body, headers=auth(keys.acme))

    assert response.status_code == 422, response.text
    assert _PASTED[8:] not in response.text, response.text
    assert '[REDACTED]' in response.text, response.text
