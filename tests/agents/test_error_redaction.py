"""Provider and model error text is redacted wherever the runtime shows it: the documented error's message and body,
on plain and streamed runs, and the runtime's log lines.

Secrets come from the redaction tests' corpus (every kind the rules know, in the provider's published shape) and are
planted where providers and proxies put them: at the start of the message, inside a JSON error body, in a URL with
credentials, on a line of their own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelConnectionError,
    ModelHTTPError,
    UnexpectedModelBehavior,
)
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models.function import AgentInfo, DeltaToolCalls, FunctionModel

from agentrt.agents.errors import AgentRuntimeError, ModelBehaviorError, ModelProviderError
from agentrt.agents.run_errors import documented_error
from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
from agentrt.services.log_redaction import LOGGERS, MAX_LOGGED_CHARS, RedactingFilter
from tests.services.ledger.redaction_corpus import KINDS, Kind

OPENAI_KEY = next(kind for kind in KINDS if kind.name == 'openai-project-key')
URL_PASSWORD = 'Pa55-w0rd-zq81x'
# Where a secret sits in a provider's message; `{t}` is the planted text.
PLACES: dict[str, str] = {
    'line_start': '{t} was rejected by the upstream proxy',
    'inside_json': '{{"error": {{"message": "Incorrect API key provided: {t}", "type": "invalid_request_error"}}}}',
    'after_url': 'POST https://proxy-user:' + URL_PASSWORD + '@llm.internal/v1/chat failed for key {t}',
    'own_line': '{t}\nwhile reading the response',
}


def _planted(kind: Kind, place: str) -> str:
    text = kind.text.replace('\\', '\\\\').replace('"', '\\"') if place == 'inside_json' else kind.text
    return PLACES[place].format(t=text)


def _assert_clean(shown: str, kind: Kind) -> None:
    for fragment in (*kind.distinctive(), URL_PASSWORD):
        assert fragment not in shown, (kind.name, fragment, shown)


def _errors(message: str) -> list[BaseException]:
    """Every pydantic-ai error whose text a documented error shows, carrying `message` (and a body with it)."""
    return [
        ModelConnectionError('gpt-4o-mini', message),
        ModelAPIError('gpt-4o-mini', message, body=message),
        ModelHTTPError(401, 'gpt-4o-mini', body={'error': {'message': message}}),
        UnexpectedModelBehavior(message, body=message),
    ]


def _placements() -> list[Any]:
    """Every kind at every place, except a kind the corpus plants only at a line's start (`env-high-entropy`: a
    variable's line) at a place inside other text."""
    return [
        pytest.param(kind, place, id=f'{kind.name}-{place}')
        for kind in KINDS
        for place in PLACES
        if place == 'line_start' or 'url' in kind.positions or 'error_body' in kind.positions
    ]


@pytest.mark.parametrize(('kind', 'place'), _placements())
def test_a_documented_error_never_shows_a_secret_of_the_providers_text(kind: Kind, place: str) -> None:
    message = _planted(kind, place)
    for raw in _errors(message):
        error = documented_error(raw, 'gpt-4o-mini')
        assert isinstance(error, ModelProviderError | ModelBehaviorError), raw
        _assert_clean(str(error), kind)
        _assert_clean(error.body or '', kind)


def test_what_is_shown_of_a_message_is_its_first_line_redacted_then_cut() -> None:
    long_line = 'x' * 190 + ' ' + OPENAI_KEY.secret  # the cut (200) falls inside the key: redacted first, whole
    error = documented_error(ModelConnectionError('gpt-4o-mini', long_line + '\nsecond line'), 'gpt-4o-mini')
    assert isinstance(error, ModelProviderError)
    assert OPENAI_KEY.secret[:12] not in str(error) and 'second line' not in str(error)
    huge = documented_error(UnexpectedModelBehavior('y' * 3995 + ' ' + OPENAI_KEY.secret), 'gpt-4o-mini')
    assert isinstance(huge, ModelBehaviorError)
    assert OPENAI_KEY.secret[:12] not in str(huge) and str(huge).endswith('...; the turn was not saved')
    assert 'Incorrect API key' in str(documented_error(ModelConnectionError('m', _planted(OPENAI_KEY, 'inside_json'))))


def test_a_log_line_cut_to_its_bound_never_keeps_half_a_secret() -> None:
    """The cut (`MAX_LOGGED_CHARS`) falls inside the key: redacted first, so not even its start is kept."""
    message = 'x' * (MAX_LOGGED_CHARS - 20) + ' %s ' + 'y' * 100
    record = logging.LogRecord('agentrt', logging.ERROR, __file__, 1, message, (OPENAI_KEY.secret,), None)
    RedactingFilter().filter(record)
    shown = record.getMessage()
    assert OPENAI_KEY.secret[:12] not in shown and '[REDACTED]' in shown
    assert shown.endswith(' [cut]') and len(shown) == MAX_LOGGED_CHARS + len(' [cut]')


def _failing(error: Callable[[], BaseException]) -> FunctionModel:
    def respond(messages: list[ModelMessage], info: AgentInfo) -> Any:
        raise error()

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        yield 'partial '
        raise error()

    return FunctionModel(respond, stream_function=stream, model_name='gpt-4o-mini')


