"""No planted secret is stored or shown: real `simple_chat` turns with secrets in every channel.

The corpus (`tests/services/ledger/redaction_corpus.py`: 87 kinds, each at every position it makes sense in) is
planted in the user's message, the model's text and tool-call arguments (a dict and a JSON string), a tool's
results (a dict, JSON text, JSON text inside a dict) and provider error bodies (a `ModelHTTPError` raised by the
model, and the OpenAI-compatible loopback server's error reply through the real `openai` client). Then none of it
may be found in the ledger's content rows or error messages, in conversation titles or summaries, or in what
`agentrt audit show` prints, while the conversation history (the user's record, stored as sent) still holds it:
that is what makes every check here able to fail. Secrets are searched in the text itself (JSON decoded, JSON
inside strings too), never only in an escaped serialisation, where a newline inside a secret would hide it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import pytest
from pydantic_ai import FunctionToolset, ModelMessagesTypeAdapter, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import ModelMessage, ToolReturnPart, UserPromptPart
from pydantic_ai.models import override_allow_model_requests
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from sqlalchemy import text

from agentrt.agents.simple_chat import simple_chat, simple_chat_stream
from agentrt.db.errors import AgentRuntimeError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.background import get_supervisor
from agentrt.services.conversations import (
    Exchange,
    PostgresConversationStore,
    make_summary,
    make_title,
    refresh_title_and_summary,
)
from agentrt.services.conversations._context import SUMMARY_PREFIX
from agentrt.services.ledger import get_request_tracker
from agentrt.services.ledger.redaction import REDACTED
from tests.agents.cli.helpers import invoke
from tests.agents.conftest import account_id
from tests.fake_openai import FakeOpenAI, Reply
from tests.services.ledger.redaction_corpus import FALSE_POSITIVES, KINDS, POSITIONS, Kind

ACCOUNT = 'acme-health'
TEXT = ('inline', 'line_start', 'after_tab', 'url')
TOOL_RESULTS = ('tool_result_dict', 'tool_result_json_text', 'json_in_string')
CANARY = 'canary: this line is stored and shown'


def plant(positions: Iterable[str], kinds: Iterable[Kind] = KINDS) -> list[Any]:
    """Each kind at each of `positions` it is meant for, built as the corpus builds it (text, dict or JSON text)."""
    return [POSITIONS[p].build(kind.text) for kind in kinds for p in kind.positions if p in positions]


def planted_text(positions: Iterable[str]) -> str:
    return '\n'.join([CANARY, *plant(positions)])


def cases(positions: Iterable[str]) -> int:
    return sum(p in positions for kind in KINDS for p in kind.positions)


def strings(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value; a string holding JSON is decoded and searched too."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
            if item.lstrip().startswith(('{', '[')):
                try:
                    stack.append(json.loads(item))
                except ValueError:
                    pass
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def leaked(haystack: str, kinds: Iterable[Kind] = KINDS) -> list[str]:
    """The kinds whose distinctive fragments appear in `haystack`."""
    return [kind.name for kind in kinds if any(fragment in haystack for fragment in kind.distinctive())]


def searchable(body: str) -> str:
    """A stored body as text to search: the raw body, and every string in it once JSON is decoded."""
    try:
        decoded = '\n'.join(strings(json.loads(body)))
    except ValueError:  # a body cut at the size cap is not JSON any more
        decoded = ''
    return f'{body}\n{decoded}'


# --- one model, one tool: every channel carries the corpus -------------------------------------------------------


def _secret_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """First request: text and two tool calls (dict and JSON-string arguments) full of secrets; then an answer."""
    if any(isinstance(part, ToolReturnPart) for part in messages[-1].parts):
        return ModelResponse(parts=[TextPart(planted_text(('line_start', 'after_tab', 'error_body')))])
    args = {'notes': plant(TEXT), 'config': {'password': 'hunter2-PLANTEDpw', 'db': plant(('url',))}}
    return ModelResponse(
        parts=[
            TextPart(planted_text(('inline', 'url', 'error_body'))),
            ToolCallPart('fetch_settings', args, tool_call_id='dict-args'),
            ToolCallPart('fetch_settings', json.dumps({'notes': plant(('line_start',))}), tool_call_id='json-args'),
        ]
    )


def _secret_tools() -> FunctionToolset[Any]:
    toolset: FunctionToolset[Any] = FunctionToolset()

    @toolset.tool_plain
    def fetch_settings(notes: list[str], config: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return the stored settings."""
        return {
            'rows': plant(('tool_result_dict',)),
            'raw': plant(('tool_result_json_text',)),
            'parts': plant(('json_in_string',)),
            'notes_seen': len(notes),
        }

    return toolset


