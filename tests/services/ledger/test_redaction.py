"""Secret redaction: planted secrets of every kind in every position, ordinary text untouched, JSON kept valid,
hostile input handled, and time linear in the input."""

from __future__ import annotations

import json
import random
import re
import string
import time

import pytest
from pydantic_ai import ModelMessagesTypeAdapter, RequestUsage
from pydantic_ai.messages import (
    ModelRequest,
    ModelResponse,
    SystemPromptPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)

from agentrt.services.ledger import _redaction_rules
from agentrt.services.ledger.redaction import (
    REDACTED,
    find_secrets,
    is_secret_name,
    json_may_need_redaction,
    redact,
    redact_text,
    redact_value,
    rule_kinds,
)
from tests.services.ledger.redaction_corpus import FALSE_POSITIVES, KINDS, POSITIONS, Kind


@pytest.fixture(autouse=True)
def clean_database() -> None:
    """Pure functions, no database: overrides the suite's per-test TRUNCATE (about 15 ms a test, x 1000 here)."""


CASES = [pytest.param(kind, position, id=f'{kind.name}-{position}') for kind in KINDS for position in kind.positions]


def _redact_in(kind: Kind, position: str) -> tuple[str, int]:
    """Plant `kind` at `position`, redact it the way a caller would, and return the result as text."""
    where = POSITIONS[position]
    planted = where.build(kind.text)
    if where.redacts_value:
        redacted, count = redact_value(planted)
        as_text = json.dumps(redacted, ensure_ascii=False)
        # The tool return holding JSON text must still be JSON after redaction.
        if isinstance(redacted, dict) and 'content' in redacted:
            json.loads(redacted['content'])
        return as_text, count
    assert isinstance(planted, str)
    redacted_text, count = redact_text(planted)
    if where.is_json_text:
        json.loads(redacted_text)
    return redacted_text, count


def test_corpus_covers_at_least_25_kinds_and_every_position():
    assert len({kind.rule for kind in KINDS}) >= 25 and len(KINDS) >= 25
    assert {p for kind in KINDS for p in kind.positions} == set(POSITIONS)


@pytest.mark.parametrize(('kind', 'position'), CASES)
def test_planted_secret_leaves_no_distinctive_bytes(kind: Kind, position: str):
    redacted, count = _redact_in(kind, position)
    assert count >= 1 and REDACTED in redacted
    for fragment in kind.distinctive():
        assert fragment not in redacted, f'{fragment!r} of {kind.name} survived at {position}: {redacted[:400]!r}'


@pytest.mark.parametrize('kind', KINDS, ids=lambda k: k.name)
def test_each_kind_is_found_by_its_own_rule(kind: Kind):
    data = kind.text.encode()
    rule = next(r for r in _redaction_rules.RULES if r.id == kind.rule)
    assert list(rule.spans(data)), f'rule {kind.rule} does not find {kind.name} on its own'


def test_every_rule_has_a_planted_example():
    assert {rule_id for rule_id, _, _ in rule_kinds()} <= {kind.rule for kind in KINDS}


def test_the_json_of_every_message_does_not_run_rules_for_its_own_field_names():
    # `"part_kind"` holds `art_` and a response's usage `"input_tokens"` holds `token`: as triggers, they ran the
    # agentrt-api-key and xml-secret rules over every message the ledger stores. Each trigger now needs what its
    # rule's pattern cannot match without (the key's hex prefix, an element name's closing `>`).
    messages = [
        ModelRequest(parts=[UserPromptPart('Find me cardiologists in Seattle')]),
        ModelResponse(parts=[TextPart('Here they are')], usage=RequestUsage(input_tokens=12, output_tokens=3)),
    ]
    data = ModelMessagesTypeAdapter.dump_json(messages)
    assert b'"part_kind"' in data and b'"input_tokens"' in data
    enabled = {
        _redaction_rules.RULES[index].id
        for hit in _redaction_rules.TRIGGERS.Match(data) or []
        for index in _redaction_rules.RULES_BY_TRIGGER[hit]
    }
    assert not enabled & {'agentrt-api-key', 'xml-secret'}, enabled


@pytest.mark.parametrize('kind', KINDS, ids=lambda k: k.name)
def test_redacting_twice_changes_nothing_more(kind: Kind):
    once, _ = redact_text(POSITIONS['line_start'].build(kind.text))  # type: ignore[arg-type]
    assert redact_text(once) == (once, 0)


@pytest.mark.parametrize('text', FALSE_POSITIVES, ids=lambda t: t[:40])
def test_ordinary_text_comes_back_byte_identical(text: str):
    redacted, count = redact_text(text)
    assert (redacted, count) == (text, 0), find_secrets(text)
    assert redacted is text  # nothing copied either


def test_ordinary_json_like_values_come_back_equal():
    value = {'results': [{'text': text, 'n': i, 'ok': True, 'none': None} for i, text in enumerate(FALSE_POSITIVES)]}
    value['usage'] = {'input_tokens': 512, 'output_tokens': 40, 'max_tokens': 1024, 'token_count': 3}
    value['tuple'] = ('a', 1, 2.5)
    redacted, count = redact_value(value)
    assert (redacted, count) == (value, 0)
    assert isinstance(redacted['tuple'], tuple)


def test_false_positive_corpus_as_json_text_is_unchanged():
    text = json.dumps({'messages': list(FALSE_POSITIVES)})
    assert redact_text(text) == (text, 0)


# --- redact_value: keys that name secrets ------------------------------------------------------------------------


def test_values_of_secret_named_keys_are_replaced_whole():
    value = {
        'username': 'alice',
        'password': 'plain words nobody would flag',
        'api_key': 123456789,
        'client_secret': b'raw-bytes',
        'Authorization': 'Bearer abcdef',
        'headers': {'X-Api-Key': 'abc', 'Content-Type': 'application/json'},
        'tokens': ['not', 'secret'],
        'secrets': {'token': 'x1'},
        'secret': ['one', 'two', 3, None, True],
        'credentials': {'db': 'opensesame-xyz', 'port': 5432, 'nested': [{'user': 'bob'}]},
        'token': None,
        'passwd': '',
        'has_password': False,
        'max_tokens': 512,
        'primary_key': 'id',
    }
    redacted, count = redact_value(value)
    assert redacted == {
        'username': 'alice',
        'password': REDACTED,
        'api_key': REDACTED,
        'client_secret': REDACTED,
        'Authorization': f'Bearer {REDACTED}',
        'headers': {'X-Api-Key': REDACTED, 'Content-Type': 'application/json'},
        'tokens': ['not', 'secret'],
        'secrets': {'token': REDACTED},
        'secret': [REDACTED, REDACTED, REDACTED, None, True],
        # A dict under a secret-named key: its values are the secret's too (it was stored whole; QA).
        'credentials': {'db': REDACTED, 'port': REDACTED, 'nested': [{'user': REDACTED}]},
        'token': None,
        'passwd': '',
        'has_password': False,
        'max_tokens': 512,
        'primary_key': 'id',
    }
    assert count == 12


@pytest.mark.parametrize(
    'name',
    ['password', 'PASSWORD', 'db_password', 'DB_PASSWORD', 'passwd', 'pwd', 'MYSQL_PWD', 'passphrase', 'secret',
     'client_secret', 'clientSecret', 'token', 'access_token', 'accessToken', 'x-auth-token', 'GITHUB_TOKEN',
     'api_key', 'apiKey', 'x-api-key', 'API-KEY', 'secret_key', 'private_key', 'AccountKey', 'authorization',
     'Proxy-Authorization', 'cookie', 'set-cookie', 'credentials', 'password_confirmation', 'new_password', 'pass',
     'db.pass', 'signing_key', 'SharedAccessKey', 'sig',
     'password10', 'password_10', 'token99', 'api_key_2'],  # numbered past 9 were not (QA)
)  # fmt: skip
def test_secret_names(name: str):
    assert is_secret_name(name)
    # The text rules agree with the key rule.
    assert redact_text(f'{name}=Abc123xyz789')[0] == f'{name}={REDACTED}' or name in ('sig',)


@pytest.mark.parametrize(
    'name',
    ['max_tokens', 'tokens', 'token_count', 'token_type', 'input_tokens', 'primary_key', 'sort_key', 'key',
     'password_policy', 'private_key_id', 'keyboard', 'bypass', 'compass', 'passport', 'tokenizer', 'secretary',
     'api_key_env', 'author', 'signature_count', 'token12345', 'password10x'],
)  # fmt: skip
def test_names_that_are_not_secret(name: str):
    assert not is_secret_name(name)


def test_keys_that_are_secrets_are_redacted_and_stay_distinct():
    a, b = 'ghp_' + 'a1B2' * 9, 'ghp_' + 'c3D4' * 9
    redacted, count = redact_value({a: 1, b: 2, 'plain': 3})
    assert redacted == {REDACTED: 1, f'{REDACTED} (2)': 2, 'plain': 3} and count == 2


