"""Bad input through every public path (`simple_chat`, `simple_chat_stream`, `agentrt chat`): the documented error,
before any model request; no ledger row, nothing saved."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import pytest
from pydantic import BaseModel
from pydantic_ai import Agent, FunctionToolset, ModelResponse, RunContext, TextPart, ToolDefinition
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agentrt.agents.runtime import agentrt_runtime, shutdown_runtime
from agentrt.agents.simple_chat import create_simple_chat_agent, simple_chat, simple_chat_stream
from agentrt.agents.turn_input import validate_run_arguments
from agentrt.db.engine import current_settings
from agentrt.db.errors import InvalidInputError
from agentrt.services.ledger import RunIdentity, get_request_tracker
from agentrt.tools.dependencies import SessionDependencies
from tests.agents.cli.helpers import invoke
from tests.factories import scalar

GOOD = {'message': 'Find me cardiologists in Seattle', 'session_id': 'bad-input', 'account': 'acme-health'}
LIMIT = 2_000


@dataclass(frozen=True)
class Case:
    id: str
    field: str
    value: object
    reason: str


CASES = [
    Case('empty message', 'message', '', 'is empty'),
    Case('blank message', 'message', '  \n ', 'is empty'),
    Case('zero-width message', 'message', '\u200b \u200d', 'no visible character'),
    Case('NUL message', 'message', '\x00\x00', 'no visible character'),
    Case('lone surrogate message', 'message', '\ud800\n', 'no visible character'),
    Case('direction marks message', 'message', '\u202e\ufeff\u2066', 'no visible character'),
    Case('message over the limit', 'message', 'x' * (LIMIT + 1), 'the limit is 2,000 (AGENTRT_MESSAGE_MAX_CHARS)'),
    Case('5 MB message', 'message', 'word ' * 1_000_000, '5,000,000 characters long'),
    Case('message not text', 'message', 42, 'must be text'),
    Case('empty session id', 'session_id', '', 'is empty'),
    Case('session id over its column', 'session_id', 's' * 201, 'the limit is 200'),
    Case('NUL in session id', 'session_id', 'conv\x00', 'U+0000, NUL'),
    Case('lone surrogate in session id', 'session_id', 'conv\ud800', 'U+D800, a lone surrogate'),
    Case('argv byte in session id', 'session_id', 'conv\udcff', 'U+DCFF, a lone surrogate'),
    Case('space in session id', 'session_id', 'my conv', 'U+0020, whitespace'),
    Case('slash in session id', 'session_id', 'a/b', "U+002F '/'"),
    Case('session id not text', 'session_id', 7, 'must be text'),
    Case('empty account', 'account', '', 'is empty'),
    Case('account over its column', 'account', 'a' * 65, 'the limit is 64'),
    Case('NUL in account', 'account', 'acme-health\x00', 'U+0000, NUL'),
    Case('lone surrogate in account', 'account', '\udc80acme', 'U+DC80, a lone surrogate'),
    Case('quote in account', 'account', "acme' OR '1'='1", 'U+0027'),
    Case('empty agent', 'agent_instance', '', 'is empty'),
    Case('agent over its column', 'agent_instance', 'p' * 65, 'the limit is 64'),
    Case('NUL in agent', 'agent_instance', 'provider-finder\x00', 'U+0000, NUL'),
    Case('lone surrogate in agent', 'agent_instance', 'finder\ud83d', 'U+D83D, a lone surrogate'),
]
CLI_FLAGS = {'session_id': '--session', 'account': '--account', 'agent_instance': '--agent'}


@pytest.fixture
def small_message_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(current_settings(), 'message_max_chars', LIMIT)


class _NeverCalled:
    def __init__(self) -> None:
        self.calls = 0

    def respond(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.calls += 1
        return ModelResponse(parts=[TextPart('should not run')])


async def _nothing_happened(case: Case) -> None:
    await get_request_tracker().flush()
    assert await scalar('SELECT count(*) FROM llm_requests') == 0, f'{case.id}: a ledger row'
    assert await scalar('SELECT count(*) FROM conversations') == 0, f'{case.id}: a conversation was saved'
    assert await scalar('SELECT count(*) FROM conversation_entries') == 0, f'{case.id}: entries were saved'


@pytest.mark.parametrize('path', ['simple_chat', 'simple_chat_stream'])
async def test_bad_input_is_refused_before_anything_runs(demo_data: None, small_message_limit: None, path: str) -> None:
    model = _NeverCalled()
    for case in CASES:
        kwargs: dict = {**GOOD, case.field: case.value}
        message = kwargs.pop('message')
        with pytest.raises(InvalidInputError) as info:
            if path == 'simple_chat':
                await simple_chat(message, model=FunctionModel(model.respond), **kwargs)
            else:
                # Refused when called, before the stream is iterated: no half-open turn to clean up.
                simple_chat_stream(message, model=FunctionModel(model.respond), **kwargs)
        assert info.value.field == case.field, case.id
        assert case.reason in str(info.value), (case.id, str(info.value))
        assert model.calls == 0, case.id
        await _nothing_happened(case)


@dataclass
class OtherDeps:
    """A deps type of the user's own, which a turn cannot give the agent."""

    tenant: str


