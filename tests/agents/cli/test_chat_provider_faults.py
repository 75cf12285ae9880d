"""`agentrt chat` with a real provider's model string (`openai:`, the Responses API, the SDK's own client and retries)
against the loopback OpenAI-compatible server: a provider fault is one `error:` line and its exit code, one-shot and
for a piped line, whose conversation goes on with the next line."""

from __future__ import annotations

import pytest

from agentrt.services.conversations import PostgresConversationStore
from tests.agents.cli.helpers import invoke
from tests.agents.conftest import account_id
from tests.factories import ledger_rows, scalar
from tests.fake_openai import FakeOpenAI, Reply, as_unusable_answer

SECRET = 'sk-proj-PLANTEDsecretvalue0123456789abcdef'

FAULTS = {
    'bad key': Reply(
        status=401,
        error_body={'error': {'message': f'Incorrect API key provided: {SECRET}', 'code': 'invalid_api_key'}},
    ),
    'html page': Reply(raw_body=f'<html><body>proxy error {SECRET}</body></html>'.encode(), content_type='text/html'),
    'cut': Reply(text='Nobody in Seattle matches.', chunks=4, fault='drop', fault_after=4),
}
# The exit code (6: ModelProviderError), words of the error line, the ledger's error type.
EXPECTED = {
    'bad key': (6, 'Check the API key', 'ModelAuthenticationError'),
    'html page': (6, 'sent an answer that could not be used', 'UnexpectedModelBehavior'),
    'cut': (6, 'the connection to the provider', 'ModelConnectionError'),
}


pytestmark = pytest.mark.usefixtures('allow_loopback_model_requests')  # only ever to the loopback server


def _env(database_url: str, model: str, fake: FakeOpenAI) -> dict[str, str]:
    """The CLI's environment for `model` on the loopback server."""
    return {
        'DATABASE_URL': database_url,
        'AGENTRT_MODEL': model,
        'OPENAI_BASE_URL': fake.base_url,
        'OPENAI_API_KEY': 'sk-test',
    }


@pytest.mark.parametrize('fault', list(FAULTS))
async def test_a_provider_fault_is_one_error_line_and_the_piped_conversation_goes_on(
    demo_data: None, database_url: str, fault: str
) -> None:
    code, words, error_type = EXPECTED[fault]
    # Each command's first request meets the fault; the rest are answered.
    first_of_command = {0, 1}  # the one-shot command's request, then the piped one's first

    def script(body: object) -> Reply:
        index = len(fake.requests) - 1
        return FAULTS[fault] if index in first_of_command else Reply(text='Nobody matches.')

    with FakeOpenAI(script).running() as fake:
        env = _env(database_url, 'openai:gpt-4o-mini', fake)
        once = await invoke('chat', '--session', 'once', 'Who is in Seattle?', env=env)
        piped = await invoke('chat', '--session', 'piped', input='Who is in Seattle?\nAnd in Boston?\n', env=env)
    assert once.exit_code == code, once.stderr
    [line] = once.stderr.splitlines()
    assert line.startswith('error: ') and words in line and 'the turn was not saved' in line, line
    assert SECRET not in once.stderr + once.stdout + piped.stderr + piped.stdout
    assert 'Traceback' not in once.stderr + piped.stderr
    assert piped.exit_code == code, piped.stderr
    assert words in piped.stderr and 'error: 1 of 2 turns failed' in piped.stderr
    assert 'Nobody matches.' in piped.stdout  # the second line was answered

    async def statuses(session_id: str) -> list[tuple[str, str | None]]:
        rows = await ledger_rows(chat_session_id=session_id)
        return [(r['status'], as_unusable_answer(r['error_type'])) for r in rows]

    assert await statuses('once') == [('error', error_type)]
    assert await statuses('piped') == [('error', error_type), ('complete', None)]
    assert await scalar("SELECT count(*) FROM conversations WHERE conversation_id = 'once'") == 0
    stored = await PostgresConversationStore(await account_id('acme-health')).load('piped')
    assert stored is not None and [m.kind for m in stored.messages] == ['request', 'response']  # the answered line only
    assert await scalar('SELECT count(*) FROM conversation_turns') == 0


