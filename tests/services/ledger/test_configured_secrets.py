"""The runtime's own credentials redacted as literals (`_configured_secrets`): which variables count, what is left
out, the environment read again when it changed, and JSON text kept valid around a replaced value."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from agentrt.services.ledger._configured_secrets import _FEW_VALUES, MIN_CHARS, configured_secrets, credential_values
from agentrt.services.ledger.redaction import (
    CONFIGURED_CREDENTIAL,
    REDACTED,
    find_secrets,
    json_may_need_redaction,
    redact_text,
    redact_value,
    reread_configured_secrets,
)

KEY = 'vllm-local-9f8e7d6c5b4a3210ffee'


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """`OPENAI_API_KEY` set to `KEY` and read; the values read again from the restored environment afterwards."""
    monkeypatch.setenv('OPENAI_API_KEY', KEY)
    reread_configured_secrets()
    yield monkeypatch
    monkeypatch.undo()
    reread_configured_secrets()


def test_the_variables_that_hold_a_credential_are_read_and_others_not() -> None:
    environment = {
        'OPENAI_API_KEY': 'vllm-local-aaaa1111',
        'ANTHROPIC_API_KEY': 'anthropic-bbbb2222',
        'CO_API_KEY': 'cohere-cccc3333',
        'HF_TOKEN': 'hf-token-dddd4444',
        'AWS_SECRET_ACCESS_KEY': 'aws/secret+eeee5555',
        'PGPASSWORD': 'pg-pass-ffff6666',
        'MY_APP_SECRET': 'app-secret-gggg7777',
        'DB_PASSWORD': 'db-password-hhhh8888',
        'DATABASE_URL': 'postgresql://app:s3cret%40pass@db.example/app',
        'OTHER_DSN': 'postgresql://app:another-pass-9999@db.example/app',
        'TOKEN': 'bare-token-iiii0000',
        # Not credentials, or not worth replacing everywhere they appear:
        'HOME': '/home/someone-with-a-long-name',
        'MONKEY': 'not-a-key-by-its-name',
        'TOKENIZER_NAME': 'cl100k_base-tokenizer',
        'SHORT_API_KEY': 'x' * (MIN_CHARS - 1),
        'TLS_KEY': '/etc/ssl/private/server.key',
        'SSH_KEY': '~/.ssh/id_ed25519-long',
        'BLANK_SECRET': ' ' * 12,
        'ODD_TOKEN': 'REDACTED]',  # inside the replacement itself: it would be replaced again
        'LETTERS_PASSWORD': 'postgres',  # a word: every `postgresql` of every text
        'DIGITS_PASSWORD': '12345678',  # a number
        'DEV_DATABASE_URL': 'postgresql://postgres:postgres@localhost/app',
        'PLAIN_URL': 'https://user@example.com/path-without-password',
        # A key that names no credential (QA: every query naming the column lost it), a rule line, and values that
        # JSON text writes escaped (a replacement there split an escape: invalid JSON; QA):
        'PARTITION_KEY': 'tenant_id',
        'SORT_KEY': 'created_at:desc',
        'CACHE_KEY': 'prefix-v2-cache',
        'RULE_SECRET': '--------',
        'QUOTED_API_KEY': 'Xy"9kLmN2pQ',
        'SLASHED_API_KEY': 'Secr3t\\Key99',
    }
    values = credential_values(environment.items(), ['postgresql://u:from-dotenv-pass@h/db', 'postgresql://h/db'])
    assert set(values) == {
        'vllm-local-aaaa1111',
        'anthropic-bbbb2222',
        'cohere-cccc3333',
        'hf-token-dddd4444',
        'aws/secret+eeee5555',
        'pg-pass-ffff6666',
        'app-secret-gggg7777',
        'db-password-hhhh8888',
        's3cret%40pass',  # as written in the URL
        's3cret@pass',  # and decoded, as a driver's error or a program would show it
        'another-pass-9999',
        'bare-token-iiii0000',
        'from-dotenv-pass',
    }
    assert [len(value) for value in values] == sorted((len(value) for value in values), reverse=True)


def test_a_configured_key_of_no_known_shape_is_redacted_wherever_it_appears(configured: pytest.MonkeyPatch) -> None:
    line = f'error: the provider answered HTTP 401: Incorrect API key provided: {KEY}. Check the API key'
    assert redact_text(line) == (line.replace(KEY, REDACTED), 1)
    assert [span.rule for span in find_secrets(line)] == [CONFIGURED_CREDENTIAL]
    # Beside a secret the rules find, each is replaced once; one the rules find too (an `sk-` key configured) once.
    openai_key = 'sk-proj-abcdefghijklmnopqrstuvwxyz0123456789'
    configured.setenv('ANTHROPIC_API_KEY', openai_key)
    reread_configured_secrets()
    assert redact_text(f'{KEY} {openai_key} {KEY}') == (f'{REDACTED} {REDACTED} {REDACTED}', 3)
    assert [(span.start, span.end) for span in find_secrets(f'key {openai_key}.')] == [(4, 4 + len(openai_key))]
    # In values and JSON text: found by the one check a stored body gets, and the JSON stays valid.
    body = {'error': {'message': f'Incorrect API key provided: {KEY}', 'key': [KEY, f'x\n{KEY}\t']}}
    as_json = json.dumps(body)
    assert json_may_need_redaction(as_json) and not json_may_need_redaction(json.dumps({'a': 'ordinary text'}))
    redacted, count = redact_value(body)
    assert KEY not in json.dumps(redacted) and count == 3
    text, count = redact_text(as_json)
    assert KEY not in text and count == 3 and json.loads(text)['error']['message'].endswith(REDACTED)
    # Lone surrogates, which RE2 cannot read as UTF-8, and text beyond ASCII before the value.
    for before in ('', 'word ' * 1000):
        assert redact_text(f'{before}\ud800 {KEY} é {KEY}') == (f'{before}\ud800 {REDACTED} é {REDACTED}', 2)
        assert redact_text(f'{before}é {KEY}') == (f'{before}é {REDACTED}', 1)
        assert json_may_need_redaction(json.dumps(f'{before}{KEY}'))
    assert redact_text('ordinary text, a vllm-local key of someone else') == (
        'ordinary text, a vllm-local key of someone else',
        0,
    )


def test_many_values_are_searched_in_one_scan(configured: pytest.MonkeyPatch) -> None:
    for index in range(_FEW_VALUES):  # past `_FEW_VALUES`, one RE2 pattern of them all
        configured.setenv(f'SERVICE_{index}_TOKEN', f'token-{index}-of-a-service')
    reread_configured_secrets()
    assert len(configured_secrets()) > _FEW_VALUES
    text = f'\ud800 {KEY} and token-3-of-a-service, é'
    assert redact_text(text) == (f'\ud800 {REDACTED} and {REDACTED}, é', 2)  # lone surrogates: RE2 cannot read them
    assert redact_text(text[1:]) == (f' {REDACTED} and {REDACTED}, é', 2)
    assert json_may_need_redaction(json.dumps({'a': f'x{KEY}'})) and not json_may_need_redaction('{"a": "token-3"}')


def test_a_value_inside_a_longer_word_is_kept_and_json_text_stays_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    # QA: `sk-local` blanked the start of `sk-localhost`, `password1` of `password123`; a value after a JSON escape's
    # letter (`\\n` then the value) is still found.
    monkeypatch.setenv('OPENAI_API_KEY', 'sk-local')
    monkeypatch.setenv('DB_PASSWORD', 'password1')
    monkeypatch.setenv('N_TOKEN', 'nopqrstuvwxyz012')
    reread_configured_secrets()
    try:
        kept = 'curl http://sk-localhost:8080 with password123 or xnopqrstuvwxyz012 or nopqrstuvwxyz0123 or a_password1'
        assert redact_text(kept) == (kept, 0)
        said = 'key sk-local, (password1) "nopqrstuvwxyz012".'
        assert redact_text(said) == (f'key {REDACTED}, ({REDACTED}) "{REDACTED}".', 3)
        escaped = json.dumps({'m': 'line\nnopqrstuvwxyz012\tsk-local'})  # each after a JSON escape's letter
        redacted, count = redact_text(escaped)
        assert count == 2 and json.loads(redacted) == {'m': f'line\n{REDACTED}\t{REDACTED}'}
    finally:
        monkeypatch.undo()
        reread_configured_secrets()


def test_the_values_are_read_again_when_the_environment_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    reread_configured_secrets()
    assert KEY not in configured_secrets()
    monkeypatch.setenv('VLLM_API_KEY', KEY)
    reread_configured_secrets()
    assert KEY in configured_secrets() and redact_text(KEY) == (REDACTED, 1)
    before = configured_secrets()
    reread_configured_secrets()
    assert configured_secrets() is before  # nothing changed: nothing built again
    monkeypatch.delenv('VLLM_API_KEY')
    reread_configured_secrets()
    assert KEY not in configured_secrets() and redact_text(KEY) == (KEY, 0)