def test_deep_nesting_and_cycles_do_not_break_the_walk():
    deep: list[object] = ['password=hunter22']
    for _ in range(50_000):
        deep = [deep]
    redacted, count = redact_value(deep)
    assert count == 1
    cyclic: dict[str, object] = {'a': 'token=abc123def'}
    cyclic['self'] = cyclic
    redacted, count = redact_value(cyclic)
    assert redacted == {'a': f'token={REDACTED}', 'self': REDACTED} and count == 2


def test_scalars_and_unknown_objects_pass_through():
    marker = object()
    assert redact_value(5) == (5, 0)
    assert redact_value(None) == (None, 0)
    assert redact_value(marker) == (marker, 0)
    assert redact_value('password=hunter22') == (f'password={REDACTED}', 1)


# --- JSON text stays JSON ----------------------------------------------------------------------------------------


def test_random_json_documents_with_planted_secrets_stay_valid_json():
    rng = random.Random(11)
    pieces = [k.text for k in KINDS] + ['"', '\\', '\\n', '\n', '\t', 'é', '🙂', '\u2028', 'password', ': ', '=', '@']
    for _ in range(300):
        doc = {
            rng.choice(['note', 'password', 'args', 'x']): ''.join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
            for _ in range(3)
        }
        for text in (json.dumps(doc), json.dumps({'outer': json.dumps(doc)}), json.dumps(doc, ensure_ascii=False)):
            redacted, _ = redact_text(text)
            json.loads(redacted)


@pytest.mark.parametrize('kind', KINDS, ids=lambda k: k.name)
def test_json_text_escaped_twice_stays_valid(kind: Kind):
    text = json.dumps({'messages': [{'content': kind.text, 'args': json.dumps({'note': kind.text})}]})
    redacted, count = redact_text(text)
    decoded = json.loads(redacted)
    assert count >= 1 and REDACTED in decoded['messages'][0]['content']
    json.loads(decoded['messages'][0]['args'])


@pytest.mark.parametrize('kind', KINDS, ids=lambda k: k.name)
def test_secrets_in_text_escaped_twice_or_in_a_python_repr_are_found(kind: Kind):
    """What an error message holds: `str(ModelHTTPError)` is a Python repr of the provider's body, whose strings may
    be JSON text themselves; a newline before or after a secret is then escaped twice."""
    for position in kind.positions:
        planted = POSITIONS[position].build(kind.text)
        as_json = planted if isinstance(planted, str) else json.dumps(planted)
        for text in (json.dumps(json.dumps(as_json)), repr({'body': planted}), repr({'error': {'details': as_json}})):
            redacted, _ = redact_text(text)
            assert not any(f in redacted for f in kind.distinctive()), f'{kind.name} at {position}: {redacted[:300]!r}'


@pytest.mark.parametrize('kind', KINDS, ids=lambda k: k.name)
def test_json_of_a_value_holding_a_secret_is_never_passed_as_clean(kind: Kind):
    """The ledger stores a message's JSON as it is when `json_may_need_redaction()` says so: it must see every kind
    at every position, whichever way the JSON was written."""
    for position in kind.positions:
        value = {'parts': [{'part_kind': 'tool-return', 'content': POSITIONS[position].build(kind.text)}]}
        for text in (json.dumps(value), json.dumps(value, separators=(',', ':'), ensure_ascii=False)):
            assert json_may_need_redaction(text), f'{kind.name} at {position}'


def test_json_of_ordinary_values_is_passed_as_clean():
    # Text quoting a secret-named key (`"secret": "..."` in a code sample) is walked, as a model's
    # JSON arguments are, so their values go whole (QA); it comes back as it was. The rest is passed on the fast path.
    keyed = [text for text in FALSE_POSITIVES if any(map(is_secret_name, re.findall(r'"([^"\\]*)"\s*:', text)))]
    assert 1 <= len(keyed) <= 3, keyed
    for text in keyed:
        assert redact_value({'content': text}) == ({'content': text}, 0)
    ordinary = [text for text in FALSE_POSITIVES if text not in keyed]
    value = {'parts': [{'content': text, 'input_tokens': 3, 'max_tokens': 9} for text in ordinary]}
    assert not json_may_need_redaction(json.dumps(value, separators=(',', ':'), ensure_ascii=False))
    assert not json_may_need_redaction(json.dumps({'primary_key': 1, 'bypass': 'x', 'design': 'y'}))
    for secret_key in ({'password': 1}, {'x': [{'Authorization': None}]}, {'pass': 1}, {'token\n': 'x'}):
        assert json_may_need_redaction(json.dumps(secret_key)), secret_key


# --- the cases of the previous engine (tests/services/test_ledger_redaction.py) ----------------------------------

LEGACY_SECRETS = [
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


@pytest.mark.parametrize(('text', 'secret'), LEGACY_SECRETS)
def test_legacy_secrets_are_replaced(text: str, secret: str):
    redacted, count = redact(text)
    assert secret not in redacted and REDACTED in redacted and count >= 1


@pytest.mark.parametrize(('text', 'secret'), LEGACY_SECRETS)
def test_legacy_redacting_json_text_keeps_it_valid_json(text: str, secret: str):
    encoded = json.dumps({'messages': [{'content': text, 'args': json.dumps({'note': text})}]})
    redacted, _ = redact(encoded)
    decoded = json.loads(redacted)
    assert secret not in json.dumps(decoded) and REDACTED in decoded['messages'][0]['content']


def test_legacy_ordinary_text_is_left_alone():
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


# --- what is kept around a secret ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('text', 'expected'),
    [
        ('postgresql://u:p@ss/w@host/db', f'postgresql://u:{REDACTED}@host/db'),
        ('Authorization: Basic dXNlcjpwYXNzd29yZA==', f'Authorization: Basic {REDACTED}'),
        ('"token": "Bearer abc123def"', f'"token": "Bearer {REDACTED}"'),
        ('?password=abc123&next=/home', f'?password={REDACTED}&next=/home'),
        ('Server=db;Password=p@ss;w0rd;Host=x', f'Server=db;Password={REDACTED};Host=x'),
        ('password=Tr0ub4dor&3 ok', f'password={REDACTED} ok'),
        ('{token: abc123}', f'{{token: {REDACTED}}}'),
        ('f(password=hunter2)', f'f(password={REDACTED})'),
        ('http://localhost:8000/@vite/client', 'http://localhost:8000/@vite/client'),
        ('unsigned eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0. end', f'unsigned {REDACTED} end'),
        (
            '-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17\n\nMIIB\n'
            '-----END RSA PRIVATE KEY-----',
            f'-----BEGIN RSA PRIVATE KEY-----\n{REDACTED}\n-----END RSA PRIVATE KEY-----',
        ),
        ('cut off: -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg', f'cut off: -----BEGIN PRIVATE KEY-----\n{REDACTED}'),
    ],
)
def test_labels_stay_and_only_the_secret_goes(text: str, expected: str):
    assert redact_text(text)[0] == expected


@pytest.mark.parametrize(
    ('text', 'secret'),
    [
        ('password = "hunter2"', 'hunter2'),
        ('if password == "Tr0ub4dor&3":', 'Tr0ub4dor'),
        ('[db]\npassword = s3cret!x', 's3cret'),
        ('PASSWORD=letmein', 'letmein'),
        ('GET /cb?token=abcdefgh&x=1', 'abcdefgh'),
        ('db:\n  password: letmein', 'letmein'),
        ('Password: LetMeIn', 'LetMeIn'),
        ('secret = "HUNTER"', 'HUNTER'),
        ('password: "$ecretPass"', 'ecretPass'),
        ('my password is hunter2, ok', 'hunter2'),
        ('mysql --password hunter2pw', 'hunter2pw'),
        ("requests.get(url, auth=('bob', 'x'), headers={'X-Api-Key': 'k3y-abc'})", 'k3y-abc'),
        ('<password>opensesame</password>', 'opensesame'),
        ('curl -u admin:opensesame https://x', 'opensesame'),
    ],
)
def test_secret_values_in_code_and_config(text: str, secret: str):
    redacted, count = redact_text(text)
    assert secret not in redacted and count >= 1, redacted


def test_find_secrets_reports_character_offsets_and_rules():
    text = 'é🙂 key ghp_' + 'a1B2' * 9 + ' and password=hunter22'
    spans = find_secrets(text)
    assert [text[s.start : s.end] for s in spans] == ['ghp_' + 'a1B2' * 9, 'hunter22']
    assert [s.rule for s in spans] == ['github-token', 'secret-assignment']


# --- hostile input ------------------------------------------------------------------------------------------------


