"""Clean stored texts are scanned for secrets once per process, not once per run; a text with a secret every run."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, TextPart, ToolReturnPart, UserPromptPart

from agentrt.services.conversations._stored import message_json
from agentrt.services.ledger import _clean_texts, remember_message_json
from agentrt.services.ledger._contents import JsonBody, RunBodies
from agentrt.services.ledger.redaction import REDACTED, json_may_need_redaction
from agentrt.services.message_json import message_adapter
from tests.services.ledger.redaction_corpus import FALSE_POSITIVES, KINDS, POSITIONS

SECRET = 'ghp_0123456789abcdefghijABCDEFGHIJklmnop'


@pytest.fixture(autouse=True)
def _nothing_remembered() -> Iterator[None]:
    _clean_texts.forget_all()
    yield
    _clean_texts.forget_all()


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts the secret check scans, from now on."""
    scanned: list[str] = []

    def spy(text: str) -> bool:
        scanned.append(text)
        return json_may_need_redaction(text)

    monkeypatch.setattr(_clean_texts, 'json_may_need_redaction', spy)
    return scanned


def _history(note: str) -> list[ModelMessage]:
    """A stored exchange: a question, a tool's long result (with `note` in it) and an answer."""
    rows = [{'id': i, 'name': f'Dr. Example {i}', 'city': 'Seattle', 'rating': 4.5} for i in range(12)]
    return [
        ModelRequest(parts=[UserPromptPart(f'Find cardiologists in Seattle {uuid.uuid4().hex}')]),
        ModelRequest(parts=[ToolReturnPart('search', {'results': rows, 'note': note}, tool_call_id='c1')]),
        ModelResponse(parts=[TextPart('Here are twelve of them. ' * 30)]),
    ]


def _run_prompt(history: list[ModelMessage]) -> tuple[str, int]:
    """What a new run stores as the prompt of a request resending `history`, loaded (new objects) from its stored
    texts, as a chat turn loads its conversation."""
    texts = [message_json(message) for message in history]
    loaded = [message_adapter.validate_json(text) for text in texts]
    remember_message_json(loaded, texts)
    return RunBodies().prompt('Be brief.', loaded).render()


def test_a_clean_history_is_scanned_in_the_first_run_only(scans: list[str]) -> None:
    history = _history('nothing to hide')
    first = _run_prompt(history)
    long_texts = [text for text in scans if len(text) >= _clean_texts.MIN_CHARS]
    assert len(long_texts) == 2  # the tool's result and the answer; the question is short and scanned each time
    scans.clear()
    assert _run_prompt(history) == first == (first[0], 0)
    assert [text for text in scans if len(text) >= _clean_texts.MIN_CHARS] == []
    assert _clean_texts.remembered_chars() == sum(map(len, long_texts))


def test_a_history_with_a_secret_is_scanned_and_redacted_in_every_run(scans: list[str]) -> None:
    history = _history(f'deploy key:\n{SECRET}\n')
    for _ in range(3):
        scans.clear()
        text, count = _run_prompt(history)
        assert count == 1 and SECRET not in text and REDACTED in text
        assert any(SECRET in scanned for scanned in scans)
    assert _clean_texts.remembered_chars() == len(message_json(history[2]))  # only the clean answer


def test_a_runs_own_dumps_are_not_remembered(scans: list[str]) -> None:
    text = json.dumps({'answer': 'clean ' * 200})
    for _ in range(2):
        assert JsonBody(text).render() == (text, 0)
    assert scans == [text, text] and _clean_texts.remembered_chars() == 0


@pytest.mark.parametrize('position', sorted(POSITIONS))
def test_remembering_never_changes_the_answer_for_any_planted_secret(position: str) -> None:
    padding = 'ordinary words around it. ' * 40  # long enough to be remembered
    planted = [
        (json.dumps({'note': POSITIONS[position].build(kind.text), 'padding': padding}), kind)
        for kind in KINDS
        if position in kind.positions
    ]
    hostile = [json.dumps({'nul': f'\x00 {SECRET}', 'padding': padding}), json.dumps({'lone': '\ud800' + padding})]
    clean = [json.dumps({'note': text, 'padding': padding}) for text in FALSE_POSITIVES]
    texts = [text for text, _ in planted] + hostile + clean
    for _ in range(2):  # the second time, from memory where it was clean
        for text in texts:
            assert _clean_texts.may_need_redaction(text, recurring=True) == json_may_need_redaction(text)
        for text, kind in planted:
            rendered, count = JsonBody(text, recurring=True).render()
            assert count > 0 and not any(fragment in rendered for fragment in kind.distinctive()), kind.name
        rendered, count = JsonBody(hostile[0], recurring=True).render()
        assert count == 1 and SECRET not in rendered
    assert all(json_may_need_redaction(text) for text, _ in planted)
    assert not set(_clean_texts._clean) & {text for text, _ in planted}


def test_what_is_remembered_stays_within_its_capacity_oldest_forgotten_first(
    scans: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_clean_texts, 'CAPACITY_CHARS', 10_000)
    texts = [json.dumps({'n': n, 'text': 'clean ' * 300}) for n in range(10)]  # about 1,800 characters each
    for text in texts:
        assert not _clean_texts.may_need_redaction(text, recurring=True)
    assert _clean_texts.remembered_chars() <= 10_000
    scans.clear()
    assert not _clean_texts.may_need_redaction(texts[-1], recurring=True)
    assert not _clean_texts.may_need_redaction(texts[0], recurring=True)
    assert scans == [texts[0]]  # the newest remembered, the oldest forgotten
    huge = json.dumps({'text': 'clean ' * 1_000})  # over a quarter of the capacity: never remembered
    for _ in range(2):
        assert not _clean_texts.may_need_redaction(huge, recurring=True)
    assert scans.count(huge) == 2
