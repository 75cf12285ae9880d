"""A log line's fields (`LogField`: a request's method and path) are redacted alone: a path ending in a secret's name
never swallows the status or the fields after it, while secrets in the path, the query or the rest of the line stay
redacted."""

from __future__ import annotations

import logging

import pytest

from agentrt.services.log_redaction import ArgumentRedactingFilter, LogField, redact_record
from tests.agents.test_error_redaction import OPENAI_KEY, _assert_clean

NAMES = ['passwd', 'password', 'secret', 'api_key']
# The api's line of a refusal (`public_error`): error id, where, status, type, then the error's text.
REFUSAL = '%s %s: %d %s: %s'


def _logged(message: str, *args: object) -> str:
    record = logging.LogRecord('agentrt.api', logging.INFO, __file__, 1, message, args, None)
    redact_record(record)
    return record.getMessage()


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize(
    'path',
    [
        '/api/v1/conversations/my-{name}',  # the end of the last segment
        '/api/v1/conversations/{name}',  # the whole last segment
        '/api/v1/conversations/{name}/turns',  # a segment before the last
        '/api/v1/conversations/{name}%20is',  # a client's escape: "name is" before the status
        '/api/v1/conversations/{name}=',  # "name=" before the status
    ],
)
def test_a_path_that_ends_in_a_secrets_name_keeps_the_fields_after_it(name: str, path: str) -> None:
    where = f'GET {path.format(name=name)}'
    line = _logged(REFUSAL, 'err_1', LogField(where), 404, 'not_found', 'no such conversation')
    assert line == f'err_1 {where}: 404 not_found: no such conversation'


def test_the_same_line_without_a_field_shows_what_was_wrong() -> None:
    # The path as a plain argument is read with the rest of the line: its end is a name, the status its value.
    assert _logged('%s %s: %d', 'err_1', 'GET /api/v1/conversations/my-password', 404) == (
        'err_1 GET /api/v1/conversations/my-password: [REDACTED]'
    )


@pytest.mark.parametrize(
    ('where', 'shown'),
    [
        ('GET /api/v1/conversations/password=hunter2-x9', 'GET /api/v1/conversations/password=[REDACTED]'),
        ('GET /api/v1/conversations/api_key=hunter2-x9/turns', 'GET /api/v1/conversations/api_key=[REDACTED]'),
        ('GET /api/v1/conversations/password%3A%20hunter2-x9', 'GET /api/v1/conversations/password%3A%20[REDACTED]'),
        (f'GET /api/v1/conversations/{OPENAI_KEY.text}', 'GET /api/v1/conversations/[REDACTED]'),
    ],
)
def test_a_secret_in_the_field_itself_stays_redacted(where: str, shown: str) -> None:
    line = _logged(REFUSAL, 'err_1', LogField(where), 404, 'not_found', 'no such conversation')
    assert line == f'err_1 {shown}: 404 not_found: no such conversation'


@pytest.mark.parametrize(
    'text', ['password=hunter2-x9 was refused', 'api_key: hunter2-x9', f'with {OPENAI_KEY.text} in it']
)
def test_a_secret_in_the_rest_of_the_line_stays_redacted(text: str) -> None:
    line = _logged(REFUSAL, 'err_1', LogField('GET /api/v1/conversations/my-password'), 500, 'internal_error', text)
    assert line.startswith('err_1 GET /api/v1/conversations/my-password: 500 internal_error: '), line
    assert 'hunter2-x9' not in line and '[REDACTED]' in line
    _assert_clean(line, OPENAI_KEY)


def test_a_field_that_is_a_names_value_in_the_format_is_redacted_with_it() -> None:
    assert _logged('login password=%s failed', LogField('hunter2-x9')) == 'login password=[REDACTED] failed'


def test_a_clients_look_alike_of_a_fields_mark_is_text() -> None:
    forged = '\ue000' + '0' * 16 + '0\ue001'  # a mark's shape, without the record's nonce
    line = _logged('%s %s: %d %s', 'err_1', LogField('GET /x'), 404, forged)
    assert line == f'err_1 GET /x: 404 {forged}'


@pytest.mark.parametrize('name', NAMES)
def test_the_access_logs_status_stays_and_a_querys_secret_goes(name: str) -> None:
    # uvicorn's access line: its formatter reads the arguments (client, method, path and query, version, status).
    args = ('127.0.0.1:5000', 'GET', f'/api/v1/conversations/my-{name}?{name}=hunter2-x9&api_key={OPENAI_KEY.text}')
    record = logging.LogRecord(
        'uvicorn.access', logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', (*args, '1.1', 404), None
    )
    ArgumentRedactingFilter().filter(record)
    line = record.getMessage()
    assert line.startswith(f'127.0.0.1:5000 - "GET /api/v1/conversations/my-{name}?{name}=[REDACTED]&api_key=')
    assert line.endswith('HTTP/1.1" 404') and 'hunter2-x9' not in line
    _assert_clean(line, OPENAI_KEY)