class Answer(BaseModel):
    """A structured output, which a turn (answering in text) cannot return."""

    text: str


def test_an_agent_whose_deps_a_turn_can_give_is_accepted() -> None:
    for deps_type in (SessionDependencies, object, type(None), RunIdentity):
        validate_run_arguments(
            model=None, usage_limits=None, toolsets=(), instructions=(), agent=Agent(None, deps_type=deps_type)
        )


ARGUMENT_CASES = [
    Case('model not a model', 'model', 123, 'model must be a model name, a pydantic-ai Model or None, not int'),
    Case('usage limits not UsageLimits', 'usage_limits', {'request_limit': 3}, 'not dict'),
    Case('toolsets not a sequence', 'toolsets', 5, 'a sequence of pydantic-ai toolsets, or None, not int'),
    Case('toolsets a string', 'toolsets', 'directory', 'not str'),
    # One toolset alone (pydantic-ai takes a sequence): the message said a toolset was accepted as it refused one (QA).
    Case('one toolset alone', 'toolsets', FunctionToolset(), 'a sequence of pydantic-ai toolsets, or None, not Func'),
    # The item that is wrong, named (it said "not list" of a list).
    Case('toolsets of strings', 'toolsets', ['directory'], 'toolsets[0] must be a pydantic-ai toolset, not str'),
    Case('instructions a number', 'instructions', 5, 'not int'),
    Case('instructions with a number', 'instructions', ['be brief', 5], 'instructions[1] must be text or a function'),
    Case('agent a name', 'agent', 'simple_chat', 'a pydantic-ai Agent'),
    # Its tools would get SessionDependencies where they expect their own deps: an AttributeError mid-run, billed.
    Case('agent of other deps', 'agent', Agent(None, deps_type=OtherDeps), "the agent's deps_type is OtherDeps"),
    # ChatResult.output, the session's title and the HTTP turn take the answer as text: a model object broke them.
    Case('agent of structured output', 'agent', Agent(None, output_type=Answer), "the agent's output_type is Answer"),
]
STREAM_ARGUMENT_CASES = [
    Case('on_tool_event not callable', 'on_tool_event', 'print', 'a function or None, not str'),
    # Called and never awaited: the callback never ran, with only a RuntimeWarning (QA).
    Case('on_tool_event async', 'on_tool_event', asyncio.sleep, 'a plain function, not an async one'),
    Case('stream_delay text', 'stream_delay', '0.1', 'a number of seconds, not str'),
    Case('stream_delay NaN', 'stream_delay', float('nan'), 'finite number of seconds, 0 or more, not nan'),
    Case('stream_delay infinite', 'stream_delay', float('inf'), 'not inf'),
    Case('stream_delay negative', 'stream_delay', -1, 'not -1'),
    # Finite, but the demo model's stream waited for ever between its words (QA).
    Case('stream_delay huge', 'stream_delay', 1e308, "pause between the demo model's words, at most 2 s, not 1e+308"),
    # Past a float's range: math.isfinite raised a raw OverflowError (QA).
    Case('stream_delay past a float', 'stream_delay', 10**400, 'seconds, 0 or more, not a whole number past any'),
]