SECRET_MESSAGE = '\n'.join(_planted(OPENAI_KEY, place) for place in PLACES)
RUN_ERRORS: dict[str, Callable[[], BaseException]] = {
    'connection': lambda: ModelConnectionError('gpt-4o-mini', SECRET_MESSAGE, body=SECRET_MESSAGE),
    'unusable': lambda: ModelAPIError('gpt-4o-mini', SECRET_MESSAGE),
    'http': lambda: ModelHTTPError(500, 'gpt-4o-mini', body={'error': {'message': SECRET_MESSAGE}}),
    'behavior': lambda: UnexpectedModelBehavior(SECRET_MESSAGE, body=SECRET_MESSAGE),
}


@pytest.mark.parametrize('streamed', [False, True], ids=['plain', 'streamed'])
@pytest.mark.parametrize('failure', list(RUN_ERRORS))
async def test_runs_raise_errors_and_log_lines_without_the_secret(
    demo_data: None, caplog: pytest.LogCaptureFixture, failure: str, streamed: bool
) -> None:
    model = _failing(RUN_ERRORS[failure])
    session_id = f'redact-{failure}-{streamed}'
    with caplog.at_level(logging.DEBUG, logger='agentrt'), pytest.raises(AgentRuntimeError) as raised:
        if streamed:
            async with simple_chat_stream('hello', session_id=session_id, account='acme-health', model=model) as stream:
                async for _ in stream:
                    pass
        else:
            await simple_chat('hello', session_id=session_id, account='acme-health', model=model)
    error = raised.value
    assert isinstance(error, ModelProviderError | ModelBehaviorError)
    _assert_clean(str(error), OPENAI_KEY)
    _assert_clean(getattr(error, 'body', None) or '', OPENAI_KEY)
    # A log line that carries the error (its traceback chains pydantic-ai's, with the raw text) is redacted too.
    logging.getLogger('agentrt.api').error('turn failed: %s', error, exc_info=error)
    for record in caplog.records:
        assert record.exc_info is None
        _assert_clean(record.getMessage() + (record.exc_text or ''), OPENAI_KEY)
    [logged] = [record for record in caplog.records if record.getMessage().startswith('turn failed')]
    assert 'Traceback' in (logged.exc_text or '') and type(error).__name__ in (logged.exc_text or '')


def test_every_runtime_logger_redacts() -> None:
    """The filter sits on each logger the sources name (a new logger name must join `LOGGERS`)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    named = {
        name
        for folder in ('agents', 'api', 'services', 'tools', 'db')
        for path in (root / folder).rglob('*.py')
        for name in re.findall(r"getLogger\('([^']+)'\)", path.read_text())
        if name.split('.')[0] == 'agentrt'  # other libraries' (psycopg.pool, procrastinate): reworded, not ours
    }
    assert named and named <= set(LOGGERS), named - set(LOGGERS)
    for name in LOGGERS:
        assert any(isinstance(f, RedactingFilter) for f in logging.getLogger(name).filters), name
    record = logging.LogRecord(
        'agentrt.db', logging.INFO, __file__, 1, 'failed: %s', (json.dumps(SECRET_MESSAGE),), None
    )
    RedactingFilter().filter(record)
    _assert_clean(record.getMessage(), OPENAI_KEY)


@pytest.mark.parametrize('debug', [False, True], ids=['plain', 'debug'])
@pytest.mark.parametrize('failure', ['connection', 'behavior'])
async def test_the_cli_error_line_traceback_and_log_lines_hold_no_secret(
    demo_data: None, database_url: str, monkeypatch: pytest.MonkeyPatch, failure: str, debug: bool
) -> None:
    from agentrt.agents import chat_turn
    from tests.agents.cli.helpers import invoke

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        yield 'partial '
        error = RUN_ERRORS[failure]()
        # A library's log line about it, printed by the CLI's handler: not a runtime logger, redacted all the same.
        logging.getLogger('some.library').error('request failed: %s', SECRET_MESSAGE, exc_info=error)
        raise error

    model = FunctionModel(_failing(RUN_ERRORS[failure]).function, stream_function=stream, model_name='m')
    monkeypatch.setattr(chat_turn, 'resolve_model', lambda *args, **kwargs: model)
    env = {'DATABASE_URL': database_url}
    args = ('--debug',) if debug else ()
    result = await invoke(*args, 'chat', 'hello', '--session', f'cli-{failure}-{debug}', env=env)
    assert result.exit_code in (6, 9), result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith('error:')]
    if debug:
        assert 'Traceback' in result.stderr
    assert 'request failed: ' in result.stderr  # the library's line was printed, redacted
    _assert_clean(result.stdout + result.stderr, OPENAI_KEY)


def test_a_lone_surrogate_in_a_log_line_or_its_traceback_is_written_to_a_utf8_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An error's text holding a lone surrogate (a client's `\\udcff`) could not be encoded by a handler writing UTF-8:
    logging printed "--- Logging error ---" and the line was lost. The filter writes it out as its escape."""
    from agentrt.services.log_redaction import install_log_redaction

    install_log_redaction()
    logger = logging.getLogger('agentrt.api')
    handler = logging.FileHandler(tmp_path / 'server.log', encoding='utf-8')
    logger.addHandler(handler)
    lone = 'conversation ' + chr(0xDCFF) + ' not found'
    try:
        try:
            raise RuntimeError(lone)
        except RuntimeError as exc:
            logger.error('turn failed: %s', lone, exc_info=exc)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert 'Logging error' not in capsys.readouterr().err
    written = (tmp_path / 'server.log').read_text(encoding='utf-8')
    assert written.count(r'conversation \udcff not found') == 2, written  # the line, and the traceback's last line
