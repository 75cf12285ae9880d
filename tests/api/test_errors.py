"""The one mapping of errors to HTTP statuses: what the client reads, and that it never quotes internal text."""

from __future__ import annotations

import logging
import socket

import asyncpg
import httpx2
import pytest
from pydantic_ai import FunctionToolset, ModelResponse, RunContext, ToolCallPart
from pydantic_ai.exceptions import ModelHTTPError, UnexpectedModelBehavior, UsageLimitExceeded, UserError
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models.function import AgentInfo, FunctionModel
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from agentrt.agents.simple_chat import create_simple_chat_agent
from agentrt.api import audit
from agentrt.api.app import create_app
from agentrt.api.errors import ApiError, public_error, stream_error
from agentrt.db.errors import (
    ConfigError,
    DatabaseDisconnectedError,
    DatabaseUnavailableError,
    InvalidInputError,
    ModelBehaviorError,
    ModelProviderError,
    RuntimeBusyError,
    TurnLimitExceededError,
)
from agentrt.db.failures import unavailable_error
from agentrt.services.conversations import ConcurrentTurnError
from agentrt.services.ledger import RollupCannotAnswer
from agentrt.services.log_redaction import loggable
from agentrt.services.tenancy import UnknownTenantError
from agentrt.tools.dependencies import SessionDependencies
from tests.api.conftest import Keys, auth, serve

SECRET = 'db.internal:5432 SELECT * FROM api_keys -- sk-live-123'

CASES: list[tuple[BaseException, int, str]] = [
    (InvalidInputError('the message is empty', field='message'), 422, 'invalid_input'),
    (UnknownTenantError("unknown agent 'x' for account 'a'; agents: helper", what='agent'), 422, 'unknown_agent'),
    (UnknownTenantError(f'unknown account; accounts: {SECRET}'), 401, 'unauthorized'),
    (ConcurrentTurnError('c-1'), 409, 'concurrent_turn'),
    (TurnLimitExceededError('the turn made 20 model requests, its limit'), 422, 'turn_limit_exceeded'),
    (UsageLimitExceeded('The next request would exceed the request_limit of 50'), 422, 'turn_limit_exceeded'),
    (RollupCannotAnswer('the rollup is per UTC day'), 422, 'invalid_input'),
    (ModelProviderError(SECRET, status_code=429, body=SECRET), 502, 'model_provider_error'),
    (ModelHTTPError(500, 'gpt-x', body=SECRET), 502, 'model_provider_error'),
    (UnexpectedModelBehavior(SECRET), 502, 'model_provider_error'),
    (
        ModelBehaviorError('the model did not produce a usable answer: output cut off', body=SECRET),
        502,
        'model_behavior_error',
    ),
    (DatabaseUnavailableError(SECRET), 503, 'database_unavailable'),
    (OperationalError(SECRET, {}, Exception(SECRET)), 503, 'database_unavailable'),
    (PoolTimeoutError(SECRET), 503, 'busy'),
    (RuntimeBusyError(SECRET), 503, 'busy'),
    (ConfigError(SECRET), 500, 'configuration_error'),
    (RuntimeError(SECRET), 500, 'internal_error'),
    (ApiError(404, 'not_found', 'no such thing'), 404, 'not_found'),
]


def test_every_error_gets_its_status_and_no_internal_text(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger='agentrt.api'):
        for exc, status, kind in CASES:
            public = public_error(exc, where='test')
            assert (public.status, public.type) == (status, kind), exc
            assert 'db.internal' not in public.message and 'sk-live' not in public.message, exc
            assert public.error_id in caplog.text  # the log line carries the id (and, for a 5xx, the whole error)
    assert public_error(ModelProviderError('x', status_code=500)).message == (
        'the model provider failed (HTTP 500); try again shortly'
    )
    # A rate limit without the provider's Retry-After (with it: tests/api/test_chat_provider_faults.py).
    assert public_error(ModelProviderError('x', status_code=429)).message == (
        'the model provider is rate limiting this server (HTTP 429); try again shortly'
    )
    assert stream_error(UserError('Conversation changed; reload it')).message == 'Conversation changed; reload it'
    assert stream_error(RuntimeError(SECRET)).stream_text().startswith('the request failed on the server (error id ')