@pytest.mark.parametrize('path', ['simple_chat', 'simple_chat_stream'])
async def test_arguments_of_the_wrong_type_are_refused_before_anything_runs(demo_data: None, path: str) -> None:
    """Once an AttributeError deep in pydantic-ai after the claim, and a NaN `stream_delay` a stream that never
    ended: now the documented error naming the argument, before the database or the model."""
    cases = ARGUMENT_CASES if path == 'simple_chat' else ARGUMENT_CASES + STREAM_ARGUMENT_CASES
    for case in cases:
        kwargs: dict = {**GOOD, case.field: case.value}
        message = kwargs.pop('message')
        with pytest.raises(InvalidInputError) as info:
            if path == 'simple_chat':
                await simple_chat(message, **kwargs)
            else:
                simple_chat_stream(message, **kwargs)
        assert info.value.field.split('.')[0] == case.field, case.id  # `toolsets.0`: the item of the argument
        assert case.reason in str(info.value), (case.id, str(info.value))
        await _nothing_happened(case)


def test_create_simple_chat_agent_refuses_what_a_turn_would_have_failed_on() -> None:
    # The agent was built with any of these, and each of its turns failed deep in pydantic-ai ("'int' object has no
    # attribute 'strip'", "'str' object is not callable" in an ExceptionGroup), far from the argument (QA).
    for case in ARGUMENT_CASES:
        if case.field not in ('model', 'toolsets', 'instructions'):
            continue
        with pytest.raises(InvalidInputError) as info:
            create_simple_chat_agent(**{case.field: case.value})  # type: ignore[arg-type]
        assert info.value.field.split('.')[0] == case.field and case.reason in str(info.value), case.id
    # None means none, for instructions as for toolsets (it was refused as "not NoneType").
    agent = create_simple_chat_agent(toolsets=None, instructions=None)
    assert isinstance(agent, Agent)


async def test_none_as_a_turns_instructions_is_none(demo_data: None) -> None:
    result = await simple_chat(GOOD['message'], session_id='no-instructions', account='acme-health', instructions=None)
    assert result.output