def _failing_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    raise ModelHTTPError(401, 'gpt-4o-mini', body={'error': {'message': planted_text(('error_body', 'line_start'))}})


async def _stored_bodies() -> list[dict[str, Any]]:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = await session.execute(
            text(
                'SELECT r.id, r.error_message, c.kind, c.body, c.redactions FROM llm_requests r '
                'LEFT JOIN llm_request_contents c ON c.request_id = r.id ORDER BY r.started_at, c.kind'
            )
        )
        return [dict(row._mapping) for row in rows]


async def _history_text(session_id: str) -> str:
    store = PostgresConversationStore(await account_id(ACCOUNT))
    record = await store.read_record(session_id)
    assert record is not None
    history = await store.read_history(record.head_id)
    dumped = ModelMessagesTypeAdapter.dump_python([entry.message for entry in history], mode='json')
    return '\n'.join(strings(dumped))


async def test_no_planted_secret_reaches_the_ledger_or_audit_show(demo_data: None, database_url: str) -> None:
    assert len(KINDS) >= 25 and cases((*TEXT, *TOOL_RESULTS, 'error_body')) >= 600
    # Two turns, so that each message stays under the chat's message size limit.
    for positions in (('inline', 'url'), ('line_start', 'after_tab')):
        await simple_chat(planted_text(positions), session_id='secrets', account=ACCOUNT,
                          model=FunctionModel(_secret_model), toolsets=[_secret_tools()])  # fmt: skip
    with pytest.raises((ModelHTTPError, AgentRuntimeError)):
        await simple_chat('and again', session_id='secrets', account=ACCOUNT, model=FunctionModel(_failing_model))

    # The history is the user's record, stored as sent: every planted secret is in it.
    assert leaked(await _history_text('secrets')) == [kind.name for kind in KINDS]

    stored = await _stored_bodies()
    assert [row['kind'] for row in stored] == ['prompt', 'response'] * 4 + ['error', 'prompt']
    everything = '\n'.join(searchable(row['body']) for row in stored)
    assert leaked(everything) == []
    assert REDACTED in everything and CANARY in everything
    # Stored content is JSON that validates back into messages, and says how many secrets it replaced.
    *earlier, last_prompt = stored
    for row in earlier:
        body = json.loads(row['body'])
        assert row['redactions'] > 0
        if row['kind'] == 'prompt':
            assert ModelMessagesTypeAdapter.validate_python(body['messages'])
        elif row['kind'] == 'response':
            assert ModelMessagesTypeAdapter.validate_python([body])
    # The failing turn's prompt: the context budget folded the two big turns before it into their summary, which
    # is written from redacted text, so there was nothing left to replace.
    sent = json.loads(last_prompt['body'])['messages']
    assert sent[0]['parts'][0]['content'].startswith(SUMMARY_PREFIX) and last_prompt['redactions'] == 0
    [error] = [row for row in stored if row['kind'] == 'error']
    assert error['error_message'] and REDACTED in error['error_message'] and leaked(error['error_message']) == []
    raised = ModelHTTPError(401, 'gpt-4o-mini', body={'error': {'message': planted_text(('error_body', 'line_start'))}})
    assert len(leaked(str(raised)[:4000])) >= 5, 'unredacted, the error message column would show planted secrets'

    for request_id in dict.fromkeys(row['id'] for row in stored):
        shown = await invoke('audit', 'show', str(request_id), env={'DATABASE_URL': database_url})
        assert shown.exit_code == 0, shown.stderr
        assert REDACTED in shown.stdout and leaked(shown.stdout) == []
    assert CANARY in shown.stdout


