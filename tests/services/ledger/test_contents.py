"""Stored bodies: each message redacted once per run, in the text itself, off the event loop, valid JSON."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from pydantic_ai import Agent, ModelMessagesTypeAdapter, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agentrt.db.driver import DriverTransaction, driver_transaction
from agentrt.db.roles import Unscoped
from agentrt.services.conversations._stored import message_json
from agentrt.services.ledger import (
    LLMRequestTracker,
    _clean_texts,
    _contents,
    _prepare,
    _record,
    ledger_capability,
    remember_message_json,
)
from agentrt.services.ledger._contents import Body, RunBodies
from agentrt.services.ledger.redaction import REDACTED
from tests.factories import content_rows, fast_config, ledger_record, ledger_rows

SECRET = 'ghp_0123456789abcdefghijABCDEFGHIJklmnop'


def _calls_tool(requests: int) -> FunctionModel:
    """A run of `requests` model requests: one tool call each, then an answer."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        done = sum(isinstance(p, ToolReturnPart) for m in messages for p in m.parts)
        if done >= requests - 1:
            return ModelResponse(parts=[TextPart(f'done after {done}')])
        return ModelResponse(
            parts=[ToolCallPart('lookup', {'n': done, 'note': f'key\n{SECRET}'}, tool_call_id=f'c{done}')]
        )

    return FunctionModel(respond, model_name='gpt-4o-mini')


def _agent(tracker: LLMRequestTracker, requests: int) -> Agent[None, str]:
    agent: Agent[None, str] = Agent(
        _calls_tool(requests), instructions='Look things up.', capabilities=[ledger_capability(tracker)]
    )

    @agent.tool_plain
    def lookup(n: int, note: str) -> dict[str, Any]:
        return {'n': n, 'config': f'token:\n{SECRET}', 'password': 'hunter2hunter2'}

    return agent