async def test_bad_input_through_the_cli_is_a_clear_error(
    demo_data: None, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {'DATABASE_URL': database_url, 'AGENTRT_MESSAGE_MAX_CHARS': str(LIMIT)}
    for case in CASES:
        if not isinstance(case.value, str):
            continue  # a command line only carries text
        args = ['chat', GOOD['message'], '--delay', '0', '--session', GOOD['session_id']]
        if case.field == 'message':
            args[1] = case.value
        else:
            args += [CLI_FLAGS[case.field], case.value]
        result = await invoke(*args, env=env)
        assert result.exit_code != 0, case.id
        assert 'error:' in result.stderr and case.reason in result.stderr, (case.id, result.stderr)
        assert 'Traceback' not in result.stdout + result.stderr, case.id
        assert 'model demo' not in result.stdout, case.id
        await _nothing_happened(case)


async def test_a_bad_line_in_an_interactive_chat_is_reported_and_the_chat_goes_on(
    demo_data: None, database_url: str
) -> None:
    env = {'DATABASE_URL': database_url, 'AGENTRT_MESSAGE_MAX_CHARS': str(LIMIT)}
    lines = '\n'.join(['x' * (LIMIT + 1), 'organic berries in Fresno', 'exit'])
    result = await invoke(
        'chat', '--delay', '0', '--account', 'green-grocer', '--session', 'inter', input=lines, env=env
    )
    assert result.exit_code == 2, result.stderr  # lines from a pipe: the last failure's code, once the chat ended
    assert '2,001 characters long; the limit is 2,000' in result.stderr and '1 of 2 turns failed' in result.stderr
    assert result.stdout.count('model demo') == 1, 'the good line ran'
    assert await scalar("SELECT count(*) FROM llm_requests WHERE chat_session_id = 'inter'") == 3


@pytest.mark.parametrize('path', ['simple_chat', 'simple_chat_stream'])
async def test_a_turns_tool_named_as_one_of_the_agents_is_an_invalid_toolsets_error(demo_data: None, path: str) -> None:
    # pydantic-ai's UserError reached the caller as it was, not one of the documented errors (QA).
    clash = FunctionToolset[SessionDependencies]()

    @clash.tool
    async def search_directory(ctx: RunContext[SessionDependencies], q: str) -> str:
        return q

    with pytest.raises(InvalidInputError) as info:
        if path == 'simple_chat':
            await simple_chat(**GOOD, toolsets=[clash])
        else:
            async with simple_chat_stream(**GOOD, toolsets=[clash]) as stream:
                async for _ in stream:
                    pass
    assert info.value.field == 'toolsets' and "'search_directory'" in str(info.value), str(info.value)
    assert 'nothing was sent' in str(info.value)
    await _nothing_happened(Case('tool name clash', 'toolsets', clash, ''))


def test_an_agent_built_with_a_tool_named_as_one_of_the_directorys_is_refused_at_once() -> None:
    # The agent was built, and only its first turn failed on the clash (QA).
    clash = FunctionToolset[SessionDependencies]()

    @clash.tool
    async def search_directory(ctx: RunContext[SessionDependencies], q: str) -> str:
        return q

    with pytest.raises(InvalidInputError) as info:
        create_simple_chat_agent('demo', toolsets=[clash])
    assert info.value.field == 'toolsets', str(info.value)
    assert "tool 'search_directory' of toolsets[0] conflicts with the tool of that name in the directory toolset" in (
        str(info.value)
    )
    mine = FunctionToolset[SessionDependencies]()

    @mine.tool
    async def lookup(ctx: RunContext[SessionDependencies], q: str) -> str:
        return q

    with pytest.raises(InvalidInputError, match=r"tool 'lookup' of toolsets\[1\] conflicts .* in toolsets\[0\]"):
        create_simple_chat_agent('demo', toolsets=[mine, mine])
    create_simple_chat_agent('demo', toolsets=[mine])  # one of each name: built

    # A tool whose `prepare` hides or renames it per run may share a name: the run lists what it offers (QA).
    async def renamed(ctx: RunContext[SessionDependencies], tool_def: ToolDefinition) -> ToolDefinition:
        return replace(tool_def, name='my_search_directory')

    prepared = FunctionToolset[SessionDependencies]()

    @prepared.tool(prepare=renamed)
    async def search_directory(ctx: RunContext[SessionDependencies], q: str) -> str:  # noqa: F811
        return q

    create_simple_chat_agent('demo', toolsets=[prepared])


@pytest.mark.parametrize('value', ['x', -1, float('nan'), float('inf'), True])
async def test_a_shutdown_timeout_that_is_not_seconds_is_refused_before_anything_stops(
    demo_data: None, value: object
) -> None:
    # `timeout='x'` was a TypeError of a comparison; -1 returned at once and NaN waited for every turn; and
    # `agentrt_runtime(shutdown_timeout='x')` ran its whole block before it failed.
    with pytest.raises(InvalidInputError) as info:
        await shutdown_runtime(value)  # type: ignore[arg-type]
    assert info.value.field == 'timeout', str(info.value)
    with pytest.raises(InvalidInputError) as info:
        async with agentrt_runtime(shutdown_timeout=value):  # type: ignore[arg-type]
            pytest.fail('the block ran')
    assert info.value.field == 'shutdown_timeout', str(info.value)
    result = await simple_chat(**{**GOOD, 'session_id': 'after-bad-shutdown'})  # the runtime is still up
    assert result.output