async def test_a_provider_error_body_through_the_openai_client_is_stored_redacted(
    demo_data: None, database_url: str
) -> None:
    body = {
        'error': {
            'message': planted_text(('error_body', 'line_start', 'after_tab', 'url')),
            'type': 'invalid_request_error',
            'param': plant(('tool_result_json_text',)),
            'details': plant(('tool_result_dict', 'json_in_string')),
        }
    }
    reply = Reply(status=400, error_body=body)
    with override_allow_model_requests(True), FakeOpenAI(lambda _: reply).running() as fake:
        provider = OpenAIProvider(base_url=fake.base_url, api_key='sk-test-loopback-only-0000')
        model = OpenAIChatModel('gpt-4o-mini', provider=provider)
        with pytest.raises((ModelHTTPError, AgentRuntimeError)):
            await simple_chat('hello', session_id='provider-error', account=ACCOUNT, model=model)
    [row] = [row for row in await _stored_bodies() if row['kind'] == 'error']
    as_sent = json.dumps(body)
    assert leaked('\n'.join(strings(body))) == [kind.name for kind in KINDS] and len(as_sent) > 50_000
    stored = searchable(row['body'])
    assert leaked(stored) == [] and leaked(row['error_message']) == []
    assert REDACTED in row['error_message'] and '400' in row['error_message'] and CANARY in stored
    shown = await invoke('audit', 'show', str(row['id']), '--json', env={'DATABASE_URL': database_url})
    assert shown.exit_code == 0, shown.stderr
    assert leaked(shown.stdout) == [] and leaked('\n'.join(strings(json.loads(shown.stdout)))) == []


# --- the streamed path ----------------------------------------------------------------------------------------------


def _streamed_secrets(stop_after: int | None = None) -> FunctionModel:
    """Streams the corpus at line starts and after tabs in small chunks, so secrets are cut across chunks."""
    text = planted_text(('line_start', 'after_tab'))

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        for start in range(0, len(text), 97):
            yield text[start : start + 97]

    async def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise AssertionError('streamed only')

    return FunctionModel(respond, stream_function=stream)


async def test_streamed_turns_store_no_planted_secret(demo_data: None) -> None:
    message = planted_text(('inline', 'url'))
    stream = simple_chat_stream(message, session_id='streamed', account=ACCOUNT, model=_streamed_secrets())
    assert ''.join([delta async for delta in stream]).count('\n') > 100
    async with simple_chat_stream('again', session_id='cut', account=ACCOUNT, model=_streamed_secrets()) as cut:
        received = 0
        async for delta in cut:
            received += len(delta)
            if received > 20_000:
                break  # the consumer stops: the request is recorded as cancelled, with what it received
    await get_request_tracker().flush()
    stored = await _stored_bodies()
    assert [row['kind'] for row in stored] == ['prompt', 'response', 'error', 'prompt', 'response']
    cancelled = json.loads(stored[4]['body'])
    assert cancelled['state'] == 'incomplete' and REDACTED in cancelled['parts'][0]['content']
    everything = '\n'.join(searchable(row['body']) for row in stored)
    assert leaked(everything) == [] and REDACTED in everything


# --- titles and summaries ----------------------------------------------------------------------------------------

# Titles show the first 80 characters of the first question, summaries 100 of each recent question and 200 of the
# latest answer: secrets short enough to be seen there, each at the start of a question or an answer.
SHORT = [kind for kind in KINDS if len(kind.text) <= 70 and not any(c in kind.text for c in '\n\t')][:30]


def _answers_with(kinds: list[Kind]) -> FunctionModel:
    answers = iter(kinds)

    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart(f'{next(answers).text}\nis what you sent')])

    return FunctionModel(answer)