async def test_a_database_outage_answers_503_without_its_text(
    keys: Keys, client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(**kwargs: object) -> None:
        raise DatabaseUnavailableError(f'cannot connect to {SECRET}')

    monkeypatch.setattr(audit, 'list_requests', down)
    response = await client.get('/api/v1/llm-audit/interactions', headers=auth(keys.acme))
    assert response.status_code == 503 and 'db.internal' not in response.text
    assert response.json()['type'] == 'database_unavailable'
    assert response.headers['retry-after'] == '5'  # an outage lasts seconds at least: no hammering meanwhile


async def test_a_busy_refusal_says_when_to_try_again(
    keys: Keys, client: httpx2.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def busy(**kwargs: object) -> None:
        raise RuntimeBusyError('the turn waited 30s (AGENTRT_TURN_QUEUE_SECONDS) and was not started')

    monkeypatch.setattr(audit, 'list_requests', busy)
    response = await client.get('/api/v1/llm-audit/interactions', headers=auth(keys.acme))
    assert (response.status_code, response.json()['type'], response.headers['retry-after']) == (503, 'busy', '1')
    # Other statuses are not to be tried again as they are: no Retry-After.
    missing = await client.get('/api/v1/conversations/nope', headers=auth(keys.acme))
    unauthorized = await client.get('/api/v1/conversations/nope')
    assert missing.status_code == 404 and 'retry-after' not in missing.headers
    assert unauthorized.status_code == 401 and 'retry-after' not in unauthorized.headers
    assert unauthorized.headers['www-authenticate'] == 'Bearer'


def test_a_clients_message_and_the_log_line_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    from tests.agents.test_error_redaction import OPENAI_KEY, PLACES, _assert_clean, _planted

    for place in PLACES:
        planted = _planted(OPENAI_KEY, place)
        with caplog.at_level(logging.INFO, logger='agentrt.api'):
            for exc in (
                InvalidInputError(f'the message is not valid: {planted}', field='message'),
                ModelBehaviorError(f'the model did not produce a usable answer: {planted}', body=planted),
                RuntimeError(planted),
            ):
                public = public_error(exc, where='test')
                _assert_clean(public.message + public.stream_text(), OPENAI_KEY)
        assert caplog.records
        for record in caplog.records:
            _assert_clean(record.getMessage() + (record.exc_text or ''), OPENAI_KEY)
        caplog.clear()


def _translated(exc: BaseException) -> DatabaseUnavailableError:
    """The runtime's error for `exc`, raised from it, as a session or `driver_transaction` raises it."""
    error = unavailable_error(exc)
    assert error is not None
    try:
        raise error from exc
    except DatabaseUnavailableError as raised:
        return raised


@pytest.mark.parametrize(
    'exc',
    [
        RuntimeBusyError('the turn waited 30s (AGENTRT_TURN_QUEUE_SECONDS) and was not started'),
        PoolTimeoutError('QueuePool limit of size 10 overflow 5 reached, connection timed out, timeout 30.00'),
        _translated(PoolTimeoutError('QueuePool limit of size 5 overflow 5 reached, connection timed out')),
    ],
    ids=['turns', 'pool', 'pool through a session'],
)
def test_a_busy_refusal_is_one_warning_line_without_a_traceback(
    exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    """A 503 `busy` is the documented answer of a server at capacity: `agentrt serve` logged each as an ERROR with a
    30-line traceback of the admission code (44 refused turns: 1,300 lines), burying real failures."""
    with caplog.at_level(logging.INFO, logger='agentrt.api'):
        public = public_error(exc, where='POST /api/v1/chat')
    assert (public.status, public.type) == (503, 'busy')
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.exc_info is None and record.exc_text is None, 'no traceback'
    line = record.getMessage()
    assert line.startswith(f'{public.error_id} POST /api/v1/chat 503 busy: ') and str(exc)[:40] in line, line
    assert type(exc).__name__ in line


async def _refused_connection() -> DatabaseUnavailableError:
    """The runtime's error for a connection PostgreSQL (or PgBouncer) refused, as its sessions raise it."""
    with socket.socket() as refusing:
        refusing.bind(('127.0.0.1', 0))  # bound, not listening: connections are refused, and no one else takes it
        try:
            try:
                await asyncpg.connect(host='127.0.0.1', port=refusing.getsockname()[1], user='x', timeout=5)
            except OSError as exc:
                error = unavailable_error(exc)
                assert error is not None
                raise error from exc  # as `get_db_session()` raises it (db/session.py)
        except DatabaseUnavailableError as raised:
            return raised
    raise AssertionError('connected to a closed port')


@pytest.mark.parametrize('kind', ['refused', 'lost'])
async def test_postgresql_away_is_one_warning_line_without_a_traceback(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every turn through an outage answers 503 `database_unavailable`: `agentrt serve` logged each as an ERROR with a
    60-line traceback (PgBouncer down 10 s under 30 concurrent chats: 367 of them, 23,000 lines)."""
    if kind == 'refused':
        exc = await _refused_connection()
    else:
        exc = DatabaseDisconnectedError('the connection to PostgreSQL was lost (connection was closed in the middle)')
    with caplog.at_level(logging.INFO, logger='agentrt.api'):
        public = public_error(exc, where='POST /api/v1/chat')
    assert (public.status, public.type) == (503, 'database_unavailable')
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.exc_info is None and record.exc_text is None, 'no traceback'
    line = record.getMessage()
    assert line.startswith(f'{public.error_id} POST /api/v1/chat 503 database_unavailable: {type(exc).__name__} ')
    assert str(exc)[:40] in line, line


def test_a_lock_timeout_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    # Not an outage: the statement that waited is worth its traceback.
    with caplog.at_level(logging.INFO, logger='agentrt.api'):
        public_error(DatabaseUnavailableError('PostgreSQL gave up waiting for a lock (lock_timeout)'), where='test')
    [record] = caplog.records
    assert record.levelno == logging.ERROR and record.exc_text and 'lock_timeout' in record.exc_text


def test_an_unexpected_server_error_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger='agentrt.api'):
        public_error(RuntimeError('boom'), where='test')
    [record] = caplog.records
    assert record.levelno == logging.ERROR and record.exc_text and 'RuntimeError: boom' in record.exc_text


@pytest.mark.parametrize(
    ('exc', 'kind', 'model'),
    [
        (
            ModelProviderError(
                "the provider of model 'gpt-4o-mini' answered HTTP 500: upstream failed. The provider failed",
                status_code=500,
                model_name='gpt-4o-mini',
            ),
            'model_provider_error',
            'gpt-4o-mini',
        ),
        (ModelHTTPError(503, 'gpt-4o', body={'error': 'overloaded'}), 'model_provider_error', 'gpt-4o'),
        (
            UnexpectedModelBehavior('Invalid response from openai chat completions endpoint'),
            'model_provider_error',
            None,
        ),
        (
            ModelBehaviorError("the model did not produce a usable answer: Tool 'x' exceeded max retries"),
            'model_behavior_error',
            None,
        ),
    ],
    ids=['provider', 'pydantic-ai http', 'unusable answer', 'model behaviour'],
)
def test_a_provider_failure_is_one_warning_line_without_a_traceback(
    exc: BaseException, kind: str, model: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A 502 is the provider's or the model's failure, not the server's bug: `agentrt serve` logged each at ERROR with
    a 20-line traceback of the run and the route."""
    with caplog.at_level(logging.INFO, logger='agentrt.api'):
        public = public_error(exc, where='POST /api/v1/chat')
    assert (public.status, public.type) == (502, kind)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.exc_info is None and record.exc_text is None, 'no traceback'
    line = record.getMessage()
    assert line.startswith(f'{public.error_id} POST /api/v1/chat 502 {kind}: {type(exc).__name__} '), line
    assert f'(model {model or "unknown"}): ' in line and str(exc)[:30] in line, line


async def test_a_model_behaviour_errors_line_names_the_model(keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    # A model that never calls its tool rightly: `agentrt serve` logged `502 model_behavior_error: ModelBehaviorError
    # (model unknown): ... exceeded max retries` though the turn knew its model (QA).
    def wrong_arguments(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[ToolCallPart('search_directory', {'nonsense': 1})])

    agent = create_simple_chat_agent(FunctionModel(wrong_arguments, model_name='gpt-4o-mini'))
    caplog.set_level(logging.INFO, logger='agentrt.api')
    async for url in serve(create_app(manage_runtime=False, agent=agent)):
        async with httpx2.AsyncClient(base_url=url, timeout=30) as client:
            answer = await client.post(
                '/api/v1/conversations/bad-args/turns', json={'message': 'hi'}, headers=auth(keys.acme)
            )
    assert answer.status_code == 502 and answer.json()['type'] == 'model_behavior_error', answer.text
    [line] = [record.getMessage() for record in caplog.records if answer.json()['error_id'] in record.getMessage()]
    assert '502 model_behavior_error: ModelBehaviorError (model gpt-4o-mini): ' in line, line


def test_a_provider_failures_line_escapes_the_models_name(caplog: pytest.LogCaptureFixture) -> None:
    # The model's name (AGENTRT_MODEL, the operator's) was the one part of the line not escaped: a newline in it
    # forged a line of the serve log, an ESC reached the terminal reading it (qa140).
    model = 'gpt\x1b]0;SRV\x07\x1b[2J\nWARNING:  forged-serve-line'
    with caplog.at_level(logging.INFO, logger='agentrt.api'):
        public = public_error(ModelHTTPError(500, model, body={'error': 'down'}), where='POST /api/v1/chat')
    [record] = caplog.records
    line = record.getMessage()
    assert line.isprintable(), line
    assert f'{public.error_id} POST /api/v1/chat 502 model_provider_error: ModelHTTPError (model ' in line, line
    assert r'(model gpt\x1b]0;SRV\x07\x1b[2J\nWARNING:  forged-serve-line): ' in line, line


# A request's path is percent-decoded: the client chooses each of its characters. ESC starts a terminal's control
# sequence, a newline forges a log line, U+202E turns the rest of a line around on screen.
HOSTILE_PATH = '%1b%5b2J%0a2026-12-01 INFO forged line%0d%E2%80%AE%E2%80%A8%00end'


@pytest.mark.parametrize(
    ('method', 'url', 'status'),
    [
        ('GET', f'/api/v1/nowhere/{HOSTILE_PATH}', 404),  # no route: Starlette's 404
        ('PUT', f'/api/v1/conversations/{HOSTILE_PATH}', 405),  # a route, another method
        ('GET', f'/api/v1/conversations/{HOSTILE_PATH}', 422),  # a route's refusal (`public_error`)
    ],
    ids=['no route', 'method not allowed', 'invalid conversation id'],
)
async def test_a_paths_control_characters_reach_the_log_escaped(
    keys: Keys, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture, method: str, url: str, status: int
) -> None:
    with caplog.at_level(logging.INFO, logger='agentrt.api'):
        response = await client.request(method, url, headers=auth(keys.acme))
    assert response.status_code == status, response.text
    lines = [record.getMessage() for record in caplog.records if record.name == 'agentrt.api']
    assert any(response.json()['error_id'] in line for line in lines), lines
    for line in lines:
        assert line.isprintable(), line  # no ESC, newline, carriage return, NUL, U+202E, U+2028
    logged = next(line for line in lines if response.json()['error_id'] in line)
    # The path as asked: Starlette's `request.url.path` drops its LF and CR, so the line named another path (qa140).
    assert r'\x1b[2J\n2026-12-01 INFO forged line\r\u202e\u2028\x00end' in logged, logged


async def test_a_body_keys_control_characters_reach_the_log_escaped(
    keys: Keys, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.agents.test_error_redaction import OPENAI_KEY, _assert_clean

    body = {'message': 'hi', '\x1b]0;owned\x07\n' + OPENAI_KEY.text: 1}  # a key the model does not know: a 422
    with caplog.at_level(logging.INFO, logger='agentrt.api'):
        response = await client.post('/api/v1/conversations/c1/turns', headers=auth(keys.acme), json=body)
    assert response.status_code == 422, response.text
    line = next(record.getMessage() for record in caplog.records if response.json()['error_id'] in record.getMessage())
    assert line.isprintable() and r'\x1b]0;owned\x07\n' in line, line
    _assert_clean(line, OPENAI_KEY)  # redacted before it was escaped: `\nsk-...` would not read as a key


def test_loggable_escapes_only_what_is_not_printable() -> None:
    printable = 'GET /api/v1/café 😀 a\\b'
    assert loggable(printable) is printable  # nothing to do, nothing copied
    assert loggable('a\tb\x7f\u200b\ud800\U000e0001') == r'a\tb\x7f\u200b\ud800\U000e0001'
    assert loggable('GET /x\r\n2026-12-01 INFO forged') == r'GET /x\r\n2026-12-01 INFO forged'


@pytest.mark.parametrize('word', ['passwd', 'password', 'secret', 'api_key'])
@pytest.mark.parametrize(
    ('template', 'status'),
    [
        ('/api/v1/nowhere/{word}', 404),  # no route: Starlette's 404 (`on_http_error`)
        ('/api/v1/conversations/my-{word}', 404),  # a route's answer (`public_error`): no such conversation
    ],
    ids=['no route', 'route'],
)
async def test_a_path_ending_in_a_secrets_name_keeps_its_status_in_the_log(
    keys: Keys, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture, word: str, template: str, status: int
) -> None:
    """`GET /passwd` was logged as `GET /passwd: [REDACTED] Not Found`: the redaction read `passwd: 404` as a secret."""
    with caplog.at_level(logging.INFO, logger='agentrt.api'):
        response = await client.get(template.format(word=word), headers=auth(keys.acme))
    assert response.status_code == status, response.text
    line = next(record.getMessage() for record in caplog.records if response.json()['error_id'] in record.getMessage())
    assert f'GET {template.format(word=word)} {status} ' in line and '[REDACTED]' not in line, line


async def test_a_secret_in_a_path_is_still_redacted_and_the_status_kept(
    keys: Keys, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.agents.test_error_redaction import OPENAI_KEY, _assert_clean

    for path in (f'/api/v1/nowhere/password={OPENAI_KEY.text}', f'/api/v1/nowhere/{OPENAI_KEY.text}'):
        with caplog.at_level(logging.INFO, logger='agentrt.api'):
            response = await client.get(path, headers=auth(keys.acme))
        assert response.status_code == 404, response.text
        line = next(r.getMessage() for r in caplog.records if response.json()['error_id'] in r.getMessage())
        assert '[REDACTED] 404 ' in line, line
        _assert_clean(line, OPENAI_KEY)
        caplog.clear()


# Looked up in the test, not given as parameters: pytest-xdist's workers drop an item holding a lone surrogate.
ERROR_TEXTS = {
    'newline': 'boom\n2026-12-01 INFO forged line',
    'escape sequence': '\x1b[2Jcleared',
    'nul': 'nul\x00here',
    'lone surrogate': 'lone ' + chr(0xD800) + ' half',
}


@pytest.mark.parametrize('kind', list(ERROR_TEXTS))
def test_an_unexpected_errors_text_is_escaped_in_its_log_line(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """The 5xx line quoted the exception's text raw: a newline in it forged a log line of its own, an ESC cleared the
    terminal reading the log. Its traceback still follows the line (as the record's traceback, not the message)."""
    text = ERROR_TEXTS[kind]
    with caplog.at_level(logging.INFO, logger='agentrt.api'):
        public = public_error(RuntimeError(text), where='POST /api/v1/chat')
    [record] = caplog.records
    line = record.getMessage()
    assert line.isprintable(), line
    assert line.startswith(f'{public.error_id} POST /api/v1/chat 500 internal_error: RuntimeError '), line
    assert line.endswith(ascii(text)[1:-1]), line  # written out once, not escaped twice
    assert record.levelno == logging.ERROR and record.exc_text and 'RuntimeError' in record.exc_text
    assert record.exc_text.encode('utf-8')  # escaped there too: any handler can write it (and pytest-xdist send it)


_GITHUB_TOKEN = 'ghp_' + 'abcdefghijklmnopqrstuvwxyz0123456789'


async def test_a_bug_in_a_route_is_a_500_logged_once_redacted_under_a_plain_uvicorn(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    # Starlette's outermost middleware answered with the error handler and re-raised: uvicorn logged the error again,
    # "Exception in ASGI application" and a whole traceback, unredacted under a uvicorn of the user's own (QA).
    def broken_tool(ctx: RunContext[SessionDependencies]) -> str:
        """Look something up."""
        raise RuntimeError(f'boom with github token {_GITHUB_TOKEN}')

    def call_it(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[ToolCallPart('broken_tool', {})])

    agent = create_simple_chat_agent(FunctionModel(call_it), toolsets=[FunctionToolset([broken_tool])])
    server_log = logging.getLogger('uvicorn.error')  # uvicorn's loggers do not propagate to the root's capture
    caplog.set_level(logging.INFO)
    async for url in serve(create_app(manage_runtime=False, agent=agent)):
        server_log.addHandler(caplog.handler)  # after uvicorn's start, whose logging set-up replaces its handlers
        try:
            async with httpx2.AsyncClient(base_url=url, timeout=30) as client:
                body, headers = {'message': 'hi'}, auth(keys.acme)
                answer = await client.post('/api/v1/conversations/bug/turns', json=body, headers=headers)
        finally:
            server_log.removeHandler(caplog.handler)
    assert answer.status_code == 500 and answer.json()['type'] == 'internal_error', answer.text
    logged = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(logged) == 1 and answer.json()['error_id'] in logged[0].getMessage(), [r.getMessage() for r in logged]
    everything = '\n'.join(record.getMessage() + (record.exc_text or '') for record in caplog.records)
    assert 'Exception in ASGI application' not in everything and _GITHUB_TOKEN not in everything