class _Spy:
    """Counts the bodies rendered (each is checked for secrets once, then walked if it may hold one), and the
    threads they were rendered in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.threads: list[str] = []
        real = _contents.json_may_need_redaction

        def spy(text: str) -> bool:
            self.threads.append(threading.current_thread().name)
            return real(text)

        monkeypatch.setattr(_contents, 'json_may_need_redaction', spy)
        monkeypatch.setattr(_clean_texts, 'json_may_need_redaction', spy)  # the check of known texts (`JsonBody`)


async def test_each_message_of_a_run_is_redacted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spy = _Spy(monkeypatch)
    tracker = LLMRequestTracker(fast_config(tmp_path))
    requests = 12
    result = await _agent(tracker, requests).run('look up everything')
    await tracker.flush()
    # Request N resends N - 1 messages; each of the 2 x 12 messages (and the instructions) is redacted once.
    assert len(result.all_messages()) == 2 * requests
    assert len(spy.threads) == 2 * requests + 1
    rows = await ledger_rows()
    last_prompt = {c['kind']: c for c in await content_rows(rows[-1]['id'])}['prompt']
    body = json.loads(last_prompt['body'])
    assert body['instructions'] == 'Look things up.'
    messages = ModelMessagesTypeAdapter.validate_python(body['messages'])
    assert len(messages) == 2 * requests - 1 and SECRET not in last_prompt['body']
    assert last_prompt['redactions'] == 3 * (requests - 1)  # per tool call: its note, its result's token, password
    call = messages[1].parts[0]
    assert isinstance(call, ToolCallPart) and call.args == {'n': 0, 'note': f'key\n{REDACTED}'}


def _threads_of(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[str]:
    """The names of the threads `module.name` is called in, from now on."""
    threads: list[str] = []
    real = getattr(module, name)

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(module, name, spy)
    return threads


async def test_redaction_runs_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    walks = _threads_of(monkeypatch, _contents, 'redact_value')
    error_threads = _threads_of(monkeypatch, _record, 'redact_text')
    tracker = LLMRequestTracker(fast_config(tmp_path))
    await _agent(tracker, 3).run('look up')
    await tracker.track_request(ledger_record(success=False, error_message=f'provider said\n{SECRET}'))
    assert walks and error_threads
    assert all(name.startswith('agentrt-ledger-prepare') for name in walks + error_threads)
    [failed] = [row for row in await ledger_rows() if not row['success']]
    assert failed['error_message'] == f'provider said\n{REDACTED}'


async def test_small_clean_bodies_are_checked_on_the_loop_and_big_ones_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    spy = _Spy(monkeypatch)
    tracker = LLMRequestTracker(fast_config(tmp_path))
    agent: Agent[None, str] = Agent(FunctionModel(lambda messages, info: ModelResponse(parts=[TextPart('hello')])))
    await agent.run('a short clean question', capabilities=[ledger_capability(tracker)])
    assert spy.threads == [threading.current_thread().name] * 3  # instructions, question, answer: no hand-off
    spy.threads.clear()
    big = 'a long clean question ' * (_prepare.INLINE_PREPARE_BYTES // 20)
    await agent.run(big, capabilities=[ledger_capability(tracker)])
    assert spy.threads and all(name.startswith('agentrt-ledger-prepare') for name in spy.threads)
    await tracker.flush()
    prompts = [c['body'] for c in await content_rows() if c['kind'] == 'prompt']
    assert len(prompts) == 2 and big in json.loads(max(prompts, key=len))['messages'][0]['parts'][0]['content']


async def test_an_error_message_with_nul_and_lone_surrogates_keeps_its_row(tmp_path: Path):
    tracker = LLMRequestTracker(fast_config(tmp_path))
    record = ledger_record(success=False, error_message=f'bad \x00 byte \udc80 and\n{SECRET}')
    assert await tracker.track_request(record) == 'written'
    [row] = await ledger_rows(id=record.id)
    assert row['error_message'] == f'bad \ufffd byte \ufffd and\n{REDACTED}'


class _Held(Body):
    """A body whose rendering waits until the test lets it go: a huge message being redacted."""

    def __init__(self) -> None:
        super().__init__(None)
        self.release = threading.Event()

    def _render(self) -> tuple[str, int]:
        assert self.release.wait(10)
        return '{"held": true}', 0


async def test_a_body_still_being_prepared_delays_no_other_row(tmp_path: Path):
    tracker = LLMRequestTracker(fast_config(tmp_path))
    held = _Held()
    slow = ledger_record(raw_contents=[('prompt', held)])
    slow_ack = tracker.submit(slow)
    others = [tracker.submit(ledger_record()) for _ in range(3)]
    assert await asyncio.gather(*others) == ['written'] * 3
    assert not slow_ack.done() and len(await ledger_rows()) == 3
    held.release.set()
    assert await slow_ack == 'written'
    assert [c['body'] for c in await content_rows(slow.id)] == ['{"held": true}']


async def test_rows_and_their_contents_share_one_transaction(tmp_path: Path):
    sessions = 0

    @asynccontextmanager
    async def counted() -> AsyncIterator[DriverTransaction]:
        nonlocal sessions
        sessions += 1
        async with driver_transaction(account=Unscoped.LEDGER) as transaction:
            yield transaction

    tracker = LLMRequestTracker(fast_config(tmp_path), session_factory=counted)
    await _agent(tracker, 3).run('look up')
    await tracker.flush()
    assert len(await ledger_rows()) == 3 and len(await content_rows()) == 6
    assert sessions == tracker.stats.batches <= 3  # was 6: a transaction for each row and one for its contents


class _Broken(Body):
    def _render(self) -> tuple[str, int]:
        raise RuntimeError('a bug in rendering')


async def test_a_body_that_cannot_be_prepared_costs_its_contents_not_its_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    tracker = LLMRequestTracker(fast_config(tmp_path))
    record = ledger_record(raw_contents=[('prompt', _Broken(None))])
    assert await tracker.track_request(record) == 'written'
    assert len(await ledger_rows(id=record.id)) == 1 and await content_rows(record.id) == []
    assert 'could not prepare request' in caplog.text


async def test_nul_and_lone_surrogates_are_stored_as_valid_json(tmp_path: Path):
    tracker = LLMRequestTracker(fast_config(tmp_path))
    prompt = f'nul \x00 lone \ud800 surrogate\n{SECRET}\nend'

    def echo(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart(prompt)])

    agent: Agent[None, str] = Agent(FunctionModel(echo, model_name='gpt-4o-mini'))
    await agent.run(prompt, capabilities=[ledger_capability(tracker)])
    await tracker.flush()
    bodies = {c['kind']: c['body'] for c in await content_rows()}
    [request] = ModelMessagesTypeAdapter.validate_python(json.loads(bodies['prompt'])['messages'])
    [response] = ModelMessagesTypeAdapter.validate_python([json.loads(bodies['response'])])
    expected = f'nul \x00 lone \ud800 surrogate\n{REDACTED}\nend'
    assert isinstance(request, ModelRequest) and request.parts == [UserPromptPart(expected, timestamp=ANY)]
    assert response.parts == [TextPart(expected)]
    assert '\\ud800' in bodies['prompt'] and SECRET not in bodies['prompt'] + bodies['response']


def test_a_message_is_dumped_again_once_it_changed():
    bodies = RunBodies()
    message = ModelRequest(parts=[UserPromptPart('first')])
    once = bodies.prompt('be brief', [message])
    again = bodies.prompt('be brief', [message])
    assert once._messages[0] is again._messages[0] and once._instructions is again._instructions
    message.parts.append(UserPromptPart(f'second {SECRET}'))
    changed = bodies.prompt('be brief', [message])
    assert changed._messages[0] is not once._messages[0]
    text, count = changed.render()
    assert count == 1 and 'second [REDACTED]' in text and once.render()[1] == 0


def test_a_message_loaded_from_the_store_is_stored_from_its_text_as_if_dumped() -> None:
    clean = ModelRequest(parts=[UserPromptPart('Find me cardiologists in Seattle')])
    secret = ModelResponse(parts=[TextPart(f'here:\n{SECRET}'), ToolCallPart('lookup', {'n': 1}, tool_call_id='c1')])
    changed = ModelRequest(parts=[UserPromptPart('was one part')])
    messages = [clean, secret, changed]
    texts = [message_json(message) for message in messages]
    dumped = RunBodies().prompt('be brief', messages).render()  # nothing remembered: each message dumped
    remember_message_json(messages, texts)
    changed.parts.append(UserPromptPart('and now two'))  # the run added a part: not what was stored
    bodies = RunBodies()
    prompt = bodies.prompt('be brief', messages)
    # The remembered texts themselves, not dumped again; the changed message dumped.
    assert [body._text for body in prompt._messages[:2]] == texts[:2]
    assert prompt._messages[0]._text is texts[0] and prompt._messages[2]._text is not texts[2]
    text, count = prompt.render()
    assert count == 1 and SECRET not in text and '[REDACTED]' in text and 'and now two' in text
    changed.parts.pop()
    assert RunBodies().prompt('be brief', messages).render() == dumped  # the same text whichever way it was made
    assert len(ModelMessagesTypeAdapter.validate_python(json.loads(text)['messages'])) == 3