async def test_titles_and_summaries_carry_no_planted_secret(demo_data: None) -> None:
    assert len(SHORT) >= 25
    account = await account_id(ACCOUNT)
    groups = [SHORT[i : i + 3] for i in range(0, len(SHORT), 3)]
    for n, group in enumerate(groups):
        model = _answers_with(group)
        for turn, kind in enumerate(group):
            question = f'{kind.text}\nplease keep this' if turn % 2 else f'{kind.text} is my key'
            await simple_chat(question, session_id=f'titled-{n}', account=ACCOUNT, model=model)
    await get_supervisor().join()
    for n in range(len(groups)):
        await refresh_title_and_summary(account, f'titled-{n}')  # up to date whatever the refresh policy
    async with get_db_session(account=Unscoped.ADMIN) as session:
        rows = (await session.execute(text('SELECT conversation_id, title, summary FROM conversations'))).all()
    assert len(rows) == len(groups)
    shown = '\n'.join(f'{row.title}\n{row.summary}' for row in rows)
    assert leaked(shown) == [] and shown.count(REDACTED) >= len(SHORT)
    # Without redaction each of these secrets would be in a title or a summary.
    unredacted = []
    for group in groups:
        exchanges = [Exchange(kind.text, f'{kind.text} is what you sent') for kind in group]
        unredacted += [make_title(exchanges[0]), make_summary(make_title(exchanges[0]), exchanges)]
    assert leaked('\n'.join(unredacted), SHORT) == [kind.name for kind in SHORT]


# --- the false-positive corpus -----------------------------------------------------------------------------------


def _echo_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    prompt = next(p.content for p in messages[0].parts if isinstance(p, UserPromptPart))
    if any(isinstance(part, ToolReturnPart) for part in messages[-1].parts):
        return ModelResponse(parts=[TextPart(str(prompt))])
    return ModelResponse(parts=[ToolCallPart('echo', {'text': prompt}, tool_call_id='echo')])


async def test_ordinary_text_is_stored_unchanged(demo_data: None) -> None:
    toolset: FunctionToolset[Any] = FunctionToolset()

    @toolset.tool_plain
    def echo(text: str) -> dict[str, Any]:
        """Echo the text back."""
        return {'text': text, 'lines': text.splitlines()}

    ordinary = '\n\n'.join(FALSE_POSITIVES)
    result = await simple_chat(ordinary, session_id='ordinary', account=ACCOUNT, model=FunctionModel(_echo_model),
                               toolsets=[toolset])  # fmt: skip
    assert result.output == ordinary
    stored = await _stored_bodies()
    assert len(stored) == 4 and all(row['redactions'] == 0 for row in stored)
    final_prompt = json.loads(stored[2]['body'])
    messages = ModelMessagesTypeAdapter.validate_python(final_prompt['messages'])
    user = next(p for p in messages[0].parts if isinstance(p, UserPromptPart))
    call = next(p for p in messages[1].parts if isinstance(p, ToolCallPart))
    returned = next(p for p in messages[2].parts if isinstance(p, ToolReturnPart))
    assert user.content == ordinary and call.args == {'text': ordinary}
    assert returned.content == {'text': ordinary, 'lines': ordinary.splitlines()}
    answer = ModelMessagesTypeAdapter.validate_python([json.loads(stored[3]['body'])])[0]
    assert answer.parts == [TextPart(ordinary)]
    await get_supervisor().join()
    await refresh_title_and_summary(await account_id(ACCOUNT), 'ordinary')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        title, summary = (await session.execute(text('SELECT title, summary FROM conversations'))).one()
    assert title == make_title(Exchange(' '.join(ordinary.split()), '')) and REDACTED not in summary


# --- hostile spellings the rules once missed, through a turn into the ledger ---------------------------------------


def _says_and_returns(said: str, returned: Any) -> tuple[FunctionModel, FunctionToolset[Any]]:
    """A model that calls a tool returning `returned`, then answers `said`."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if any(isinstance(part, ToolReturnPart) for part in messages[-1].parts):
            return ModelResponse(parts=[TextPart(said)])
        return ModelResponse(parts=[ToolCallPart('read_config', {}, tool_call_id='read')])

    toolset: FunctionToolset[Any] = FunctionToolset()

    @toolset.tool_plain
    def read_config() -> Any:
        """Read the service's configuration."""
        return returned

    return FunctionModel(respond), toolset