def test_nul_and_lone_surrogates_are_kept_around_a_redacted_secret():
    text = '\x00\ud800 password=hunter22 \udfff\x00 ghp_' + 'a1B2' * 9 + '\ud800'
    redacted, count = redact_text(text)
    assert redacted == f'\x00\ud800 password={REDACTED} \udfff\x00 {REDACTED}\ud800' and count == 2


def test_a_surrogate_inside_a_secret_goes_with_it():
    redacted, count = redact_text('https://u:pa\ud800ss@host/')
    assert redacted == f'https://u:{REDACTED}@host/' and count == 1


def test_five_megabytes_with_a_secret_at_the_end():
    text = 'lorem ipsum dolor sit amet, ' * 180_000 + '\nghp_' + 'a1B2' * 9
    assert len(text) > 5_000_000
    redacted, count = redact_text(text)
    assert count == 1 and redacted.endswith(f'\n{REDACTED}')


@pytest.mark.parametrize(
    'unit',
    ['sk-', '-----BEGIN ', 'eyJ', '://', 'a=', 'password=', 'password: ', '"password": "', '\\n', '\\', '"', '@',
     'Bearer ', 'xox', 'AKIA', '12345678:', '\x00', '\ud800', 'İ'],
)  # fmt: skip
def test_text_made_only_of_triggers_is_handled(unit: str):
    text = unit * (200_000 // len(unit))
    redacted, count = redact_text(text)
    assert isinstance(redacted, str) and count <= 1
    assert len(redacted) <= len(text) + len(REDACTED)


def test_non_str_input_is_a_clear_error():
    with pytest.raises(TypeError, match='takes a str, not bytes'):
        redact_text(b'password=x')  # type: ignore[arg-type]


# --- linear time --------------------------------------------------------------------------------------------------

_HOSTILE = {
    'name-colon': 'password: ',
    'dense-secrets': ''.join(k.text + '\n' for k in KINDS[:20]),
    'url-no-at': 'a://a:',
    'closers-and-dots': 'password=a' + ').' * 2000,
    'aws-context': 'aws wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY ',
    'base64-soup': ''.join(random.Random(3).choices(string.ascii_letters + string.digits + '+/', k=4096)),
    'pem-quoted-lines': '-----BEGIN RSA PRIVATE KEY-----\n' + '"MIIEab\\n" +\n' * 40 + '-----END RSA PRIVATE KEY---\n',
    'pem-no-end': '-----BEGIN RSA PRIVATE KEY-----\n> ab"cd\n',
}


@pytest.mark.parametrize('unit', _HOSTILE.values(), ids=_HOSTILE.keys())
def test_time_grows_linearly_with_input(unit: str):
    """8x the input must cost well under 64x (quadratic) the time; linear is ~8x. Best of 3 against noise, in CPU
    time of this thread (`redact_text` runs in the caller's thread), which other processes on a busy machine (the
    other test worker, say) do not inflate as they do the clock."""

    def best(size: int) -> float:
        text = (unit * (size // len(unit) + 1))[:size]
        times = []
        for _ in range(3):
            started = time.thread_time()
            redact_text(text)
            times.append(time.thread_time() - started)
        return min(times)

    small, large = best(32_000), best(256_000)
    assert large < 24 * max(small, 1e-4), f'{small=:.4f}s {large=:.4f}s'


# --- pydantic-ai messages, the way the ledger will redact them ---------------------------------------------------


def test_pydantic_ai_messages_dumped_redacted_and_validated_back():
    pem = next(k for k in KINDS if k.name == 'pem-encrypted-key')
    ghp = next(k for k in KINDS if k.name == 'github-classic-token')
    messages = [
        ModelRequest(
            parts=[
                SystemPromptPart('You are helpful. Deploy key:\nAKIAZ7Q3W9E5R1T8Y4U2'),
                UserPromptPart(f'my key is below\n{pem.text}\nthanks'),
            ]
        ),
        ModelResponse(
            parts=[
                TextPart(f'Use {ghp.text} carefully.'),
                ToolCallPart('login', {'user': 'bob', 'password': 'plain words', 'max_tokens': 5}, tool_call_id='c1'),
            ]
        ),
        ModelRequest(parts=[ToolReturnPart('login', {'ok': True, 'session': {'token': 'abc'}}, tool_call_id='c1')]),
    ]
    dumped = ModelMessagesTypeAdapter.dump_python(messages, mode='json')
    redacted, count = redact_value(dumped)
    restored = ModelMessagesTypeAdapter.validate_python(redacted)  # the structure is intact
    text = json.dumps(redacted)
    assert count == 5 and len(restored) == 3
    for fragment in (*pem.distinctive(), *ghp.distinctive(), 'AKIAZ7Q3W9E5R1T8Y4U2', 'plain words', '"abc"'):
        assert fragment not in text
    call = restored[1].parts[1]
    assert isinstance(call, ToolCallPart) and call.args == {'user': 'bob', 'password': REDACTED, 'max_tokens': 5}


_KEY = 'sk-proj-Qz7xK2mN9pL4vB8cR1tY6wE3aS5dF0gH2jK4lZ6xC8'
# A model's tool-call arguments as JSON text, each with an escape the rules, reading the text as written, did not see
# through (QA): what the tool receives, decoded, is the secret.
ESCAPED_ARGUMENTS = [
    ('unicode escapes inside the key', '{"query": "' + _KEY.replace('-', '\\u002d') + '"}', 'Qz7xK2mN9pL4'),
    ('a unicode escape for a digit', '{"query": "key ' + _KEY.replace('7', '\\u0037', 1) + '"}', 'K2mN9pL4vB8c'),
    ('a form feed before the key', '{"query": "a\\f' + _KEY + '"}', 'K2mN9pL4vB8c'),
    ('a backspace before the key', '{"query": "a\\b' + _KEY + '"}', 'K2mN9pL4vB8c'),
    (
        'escaped slashes in an AWS secret',
        '{"query": "aws_secret_access_key=wJalrXUtnFEMI\\/K7MDENG\\/bPxRfiCYSLASHKEY"}',
        'bPxRfiCYSLASHKEY',
    ),
    ('an escape inside a password', '{"query": "password=hunt\\u0065r2PWDESC9"}', 'r2PWDESC9'),
    # A tab is the space of `name: value` and of `Bearer token`: escaped, it glued itself to the value (QA).
    ('a tab after the name', '{"query": "password:\\thunter2TABSEP"}', 'hunter2TABSEP'),
    ('a tab after Bearer', '{"query": "Authorization: Bearer\\tabcdefghijklmnop1234"}', 'ghijklmnop1234'),
    ('a tab before a quoted value', '{"query": "password:\\t\\"quoted-secret1\\""}', 'quoted-secret1'),
    ('a tab before a symbol', '{"query": "password=\\t$ecret123SYM"}', 'ecret123SYM'),
    ('a tab before a space', '{"query": "password:\\t hunter2SPACED"}', 'hunter2SPACED'),
]


@pytest.mark.parametrize(
    ('text', 'tail'), [case[1:] for case in ESCAPED_ARGUMENTS], ids=[c[0] for c in ESCAPED_ARGUMENTS]
)
def test_a_secret_in_json_arguments_behind_an_escape_is_redacted(text: str, tail: str) -> None:
    assert tail in json.loads(text)['query']  # what the tool gets
    text = ' ' + text  # JSON may start with whitespace (QA)
    message = {'parts': [{'part_kind': 'tool-call', 'tool_name': 'search', 'args': text}]}
    for dumped in (json.dumps(message), json.dumps(message, ensure_ascii=False, separators=(',', ':'))):
        assert json_may_need_redaction(dumped), dumped
    redacted, count = redact_value(message)
    args = redacted['parts'][0]['args']
    assert count >= 1 and tail not in args and tail not in json.dumps(json.loads(args)), args
    assert REDACTED in json.loads(args)['query']  # still the arguments' JSON, the secret's place marked


def test_secret_named_arguments_whose_values_are_no_string_are_redacted() -> None:
    # A model's JSON arguments: the rules' `"password": "..."` did not cover a list or an object under the name, and
    # pydantic's retry prompt quoted an item of the list (`loc` `["password", 0]`) whole (QA).
    text = '{"password": ["hunter2-correct-horse-battery", 3], "secret": {"db": "opensesame-xyz-123"}, "q": "ok"}'
    for written in (text, '\n' + text, '  ' + text):  # JSON may start with whitespace: it was stored whole (QA)
        message = {'parts': [{'part_kind': 'tool-call', 'args': written}]}
        assert json_may_need_redaction(json.dumps(message))
        redacted, _ = redact_value(message)
        args = json.loads(redacted['parts'][0]['args'])
        assert args == {'password': [REDACTED, REDACTED], 'secret': {'db': REDACTED}, 'q': 'ok'}, written
    # A control character after the name hid it (a model's `"password\u0000"`; QA).
    assert redact_value({'password\x00': 'hunter2', 'api_key\t': 'x1'})[0] == {
        'password\x00': REDACTED,
        'api_key\t': REDACTED,
    }
    retry = {'type': 'string_type', 'loc': ['password', 0], 'msg': 'Input should be a valid string', 'input': 'hunter2'}
    assert redact_value(retry)[0]['input'] == REDACTED


@pytest.mark.parametrize(
    ('text', 'expected'),
    [
        ('{"password": ["hunter2-correct-horse", 3', '{"password": "' + REDACTED + '"'),
        # escapes in JSON that does not parse: the walk's decoding never ran, the rules read them as written (QA)
        ('{"q": "password:\\thunter2SECRET", "x', '{"q": "password:\\t' + REDACTED + '", "x'),
        ('{"q": "x", "password\\u0000": "hunter2SECRET", "x', '{"q": "x", "password\\u0000": "' + REDACTED + '", "x'),
        ('{"pass\\u0077ord": "hunter2SECRET", "x', '{"pass\\u0077ord": "' + REDACTED + '", "x'),
        ('{"api\\u005fkey": ["hunter2SECRET", "x', '{"api\\u005fkey": "' + REDACTED + '"'),
        (
            '{"password": 12345, "n": null, "secret": null, "x": "y',
            '{"password": "' + REDACTED + '", "n": null, "secret": null, "x": "y',
        ),
        ('{"password": "hunter2SECRET', '{"password": "' + REDACTED + '"'),
        (
            '{"a": "é\ud800", "pässword": 1, "password": [1], "b": "ü"',
            '{"a": "é\ud800", "pässword": 1, "password": "' + REDACTED + '", "b": "ü"',
        ),
        (
            '{"q": "ok", "password": ["hunter2-x"], "x": "shown", "token": {"a": "s3cr3t-value", "b": [1, "]"',
            '{"q": "ok", "password": "' + REDACTED + '", "x": "shown", "token": "' + REDACTED + '"',
        ),
        ('{"secret": {"db": "open\\"sesame]}"}, "after": "shown"', '{"secret": "' + REDACTED + '", "after": "shown"'),
        (
            '\n[{"api_key" : [{"b": "c"}], "passwd": "plain-one"',
            '\n[{"api_key" : "' + REDACTED + '", "passwd": "' + REDACTED + '"',
        ),
    ],
)
def test_containers_under_secret_names_in_json_that_does_not_parse_are_redacted(text: str, expected: str) -> None:
    # A model's arguments cut off (its output limit reached inside them) do not parse, so there is no tree to walk,
    # and the rules' `"password": "..."` does not cover a list or an object: `["hunter2", ...` was stored whole (QA).
    message = {'parts': [{'part_kind': 'tool-call', 'tool_name': 'login', 'args': text}]}
    assert json_may_need_redaction(json.dumps(message))
    redacted, count = redact_value(message)
    assert redacted['parts'][0]['args'] == expected
    assert count >= 1


def test_a_backslash_alone_does_not_make_a_message_walked() -> None:
    # Any backslash (a Windows path, a regular expression) walked a message: 30 times the CPU of the scan (QA).
    for text in ('C:\\Users\\me\\notes.txt', 'C:\\users\\x', '^\\d+\\s*$'):
        assert not json_may_need_redaction(json.dumps({'parts': [{'content': text, 'args': json.dumps({'p': text})}]}))


def test_json_arguments_with_escapes_and_no_secret_come_back_as_they_were() -> None:
    text = '{"query": "caf\\u00e9 \\/ line\\nbreak", "path": "C:\\\\users"}'
    message = {'parts': [{'args': text}]}
    assert redact_value(message) == (message, 0)


def test_the_input_a_validation_error_quotes_for_a_secret_named_field_is_redacted() -> None:
    # pydantic's error of an extra argument, in the retry prompt pydantic-ai sends back: the argument's value was
    # redacted in the tool call and stored whole in the retry beside it (QA).
    errors = [
        {'type': 'extra_forbidden', 'loc': ['api_key'], 'msg': 'Extra inputs are not permitted', 'input': 'rv12345zz'},
        {'type': 'string_type', 'loc': ['query'], 'msg': 'Input should be a valid string', 'input': 42},
    ]
    message = {'parts': [{'part_kind': 'retry-prompt', 'content': errors}]}
    assert json_may_need_redaction(json.dumps(message))
    redacted, count = redact_value(message)
    first, second = redacted['parts'][0]['content']
    assert count == 1 and first['input'] == REDACTED and first['loc'] == ['api_key'] and second['input'] == 42


def test_json_nested_past_pythons_parser_stays_json_once_redacted() -> None:
    # Read as JSON that does not parse (json.loads raises RecursionError), a container under a secret name was
    # replaced by a bare [REDACTED]: valid JSON came out invalid (QA).
    text = '{"password": ' + '[' * 5000 + '"hunter2"' + ']' * 5000 + ', "n": "\\u0041"}'
    redacted, count = redact_value({'args': text})
    assert count >= 1 and 'hunter2' not in redacted['args']
    assert json.loads(redacted['args']) == {'password': REDACTED, 'n': 'A'}


@pytest.mark.parametrize(
    'value',
    ['\\\\Xq7LeakFive9', '\\nXq7LeakSix9', 'a\\nXq7LeakSeven', 'ab\\\\Xq7LeakEight', 'a\\"Xq7LeakNine', '\\rXq7Leak10'],
)
def test_a_secret_named_arguments_value_that_starts_with_an_escape_is_redacted(value: str) -> None:
    # A model's JSON arguments with a generated password starting with `\\`, `\"` or `\n`: the rules read no value
    # from an escape, and the check never walked the arguments, so it was stored in clear (QA).
    text = '{"query": "x", "password": "' + value + '"}'
    assert 'Xq7Leak' in json.loads(text)['password']
    for args in (text, text[:-2]):  # whole, and cut off at the model's output limit
        message = {'parts': [{'part_kind': 'tool-call', 'tool_name': 'login', 'args': args}]}
        for dumped in (json.dumps(message), json.dumps(message, ensure_ascii=False, separators=(',', ':'))):
            assert json_may_need_redaction(dumped), dumped
        redacted, count = redact_value(message)
        assert count >= 1 and 'Xq7Leak' not in json.dumps(redacted), redacted


@pytest.mark.parametrize(
    'value', ['p\\Xq7LeakDeep1', '\nXq7LeakDeep2', 'Xq"7LeakDeep3', 'Xq\r7LeakDeep4', 'Xq7LeakDeep5']
)
def test_a_secret_named_value_of_json_text_in_an_argument_of_json_text_is_redacted(value: str) -> None:
    # An `http_post(url, body)` tool whose body is JSON text: its password, with an escape in it, was stored in clear,
    # for the check looked one level of JSON-in-string deep (QA).
    body = json.dumps({'user': 'bob', 'password': value})
    args = json.dumps({'url': 'https://api.example.com/login', 'body': body})
    message = {'parts': [{'part_kind': 'tool-call', 'tool_name': 'http_post', 'args': args}]}
    for dumped in (json.dumps(message), json.dumps(message, ensure_ascii=False, separators=(',', ':'))):
        assert json_may_need_redaction(dumped), dumped
    redacted, count = redact_value(message)
    assert count >= 1 and 'Xq' not in json.dumps(redacted), redacted
    assert json.loads(json.loads(redacted['parts'][0]['args'])['body']) == {'user': 'bob', 'password': REDACTED}


@pytest.mark.parametrize(
    'value', [';lFCcFZjI+jjc@bLT#8t', ' Xq7Secr3tAbZk9', '/Xq7Secr3tAbZk9', 'HUNTER_TWO_XQ7', '${XQ7SECRET}']
)
@pytest.mark.parametrize('depth', [1, 2])
def test_a_secret_named_arguments_value_the_rules_take_for_no_secret_goes_whole(value: str, depth: int) -> None:
    # In free text, a value starting with punctuation or looking like a placeholder is taken for none; a model's JSON
    # arguments holding it as a password's value were stored in clear (QA: 10% of random passwords with symbols).
    args = json.dumps({'username': 'bob', 'password': value})
    if depth == 2:
        args = json.dumps({'url': 'https://api.example.com/login', 'body': args})
    message = {'parts': [{'part_kind': 'tool-call', 'tool_name': 'login', 'args': args}]}
    for dumped in (json.dumps(message), json.dumps(message, ensure_ascii=False, separators=(',', ':'))):
        assert json_may_need_redaction(dumped), dumped
    redacted, count = redact_value(message)
    assert count >= 1 and value.strip() not in json.dumps(redacted), redacted


@pytest.mark.parametrize(
    ('args', 'expected'),
    [
        ('{"rows":[{"id":1,"password":null},[2,3]]}', '{"rows":[{"id":1,"password":null},[2,3]]}'),
        ('{"a":[{"password":false},[[1]]],"b":2}', '{"a":[{"password":false},[[1]]],"b":2}'),
        ('{"x": "{\\"password\\": 2.5}"}', '{"x": "{\\"password\\": \\"[REDACTED]\\"}"}'),
    ],
)
def test_json_arguments_stay_valid_json_when_a_secret_named_value_is_no_secret_or_a_number(
    args: str, expected: str
) -> None:
    # The rules over the JSON text as written took `null},[2,3]` for a password and cut the text there (invalid JSON,
    # `[2,3]` lost), and left `{\"password\": [REDACTED]}` unquoted in the inner JSON (QA).
    redacted, _ = redact_value({'args': args})
    assert redacted['args'] == expected
    json.loads(json.loads(redacted['args']).get('x', '{}'))


def test_json_text_in_cut_off_arguments_is_walked_as_in_whole_ones() -> None:
    # Arguments cut off at the model's output limit, holding JSON text whose password has an escape: the rules read the
    # inner value up to its escape and kept the rest (`[REDACTED]\\\\Secr3t...`), where whole arguments go whole (QA).
    inner = json.dumps({'password': 'Xq7\\Secr3tAbZk9', 'note': 'ok'})
    full = json.dumps({'payload': inner, 'n': 2})
    start = full.index('Secr3t') + len('Secr3tAbZk9') + 3  # cut anywhere after the value's closing quote
    for cut in range(start, len(full)):
        message = {'parts': [{'part_kind': 'tool-call', 'tool_name': 'post', 'args': full[:cut]}]}
        assert json_may_need_redaction(json.dumps(message)), cut
        redacted, count = redact_value(message)
        assert count >= 1 and 'Secr3t' not in json.dumps(redacted), (cut, redacted)


def test_a_secret_a_rule_reads_across_two_strings_of_json_arguments_is_still_redacted() -> None:
    # The walk reads each string alone; the AWS rule needs its label, which sits in the string before the key.
    key = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLE12'
    args = json.dumps({'label': 'aws secret', 'value': key, 'password': None})
    redacted, count = redact_value({'args': args})
    assert count == 1 and key not in redacted['args'] and json.loads(redacted['args'])['password'] is None


def test_broken_escapes_repeated_in_a_short_text_do_not_hit_the_recursion_limit() -> None:
    # `[\/\q\"` a thousand times (7 KB): read as cut-off JSON, each string with a broken escape was read raw and again,
    # level after level, until a RecursionError dropped the request's contents and its conversation's later ones (QA).
    text = '[\\/\\q\\"' * 1000
    assert redact_value(text) == (text, 0)
    assert redact_value({'content': text}) == ({'content': text}, 0)


_AWS_KEY = 'Zx8qLm2Pn4Rt6Vw9Ya1Bc3De5Fg7Hj0Kk2Mn4Pq6'


@pytest.mark.parametrize(
    'inner',
    [
        {'env': [{'name': 'AWS_SECRET_ACCESS_KEY', 'value': _AWS_KEY}], 'api_token': 'abc123'},
        {'pair': ['AWS_SECRET_ACCESS_KEY', _AWS_KEY], 'password': 'hunter2'},
        {'label': 'aws secret', 'value': _AWS_KEY, 'password': 12345},
    ],
)
@pytest.mark.parametrize('depth', [0, 1, 2])
def test_an_aws_key_labelled_in_another_string_goes_beside_a_secret_named_value(inner: dict, depth: int) -> None:
    # The walk replaced the secret-named value and read each string alone: the AWS rule, which needs the label in the
    # string before the key, no longer saw it, and the key was stored in clear (QA).
    text = json.dumps(inner)
    for _ in range(depth):
        text = json.dumps({'manifest': text})
    redacted, _ = redact_value({'args': text})
    assert _AWS_KEY not in json.dumps(redacted), redacted
    json.loads(redacted['args'])


def test_a_replacement_across_json_structure_is_dropped_and_those_inside_strings_kept() -> None:
    text = '{"rows":[{"id":1,"password":null},[2,3]],"label":"aws secret","value":"' + _AWS_KEY + '"}'
    redacted, count = redact_value({'args': text})
    assert count == 1 and json.loads(redacted['args'])['rows'] == [{'id': 1, 'password': None}, [2, 3]]
    assert json.loads(redacted['args'])['value'] == REDACTED


@pytest.mark.parametrize('depth', [1, 2])
def test_a_replacement_across_json_structure_one_level_down_is_dropped_too(depth: int) -> None:
    # The inner level dropped `"password":null},[2,3]` read as a password's value; the level above, reading the inner
    # JSON text as one of its strings, kept it, and the stored arguments lost `[2,3]` and parsed no more (QA).
    inner = '{"rows":[{"id":1,"password":null},[2,3]],"label":"aws secret","value":"' + _AWS_KEY + '"}'
    text = inner
    for _ in range(depth):
        text = json.dumps({'m': text})
    redacted, count = redact_value({'args': text})
    text = redacted['args']
    for _ in range(depth):
        text = json.loads(text)['m']
    assert _AWS_KEY not in json.dumps(redacted) and count == 1
    assert json.loads(text)['rows'] == [{'id': 1, 'password': None}, [2, 3]]


# --- private keys whatever their lines carry --------------------------------------------------------------------

_PEM_KINDS = [kind for kind in KINDS if kind.rule in ('private-key', 'ssh2-private-key')]


def _key_forms(key: str) -> dict[str, str]:
    """A key as it reaches a chat: quoted in an e-mail, in string literals, commented, numbered, a JSON list of its
    lines, its lines joined by U+2028, CR or spaces, a NUL or U+FFFD after its armour line."""
    lines = key.split('\n')
    return {
        'bare': key,
        'quoted': '> ' + '\n> '.join(lines),
        'python-strings': '\n'.join(f'    "{line}\\n"' for line in lines),
        'js-strings': '\n'.join(f"'{line}\\n' +" for line in lines),
        'commented': '# ' + '\n# '.join(lines),
        'numbered': '\n'.join(f'{n:3} | {line}' for n, line in enumerate(lines, 1)),
        'json-list': json.dumps(lines),
        'line-separators': '\u2028'.join(lines),
        'cr': '\r'.join(lines),
        'spaces': ' '.join(lines),
        'nul-after-armour': lines[0] + '\x00\n' + '\n'.join(lines[1:]),
        'fffd-after-armour': lines[0] + '\ufffd\n' + '\n'.join(lines[1:]),
    }


_KEY_PLACES = {
    'line-start': lambda t: f'{t}\nthanks',
    'alone-on-a-line': lambda t: f'Here it is:\n{t}\nLet me know.',
    'inside-json': lambda t: json.dumps({'note': t, 'n': 1}),
    'inside-a-huge-text': lambda t: 'lorem ipsum dolor sit amet\n' * 40_000 + t + '\nend',
    'after-nul': lambda t: f'x\x00{t}',
    'after-fffd': lambda t: f'x\ufffd{t}',
    'after-line-separator': lambda t: f'x\u2028{t}',
}


@pytest.mark.parametrize('kind', _PEM_KINDS, ids=lambda k: k.name)
@pytest.mark.parametrize('form', list(_key_forms('a\nb')))
@pytest.mark.parametrize('place', list(_KEY_PLACES))
def test_a_private_keys_body_goes_up_to_its_end_line_whatever_its_lines_carry(kind: Kind, form: str, place: str):
    planted = _KEY_PLACES[place](_key_forms(kind.text)[form])
    redacted, count = redact_text(planted)
    assert count >= 1 and not [f for f in kind.distinctive() if f in redacted], redacted[-800:]
    if place == 'inside-json' or (form == 'json-list' and place != 'inside-a-huge-text'):
        json.loads(redacted if place == 'inside-json' else redacted[redacted.index('[') : redacted.rindex(']') + 1])
    assert redact_text(redacted) == (redacted, 0)
    # The armour lines stay, and so does the line break after the BEGIN line.
    assert 'PRIVATE KEY' in redacted.split(REDACTED)[0] and 'END' in redacted.split(REDACTED)[-1]


@pytest.mark.parametrize('kind', _PEM_KINDS, ids=lambda k: k.name)
def test_a_private_key_as_a_list_of_its_lines_is_redacted(kind: Kind):
    lines = kind.text.split('\n')
    for value in (lines, lines[:-1], {'key': lines}, {'key': json.dumps(lines[:-1])}, (*lines, 'after')):
        assert json_may_need_redaction(json.dumps(value))
        redacted, count = redact_value(value)
        as_text = json.dumps(redacted)
        assert count >= 1 and not [f for f in kind.distinctive() if f in as_text], as_text
    redacted, _ = redact_value([*lines, 'after the key'])
    assert redacted[0] == lines[0] and redacted[-2:] == [lines[-1], 'after the key']


@pytest.mark.parametrize(
    ('text', 'expected'),
    [
        (
            '> -----BEGIN RSA PRIVATE KEY-----\n> MIIEpAIBAAKCAQEA7\n> -----END RSA PRIVATE KEY-----',
            f'> -----BEGIN RSA PRIVATE KEY-----\n{REDACTED}\n> -----END RSA PRIVATE KEY-----',
        ),
        (
            '"-----BEGIN PRIVATE KEY-----\\n"\n"MIIEvQIBADANBg\\n"\n"-----END PRIVATE KEY-----\\n"',
            f'"-----BEGIN PRIVATE KEY-----\\n"\n"{REDACTED}\\n"\n"-----END PRIVATE KEY-----\\n"',
        ),
        # Cut off: the run of key characters, through the usual line prefixes.
        (
            '-----BEGIN PRIVATE KEY-----\n> MIIEvQIBADANBg\n> Zm9vYmFyYmF6\n',
            f'-----BEGIN PRIVATE KEY-----\n{REDACTED}\n',
        ),
        ('-----BEGIN PRIVATE KEY-----\u2028MIIEvQIBADANBg', f'-----BEGIN PRIVATE KEY-----\u2028{REDACTED}'),
    ],
)
def test_the_armour_and_its_line_break_stay(text: str, expected: str):
    assert redact_text(text)[0] == expected


def test_an_end_line_far_below_an_armour_line_does_not_take_all_the_text_between():
    # Beyond `_secret_checks.PEM_BODY_MAX` (64 KiB), the run of key characters goes, as for a key cut off (prose is
    # made of them too).
    text = '-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n' + 'prose. ' * 20_000 + '\n-----END PRIVATE KEY-----'
    redacted, count = redact_text(text)
    assert count == 1 and redacted.startswith(f'-----BEGIN PRIVATE KEY-----\n{REDACTED}')
    assert len(text) - len(redacted) <= 64 << 10 and redacted.count('prose.') > 10_000


# --- secret-named keys however they are spelt: the quick check agrees with the walk -------------------------------

_SECRET_KEYS = ('password', 'Password', 'api_key', 'token', 'DB Password', 'client_secret', 'x-api-key')
# What follows a key taken from a spreadsheet's header or a careless program (what `is_secret_name()` strips).
_KEY_TRAILS = [' ', '  ', '\t', '\n', '\r', '\x7f', '\x00', '\x1f', ' \x7f ']
# What a turn makes of a NUL or a lone surrogate (U+FFFD), and characters nobody sees: a zero-width space, a BOM, a
# no-break space, a line separator, direction marks, a combining mark.
_INVISIBLE_TRAILS = ['\ufffd', '\ud800', '\u200b', '\ufeff', '\xa0', '\u2028', '\u200f', '\u202e', '\u0301', '\u2060']
_KEY_TRAILS += _INVISIBLE_TRAILS
_PLANTED = 'hunter2Zq9'


def _hostile_values(key: str) -> dict[str, object]:
    """A secret under `key` in the places a tool result or a model's arguments put it."""
    return {
        'top': {key: _PLANTED},
        'nested': {'rows': [{'id': 1, 'config': {'host': 'db', key: _PLANTED}}]},
        'json-in-string': {'content': json.dumps({key: _PLANTED, 'n': 1})},
        'json-in-a-huge-string': {'content': 'lorem ipsum\n' * 40_000 + json.dumps({key: _PLANTED})},
        'list': [{'a': 1}, {key: _PLANTED}],
    }


def _dumps(value: object) -> list[str]:
    return [json.dumps(value), json.dumps(value, ensure_ascii=False), json.dumps(value, separators=(',', ':'))]


@pytest.mark.parametrize('trail', _KEY_TRAILS, ids=ascii)
@pytest.mark.parametrize('name', _SECRET_KEYS)
def test_a_secret_named_key_with_what_is_secret_name_strips_after_it_is_redacted_and_seen(name: str, trail: str):
    key = name + trail
    assert is_secret_name(key)
    for where, value in _hostile_values(key).items():
        redacted, count = redact_value(value)
        assert count >= 1 and _PLANTED not in json.dumps(redacted, ensure_ascii=False), (where, redacted)
        for text in _dumps(value):
            # The contract the ledger trusts: False means redaction would not change the value.
            assert json_may_need_redaction(text), (where, text[-200:])
            if '\ud800' not in text:  # the rules read a lone surrogate as `?`, and `"password?"` is no key to them
                assert _PLANTED not in redact_text(text)[0], (where, text[-200:])


@pytest.mark.parametrize('trail', _KEY_TRAILS, ids=ascii)
@pytest.mark.parametrize(
    'place',
    [
        '{pair}',
        'Here it is:\n{pair}\nthanks',
        '{pair}, "host": "db"',
        'x\x00{pair}',
        'x\ufffd{pair}',
        'x\u2028{pair}',
        'lorem ipsum\n' * 40_000 + '{pair}',
    ],
    ids=['alone', 'on-its-own-line', 'line-start', 'after-nul', 'after-fffd', 'after-line-separator', 'huge'],
)
def test_a_quoted_secret_named_key_with_a_trail_in_free_text_is_redacted(place: str, trail: str):
    pair = json.dumps({'Password' + trail: _PLANTED})[1:-1]
    redacted, count = redact_text(place.format(pair=pair))
    assert count == 1 and _PLANTED not in redacted, redacted[-200:]


# An invisible character, a NUL or U+FFFD right after an unquoted name (README's promise; QA: only the quoted and dict
# forms were found). A line break is not one of them: `Password\n========` is a heading.
_UNQUOTED_TRAILS = [
    '\x00',
    '\x7f',
    '\x1f',
    '\ufffd',
    '\u200b',
    '\ufeff',
    '\xa0',
    '\u200f',
    '\u202e',
    '\u0301',
    '\u2060',
]


@pytest.mark.parametrize('trail', _UNQUOTED_TRAILS, ids=ascii)
@pytest.mark.parametrize('name', ['password', 'DB_PASSWORD', 'api_key', 'token'])
def test_an_unquoted_secret_named_key_with_an_invisible_trail_in_free_text_is_redacted(name: str, trail: str):
    for place in ('{pair}', 'my config:\n{pair}\nthanks', 'x\ufffd{pair}', 'x\x00{pair}'):
        for sep in ('=', ': ', ' = '):
            text = place.format(pair=f'{name}{trail}{sep}{_PLANTED}')
            for form in (text, json.dumps({'note': text})):
                redacted, count = redact_text(form)
                assert count == 1 and _PLANTED not in redacted, redacted[-200:]


def test_the_quick_check_is_never_false_where_the_walk_changes_a_value():
    """Property: for keys spelt in hostile ways, if `redact_value` changes a value, `json_may_need_redaction` of its
    JSON says it may."""
    names = [*_SECRET_KEYS, 'username', 'max_tokens', 'token_count', 'primary_key', 'note']
    affixes = ['', *_KEY_TRAILS]
    for name in names:
        for before in ('', ' ', '\t'):
            for after in affixes:
                value = {'data': {before + name + after: _PLANTED}, 'ok': True}
                if redact_value(value)[1]:
                    for text in _dumps(value):
                        assert json_may_need_redaction(text), text


@pytest.mark.parametrize('mark', _INVISIBLE_TRAILS, ids=ascii)
@pytest.mark.parametrize('name', _SECRET_KEYS)
def test_a_secret_name_with_an_invisible_character_before_or_after_it_is_still_a_secret_name(name: str, mark: str):
    for key in (name + mark, mark + name, mark + name + mark, name + mark + ' '):
        assert is_secret_name(key), repr(key)
        redacted, count = redact_value({'db': {key: _PLANTED}, 'rows': [{key: 12345}]})
        assert count == 2 and _PLANTED not in json.dumps(redacted), redacted
    assert not is_secret_name('max_tokens' + mark) and not is_secret_name(mark + 'primary_key')


# --- Markdown labels and tables, SQL ------------------------------------------------------------------------------

_MARKDOWN_AND_SQL = [
    '**Password:** {s}',
    '**Password**: {s}',
    '* **API key:** {s}',
    '- **Database password**: {s}',
    '_Password:_ {s}',
    '__Password__: {s}',
    '**Token:** `{s}`',
    '| password | {s} |',
    '| **API key** | `{s}` |',
    "ALTER USER app WITH PASSWORD '{s}';",
    "CREATE ROLE reporting LOGIN NOINHERIT PASSWORD '{s}' VALID UNTIL 'infinity';",
    "CREATE USER u IDENTIFIED BY '{s}';",
    "ALTER USER 'u'@'%' IDENTIFIED WITH mysql_native_password BY '{s}';",
    # af450b5's statement-only rule missed these (QA): OR REPLACE, a comment or a line break between the keywords,
    # a terminal's colour code glued to the statement, a password named in prose
    "CREATE OR REPLACE USER 'bob'@'%' IDENTIFIED BY '{s}';",
    'psql -c "CREATE OR REPLACE ROLE bob PASSWORD \'{s}\'"',
    "ALTER /* rotate */ USER bob PASSWORD '{s}';",
    "CREATE\nUSER bob PASSWORD '{s}';",
    "\x1b[1mALTER USER bob PASSWORD '{s}';\x1b[0m",
    "The user bob has password '{s}' now.",
    # statements over several lines, and the other forms of a SQL password (QA)
    "CREATE USER app_user\n  WITH PASSWORD '{s}';",
    "CREATE ROLE app WITH\n  LOGIN\n  PASSWORD '{s}';",
    'cur.execute("""\n    CREATE USER bob\n    WITH PASSWORD \'{s}\'\n""")',
    "CREATE USER bob\r\nPASSWORD '{s}';",
    "SET PASSWORD FOR 'bob'@'localhost' = '{s}';",
    "SET PASSWORD FOR 'bob'@'localhost' = PASSWORD('{s}');",
    "ALTER SERVER foo OPTIONS (SET password '{s}');",
    'ALTER USER scott IDENTIFIED BY {s};',
    'ALTER USER scott IDENTIFIED BY "{s}";',
    "CREATE DATABASE LINK remote CONNECT TO scott IDENTIFIED BY '{s}' USING 'orcl';",
    "CREATE TEMPORARY USER bob IDENTIFIED BY '{s}';",
]
_TEXT_PLACES = {
    'line-start': '{t}\nthanks',
    'alone-on-a-line': 'Here they are:\n{t}\nLet me know.',
    'after-nul': 'x\x00\n{t}',
    'after-fffd': 'x\ufffd\n{t}',
    'after-line-separator': 'x\u2028{t}',
    'huge': 'lorem ipsum dolor\n' * 40_000 + '{t}\n',
}


@pytest.mark.parametrize('form', _MARKDOWN_AND_SQL)
@pytest.mark.parametrize('place', [*_TEXT_PLACES, 'inside-json', 'inside-a-dict'])
def test_markdown_labels_tables_and_sql_passwords_are_redacted(form: str, place: str):
    secret = 'Zx9pQ2mLk7ab'
    planted = form.format(s=secret)
    if place == 'inside-a-dict':
        redacted_value, count = redact_value({'answer': f'Staging:\n{planted}\n', 'n': 1})
        redacted = json.dumps(redacted_value)
    elif place == 'inside-json':
        text = json.dumps({'answer': f'Staging:\n{planted}\n'})
        assert json_may_need_redaction(text)
        redacted, count = redact_text(text)
        json.loads(redacted)
    else:
        redacted, count = redact_text(_TEXT_PLACES[place].replace('{t}', planted))
    assert count == 1 and secret not in redacted, redacted[-300:]
    assert REDACTED in redacted


@pytest.mark.parametrize(
    'text',
    [
        '| Setting | Description |\n|---|---|\n| password | the one you chose |\n| token | see below |',
        'Password\n========\nChoose one.\n\ntoken\n: see the vault',
        'echo $PASSWORD | base64 -d\necho $token | sha256sum',
        '**Password:** see the vault\n**Token**: rotate it',
        "ALTER USER app WITH PASSWORD '%s';\nALTER ROLE app WITH PASSWORD NULL;",
        'The password reset is sent by email; identified by their badge.',
        "Can't locate revision identified by 'a1b2c3d4'",  # Alembic's error, no SQL password (db upgrade's line)
        "error: cannot migrate to 'grant-1': Can't locate revision identified by 'grant-1'",
        "The user was identified by 'their email address' in the logs.",
        "The role identified by 'admin' has all rights. The user's password 'must' be changed.",
        "Every user picks a password 'they remember'; the role's password 'policy' is strict.",
        "ALTER USER app IDENTIFIED BY RANDOM PASSWORD;\nALTER USER app IDENTIFIED BY VALUES 'S:0A1B';",
        "GRANT SELECT ON users TO app; -- app reads password 'hashes' only",
        "SELECT REPLACE(name, 'a', 'b') FROM t; SET search_path = 'app';",
        "CREATE OR REPLACE ROLE app PASSWORD '<password>';\nALTER /* rotate */ USER app PASSWORD '%s';",
        # schema and pricing tables (QA): column types, numbers, dates, paths are no passwords
        '| password | varchar(255) | NOT NULL |\n| api_key | char(40) |\n| access_key | String(128) |',
        '| token | int4 |\n| token | 0.0002 |\n| pwd | /home/user |\n| password | 2024-01-01 |\n| password | 8-64 |',
        # code and prose naming a key's armour lines: nothing between them is a key (QA)
        'if line.startswith("-----BEGIN PRIVATE KEY-----"):\n    in_key = True\n'
        'elif line.startswith("-----END PRIVATE KEY-----"):\n    in_key = False',
        'PEM_HEADER = "-----BEGIN PRIVATE KEY-----"\nPEM_FOOTER = "-----END PRIVATE KEY-----"',
        'header := "-----BEGIN RSA PRIVATE KEY-----"; footer := "-----END RSA PRIVATE KEY-----"',
        'A key file begins with `-----BEGIN PRIVATE KEY-----`, then:\n1. its body\n2. mode 600\n'
        'and ends with `-----END PRIVATE KEY-----`.',
        '-----BEGIN PRIVATE KEY-----\n<your key here>\n-----END PRIVATE KEY-----',
        # code and prose between the armour lines whose identifiers or words looked like key text (QA)
        'func load(s string) (any, error) {\n\tif !strings.HasPrefix(s, "-----BEGIN PRIVATE KEY-----") {\n'
        '\t\treturn nil, errors.New("not PKCS8")\n\t}\n\tblock, _ := pem.Decode([]byte(s))\n'
        '\tkey, err := x509.ParsePKCS8PrivateKey(block.Bytes)\n'
        '\tif err != nil || !strings.HasSuffix(strings.TrimSpace(s), "-----END PRIVATE KEY-----") {',
        'String pem = "-----BEGIN PRIVATE KEY-----\\n" + base64Encoded + "\\n-----END PRIVATE KEY-----";',
        'The first line is -----BEGIN RSA PRIVATE KEY----- and then comes Proc-Type: if it is encrypted, and the last '
        'is -----END RSA PRIVATE KEY-----',
    ],
)
def test_markdown_and_sql_without_a_secret_are_left_alone(text: str):
    assert redact_text(text) == (text, 0), find_secrets(text)


def test_mysqls_old_password_after_replace_is_redacted_with_the_new_one():
    text = "ALTER USER 'bob'@'%' IDENTIFIED BY 'N3wPass!x' REPLACE 'OldPass1!';"
    for form in (text, json.dumps({'sql': text})):
        redacted, count = redact_text(form)
        assert count == 2 and 'N3wPass!x' not in redacted and 'OldPass1!' not in redacted, redacted
        assert "REPLACE '[REDACTED]'" in redacted


@pytest.mark.parametrize(
    ('key', 'body'),
    [
        ('RSA PRIVATE KEY', 'MIIE pAIB AAKC AQEA 0Z3V S8x1 qQ7k'),  # a body in groups of 4 characters
        ('EC PRIVATE KEY', '30:77:02:01:01:04:20:6b:8c:2f:aa:13:77:de:ad:be:ef'),  # a body in hex
        ('OPENSSH PRIVATE KEY', 'b3BlbnNzaC1r\nZXktdjEAAAAA\nBG5vbmUAAAAE'),  # short lines
    ],
)
@pytest.mark.parametrize('place', ['{t}', 'Here:\n{t}\nthanks', 'x\ufffd\n{t}'])
def test_a_key_body_in_groups_hex_or_short_lines_is_redacted(key: str, body: str, place: str):
    """af450b5 kept a body without a base64 run of 12 characters or MII followed by 8 (QA)."""
    text = place.format(t=f'-----BEGIN {key}-----\n{body}\n-----END {key}-----')
    for form in (text, json.dumps({'out': text})):
        redacted, count = redact_text(form)
        assert count == 1 and body[:12] not in redacted and body[-8:] not in redacted, redacted
        assert f'-----END {key}-----' in redacted


# Rows the table rule did not take for rows (QA): after a quote's or a list's prefix, characters nobody sees at the
# line's start, no-break spaces as padding, a name in backticks or with a colon, the first row of a JSON string.
_TABLE_ROW_SHAPES = [
    '> | password | {s} |',
    '- | password | {s} |',
    '> - | secret | `{s}` |',
    '| `password` | {s} |',
    '| **Password:** | {s} |',
    '| Password: | {s} |',
]
_INVISIBLE_ROW_SHAPES = ['\ufffd| password | {s} |', '\u200b| password | {s} |', '\ufeff| token | {s} |']
_INVISIBLE_ROW_SHAPES += ['|\xa0password\xa0|\xa0{s}\xa0|', '\x00| api_key | {s} |']


@pytest.mark.parametrize('form', _TABLE_ROW_SHAPES + _INVISIBLE_ROW_SHAPES, ids=ascii)
def test_a_table_row_after_a_prefix_or_with_a_marked_name_is_redacted(form: str):
    secret = 'Sup3rS3cret!x'
    row = form.format(s=secret)
    texts = [row, f'Here:\n{row}\nthanks', f'x\r\n{row}\r\n']
    if form in _TABLE_ROW_SHAPES:  # in JSON text, invisible characters are escapes (\u00a0) the rule does not read
        texts += [json.dumps({'cfg': row}), json.dumps({'cfg': f'Here:\n{row}'})]
    for text in texts:
        redacted, count = redact_text(text)
        assert count == 1 and secret not in redacted, repr(redacted)
    redacted_value, count = redact_value({'answer': row})
    assert count == 1 and secret not in json.dumps(redacted_value)


# A secret-named row's value is a credential unless it is plainly none, however short or odd it is (QA: af450b5's
# 8-character minimum and its "path or variable" shape for anything starting with /, ~ or $ kept these in clear).
_TABLE_CREDENTIALS = [
    ('| password | {s} |', 'hunter2'),
    ('| password | {s} |', 's3cr3t!'),
    ('| password | `{s}` |', 'hunter2'),
    ('| password | {s} |', '$ecretP4ss!'),
    ('| secret | {s} |', '/aB3kL9mQ2xY7pR4zT8w'),
    ('| password | {s} |', '~Tr0ub4dor&3'),
    ('| password | {s} |', 'Hunter(2024)'),
    ('| api_key | {s} |', 'sk_live(12345)'),
    ('| field | value |\n|---|---|\n| password | {s} |', 'P@ss123'),
    ('| password | `{s}` |', 'Adm1n!x'),
    ('| secret | {s} |', 'ABC_123'),
    ('| password | {s} |', 'pw(2024)!'),
]


@pytest.mark.parametrize(('form', 'secret'), _TABLE_CREDENTIALS)
@pytest.mark.parametrize('place', [*_TEXT_PLACES, 'inside-json', 'inside-a-dict'])
def test_a_short_or_odd_value_of_a_secret_named_table_row_is_redacted(form: str, secret: str, place: str):
    planted = form.format(s=secret)
    if place == 'inside-a-dict':
        redacted_value, count = redact_value({'answer': f'Staging:\n{planted}\n', 'n': 1})
        redacted = json.dumps(redacted_value)
    elif place == 'inside-json':
        text = json.dumps({'answer': f'Staging:\n{planted}\n'})
        redacted, count = redact_text(text)
        json.loads(redacted)
        secret = json.dumps(secret)[1:-1]
    else:
        redacted, count = redact_text(_TEXT_PLACES[place].replace('{t}', planted))
    assert count == 1 and secret not in redacted, redacted[-300:]


@pytest.mark.parametrize(
    'text',
    [
        '| password | - |\n| token | null |\n| secret | n/a |\n| password | ***** |\n| api_key | <your-key> |',
        '| password | [REDACTED] |\n| token | none |\n| password | N/A |\n| password | `********` |',
        '| password | CHAR(64) |\n| token | NUMERIC(10,2) |\n| password | TIMESTAMP(6) |\n| secret | bytea |',
        '| api_key | VARCHAR(255)[] |\n| token | int8 |\n| password | text |\n| token | uuid |',
        '| api_key | os.urandom(32) |\n| token | secrets.token_hex(16) |',
        '| token | $0.002 |\n| password | 8-64 |\n| secret | 12:30 |',
        '| pwd | ~/.ssh/ |\n| password | ~/secrets/db.txt |\n| secret | /run/secrets/db_password |',
        '| token | $GITHUB_TOKEN |\n| password | $db_password |\n| secret | ${VAULT_SECRET} |',
        '| prompt token | $0.5/1M |\n| input tokens | 1,024 |',
        '- echo $PASSWORD | base64 -d\n> grep token | wc -l\n"| password | varchar(255) |"\n> | token | see below |',
        # code, timestamps, URLs, key files' and variables' names in a schema or settings table (QA)
        '| password | CharField(max_length=128) |\n| api_key | Column(String(64)) |\n| token | uuid_generate_v4() |',
        '| password | bcrypt(cost=12) |\n| token | md5(random()::text) |\n| session_token | 2024-01-31T10:00:00Z |',
        '| client_secret | https://vault.example.com/v1/app |\n| private key | id_ed25519 |\n| secret | SECRET_KEY_2 |',
        '| private key | ~/.ssh/id_rsa |\n| private key | server.key |\n| secret | 2024-01-31 10:00:00+01:00 |',
        # short technical terms of a settings table: algorithms, durations, sizes, encodings, versions (QA)
        '| token | HS256 |\n| token | RS256 |\n| token | ES256 |\n| password | SHA-256 |\n| secret | AES-256 |',
        '| password | md5 |\n| password | 3DES |\n| secret | x509 |\n| password | bcrypt |\n| password | argon2id |',
        '| token | 24h |\n| token | 30d |\n| token | 15m |\n| token | 3600s |\n| password | 7-day |',
        '| secret | 128-bit |\n| secret | 256-bit |\n| password | UTF-8 |\n| token | Base64 |\n| password | 12-char |',
        '| token | OAuth2 |\n| api_key | GPT-4 |\n| api_key | gpt-4o |\n| token | K8s |\n| secret | IPv4 |',
        '| password | 2FA |\n| password | MFA/2FA |\n| private key | PKCS#12 |\n| token | v2.1 |\n| token | 50% |',
        '| api_key | $5/mo |\n| password | SHA-256 | yes | hashed |\n| token | JWT |',
    ],
)
def test_a_secret_named_table_row_whose_value_is_plainly_no_credential_is_left_alone(text: str):
    assert redact_text(text) == (text, 0), find_secrets(text)


# --- terminal escape sequences and other boundaries before a secret -----------------------------------------------

_ESCAPES = ['\x1b[1m', '\x1b[01;31m', '\x1b[38;5;196m', '\x1b[0;1;32m', '\x1b[K']
_TOKEN_KINDS = [kind for kind in KINDS if kind.template == '{s}' and kind.rule not in ('secret-assignment',)]


@pytest.mark.parametrize('escape', _ESCAPES, ids=ascii)
@pytest.mark.parametrize('kind', _TOKEN_KINDS, ids=lambda k: k.name)
def test_a_token_right_after_a_terminal_escape_sequence_is_redacted(kind: Kind, escape: str):
    coloured = f'{escape}{kind.text}\x1b[0m'
    places = [
        coloured,
        f'Your token:\n{coloured}\n',
        f'x\x00{coloured}',
        f'x\ufffd{coloured}',
        f'x\u2028{coloured}',
        'lorem ipsum dolor\n' * 20_000 + coloured,
    ]
    for text in places:
        redacted, count = redact_text(text)
        assert count >= 1 and not [f for f in kind.distinctive() if f in redacted], repr(redacted[-200:])
        for value in ({'out': text}, [text]):  # inside JSON: `\u001b[1m`
            as_json = json.dumps(value)
            assert json_may_need_redaction(as_json)
            redacted, _ = redact_text(as_json)
            json.loads(redacted)
            assert not [f for f in kind.distinctive() if f in redacted], redacted[-200:]


@pytest.mark.parametrize(
    'text',
    [
        '\x1b[1mpostgresql://app:Pw0rd-9xYz@db:5432/prod',
        '\x1b[32mCookie: sessionid=Abcdefgh12345678; theme=dark',
        '\x1b[1mMY_SERVICE_BLOB=Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56',
    ],
)
def test_a_label_right_after_a_terminal_escape_sequence_still_labels(text: str):
    redacted, count = redact_text(text)
    assert count == 1 and REDACTED in redacted and text[:4] == redacted[:4]


@pytest.mark.parametrize(
    'before', ['\x0b', '\x00', '\ufffd', '\u200b', '\u2028', '\xa0', '\u200f', '\ufeff', '\u3000', '\x1b[1m'], ids=ascii
)
@pytest.mark.parametrize(
    ('flag', 'secret'),
    [('-u admin:{s}', 'Pw0rd!x9Qz'), ('--password {s}', 'Hunter2xyz9'), ('sig={s}&se=2030', 'Ab1Cd2Ef3Gh4Ij5Kl6Mn7')],
)
def test_a_flag_or_a_signature_after_an_unusual_boundary_is_redacted(before: str, flag: str, secret: str):
    for text in (f'x{before}{flag.format(s=secret)}', json.dumps({'cmd': f'x{before}{flag.format(s=secret)}'})):
        redacted, count = redact_text(text)
        assert count == 1 and secret not in redacted, repr(redacted)