@pytest.mark.parametrize('model', ['openai:gpt-4o-mini', 'openai-chat:gpt-4o-mini'])
async def test_a_provider_that_reports_no_usage_is_said_so_in_the_summary_line_not_by_a_python_warning(
    demo_data: None, database_url: str, model: str
) -> None:
    # pydantic-ai warns (UsageLimitUnavailableWarning) when a response has no usage and the run has token limits,
    # which every turn has (AGENTRT_TURN_TOTAL_TOKENS_LIMIT): under the answer, a site-packages path, the warning's
    # paragraph and `warnings.warn(`; the summary said "0 tokens (0 in / 0 out) · cost unpriced".
    with FakeOpenAI(lambda body: Reply(text='Nobody matches.', reports_usage=False)).running() as fake:
        env = _env(database_url, model, fake)
        done = await invoke('chat', '--session', 'no-usage', 'Who is in Seattle?', env=env)
    assert done.exit_code == 0, done.stderr
    assert done.stderr == ''
    [answer, summary] = done.stdout.splitlines()
    assert answer == 'Nobody matches.'
    assert '· 1 request · tokens unknown (usage not measured for 1 of 1 request) · cost unknown ·' in summary
    [row] = await ledger_rows(chat_session_id='no-usage')
    assert (row['status'], row['usage_reported']) == ('complete', False)


@pytest.mark.parametrize('model', ['openai:gpt-4o-mini', 'openai-chat:gpt-4o-mini'])
async def test_usage_that_cannot_be_read_is_said_so_in_the_summary_line_not_glued_to_the_answer(
    demo_data: None, database_url: str, model: str
) -> None:
    # `prompt_tokens: -50`: pydantic-ai's UsageExtractionFailedWarning ("Failed to extract usage with `genai-prices`:
    # ValueError: Invalid usage value ...") was printed at the end of the answer's line (QA).
    reply = Reply(text='Nobody matches.', prompt_tokens=-50)
    with FakeOpenAI(lambda body: reply).running() as fake:
        env = _env(database_url, model, fake)
        done = await invoke('chat', '--session', 'bad-usage', 'Who is in Seattle?', env=env)
    assert done.exit_code == 0, done.stderr
    assert done.stderr == ''
    [answer, summary] = done.stdout.splitlines()
    assert answer == 'Nobody matches.'
    assert 'usage not measured for 1 of 1 request' in summary, summary
    [row] = await ledger_rows(chat_session_id='bad-usage')
    assert (row['status'], row['usage_reported']) == ('complete', False)


@pytest.mark.parametrize('model', ['openai:gpt-4o-mini', 'openai-chat:gpt-4o-mini'])
@pytest.mark.parametrize(
    ('cut_off', 'said'),
    [
        ('length', 'the answer was cut off at its output token limit'),
        ('content_filter', "the answer was cut off by the provider's content filter"),
    ],
)
async def test_an_answer_cut_off_by_the_provider_is_said_so_in_the_summary_line(
    demo_data: None, database_url: str, model: str, cut_off: str, said: str
) -> None:
    # A text answer that ends at max_tokens (which a budget near its limit lowers) or in a content filter is kept and
    # saved by pydantic-ai as a whole answer: it read like one, with nothing said.
    with FakeOpenAI(lambda body: Reply(text='The cardiologists in Seattle are Dr', cut_off=cut_off)).running() as fake:  # type: ignore[arg-type]
        env = _env(database_url, model, fake)
        done = await invoke('chat', '--session', 'cut-off', 'Who is in Seattle?', env=env)
    assert done.exit_code == 0, done.stderr
    [answer, summary] = done.stdout.splitlines()
    assert answer == 'The cardiologists in Seattle are Dr'
    assert summary.endswith(f'· session cut-off · {said}'), summary
    [row] = await ledger_rows(chat_session_id='cut-off')
    assert (row['status'], row['finish_reason']) == ('complete', cut_off)


async def test_a_tool_call_refused_by_validation_is_no_tool_run_in_the_summary(
    demo_data: None, database_url: str
) -> None:
    # Arguments that are not JSON, then a tool that does not exist: each retried, neither run. The summary said
    # `1 tool` where `ChatResult.usage` and the HTTP turn's `tool_calls` said 0 (QA).
    replies = iter(
        [
            Reply(tool_calls=[('search_directory', '{"query": "cardiology", ')]),
            Reply(tool_calls=[('no_such_tool', {'query': 'cardiology'})]),
            Reply(text='Nobody matches.'),
        ]
    )
    with FakeOpenAI(lambda body: next(replies)).running() as fake:
        env = _env(database_url, 'openai-chat:gpt-4o-mini', fake)
        done = await invoke('chat', '--session', 'refused-tools', 'Who is in Seattle?', env=env)
    assert done.exit_code == 0, done.stderr
    summary = done.stdout.splitlines()[-1]
    assert '· 3 requests ·' in summary and '· 0 tools ·' in summary, summary