async def _turn_stores_none_of(said: str, returned: Any, secrets: Iterable[str], session_id: str) -> None:
    model, toolset = _says_and_returns(said, returned)
    await simple_chat('show me the config', session_id=session_id, account=ACCOUNT, model=model, toolsets=[toolset])
    await get_request_tracker().flush()
    stored = await _stored_bodies()
    assert [row['kind'] for row in stored] == ['prompt', 'response'] * 2
    everything = '\n'.join(searchable(row['body']) for row in stored)
    assert REDACTED in everything
    kept = [secret for secret in secrets if secret in everything]
    assert kept == [], everything[:3000]


async def test_a_private_key_whose_lines_carry_prefixes_or_quotes_is_not_stored(demo_data: None) -> None:
    [key] = [kind for kind in KINDS if kind.name == 'pem-rsa-key']
    lines = key.text.split('\n')
    said = (
        'You quoted:\n> '
        + '\n> '.join(lines)
        + '\nand in Python:\nKEY = (\n'
        + '\n'.join(f'    "{line}\\n"' for line in lines)
        + '\n)'
    )
    returned = {'lines': lines, 'cut_off': lines[:-1], 'as_json': json.dumps(lines), 'separated': '\u2028'.join(lines),
                'after_nul': lines[0] + '\x00\n' + '\n'.join(lines[1:])}  # fmt: skip
    await _turn_stores_none_of(said, returned, key.distinctive(), 'pem-lines')


async def test_a_secret_named_key_with_a_trailing_space_or_control_character_is_not_stored(demo_data: None) -> None:
    # Alone in the value (no other secret-named key to make the ledger walk it): the quick check must see it.
    secrets = [f'hunter2Zq{n}' for n in range(6)]
    keys = ['Password ', 'api_key ', 'token ', 'DB Password ', 'password\x7f', 'secret\t']
    returned = {
        'as_dict': {keys[0]: secrets[0]},
        'as_json_text': json.dumps({keys[1]: secrets[1]}),
        'nested': [{'config': {keys[2]: secrets[2]}}],
        'more': dict(zip(keys[3:], secrets[3:], strict=True)),
    }
    await _turn_stores_none_of('done', returned, secrets, 'trailing-space-keys')


async def test_a_secret_named_key_with_a_nul_a_lone_surrogate_or_an_invisible_mark_is_not_stored(
    demo_data: None,
) -> None:
    # The turn mends NUL and lone surrogates to U+FFFD before the ledger sees the tool's result.
    secrets = [f'hunter2Zq{n}' for n in range(6)]
    returned = {
        'password\x00': secrets[0],
        'db': {'api_key\ud800': secrets[1]},
        'as_json_text': json.dumps({'token\u200b': secrets[2]}, ensure_ascii=False),
        'more': [{'\ufeffsecret': secrets[3]}, {'password\xa0\u200f': secrets[4]}, {'client_secret\u0301': secrets[5]}],
    }
    await _turn_stores_none_of('done', returned, secrets, 'invisible-keys')


async def test_markdown_labels_tables_and_sql_passwords_are_not_stored_nor_summarised(demo_data: None) -> None:
    secrets = ['Zx9pQ2mLk7ab', 'Qw8eRt5yUi3o', 'Pl0kMnBv9Cxz', 'Mn8bVc7xZl2k', 'Ty6uIo1pAs4d', 'Gh3jKl9zXc2v']
    said = (
        'Here are the staging credentials:\n'
        f'- **Username:** admin\n- **Password:** {secrets[0]}\n- **Database password**: {secrets[1]}\n'
        f'| Setting | Value |\n|---|---|\n| password | {secrets[2]} |\n'
        f"SQL: `ALTER USER app WITH PASSWORD '{secrets[3]}';`"
    )
    returned = {
        'notes': f'* **API key:** {secrets[4]}',
        'sql': f"CREATE USER u IDENTIFIED BY '{secrets[5]}';",
    }
    await _turn_stores_none_of(said, returned, secrets, 'markdown')
    await get_supervisor().join()
    await refresh_title_and_summary(await account_id(ACCOUNT), 'markdown')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        title, summary = (await session.execute(text('SELECT title, summary FROM conversations'))).one()
    assert 'Password:** [REDACTED]' in summary and [s for s in secrets if s in f'{title}\n{summary}'] == []
