"""Redaction of secrets before prompts, responses and errors are stored."""

from __future__ import annotations

import json

import pytest

from agentrt.services.ledger.redaction import REDACTED, redact

SECRETS = [
    ('OpenAI key: sk-proj-ABCDEFGHIJKLMNOPqrstuvwxyz123456', 'sk-proj-ABCDEF'),
    ('anthropic sk-ant-api03-abcdefghijklmnopqrstuvwxyz', 'api03-abc'),
    ('Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlMTIz', 'eyJhbGci'),
    ('authorization: bearer abc123def456ghi', 'abc123def456'),
    ('Authorization: Basic dXNlcjpwYXNzd29yZA==', 'dXNlcjpw'),
    ('DATABASE_URL=postgresql://app:s3cr3t-pw@db.example.com:5432/prod', 's3cr3t'),
    ('redis://:hunter2hunter2@cache:6379/0', 'hunter2'),
    ('password=hunter22; user=bob', 'hunter22'),
    ('db_password: "correct horse battery"', 'horse'),
    ('{"api_key": "zzz-secret-123"}', 'zzz-secret'),
    ('x-auth-token: tok_abcdef123', 'tok_abcdef'),
    ('client_secret=Qw3rTy', 'Qw3rTy'),
    ('aws AKIAIOSFODNN7EXAMPLE', 'IOSFODNN7'),
    ('github ghp_abcdefghijklmnopqrstuvwxyz0123456789', 'ghp_abc'),
    ('google AIzaSyA1234567890abcdefghijklmnopqrstuv', 'SyA1234'),
    ('stripe sk_live_abcdefghij1234567890', 'sk_live_abc'),
    ('slack xoxb-1234567890-abcdefghij', 'xoxb-123'),
    ('-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----', 'MIIEpAIB'),
]


@pytest.mark.parametrize(('text', 'secret'), SECRETS)
def test_secrets_are_replaced(text: str, secret: str):
    redacted, count = redact(text)
    assert secret not in redacted and REDACTED in redacted and count >= 1


@pytest.mark.parametrize(('text', 'secret'), SECRETS)
def test_redacting_json_text_keeps_it_valid_json(text: str, secret: str):
    encoded = json.dumps({'messages': [{'content': text, 'args': json.dumps({'note': text})}]})
    redacted, _ = redact(encoded)
    decoded = json.loads(redacted)
    assert secret not in json.dumps(decoded) and REDACTED in decoded['messages'][0]['content']


def test_ordinary_text_is_left_alone():
    text = (
        'The bearer instruments are fine; token counting works (tokens: 500, input_tokens: 12). '
        'Passwords must be long. The key insight: secrets stay secret. https://example.com/path?q=1 '
        'See sk-learn docs and the high ghost.'
    )
    assert redact(text) == (text, 0)


def test_already_redacted_text_is_stable():
    once, _ = redact('password=hunter22 and Authorization: Bearer abc123def456ghi')
    assert redact(once) == (once, 0)


def test_text_whose_lower_case_changes_length():
    redacted, count = redact('İstanbul İİ password=hunter22 İ')
    assert redacted == f'İstanbul İİ password={REDACTED} İ' and count == 1
