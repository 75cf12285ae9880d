"""Redact secrets from text and from JSON-like values before they are stored or logged.

What is caught (rules in `redaction_rules.toml` beside this module, listed by `rule_kinds()`):
- provider tokens by their published shapes: OpenAI / Anthropic / other `sk-` keys, GitHub (classic and
  fine-grained), GitLab, Slack (tokens and webhooks), Stripe, AWS access key ids, Google (API keys, OAuth access
  and refresh tokens, client secrets), Hugging Face, npm, PyPI, SendGrid, Twilio, Mailgun, Mailchimp, Telegram,
  Discord, Azure (storage keys, AD client secrets), Databricks, DigitalOcean, Vault, Terraform Cloud, Docker Hub,
  Atlassian, Shopify, Square, Sentry, Grafana, New Relic, Doppler, Pulumi, Notion, Figma, Airtable, Heroku,
  Supabase, Alibaba, Facebook, age, Firebase, Groq, Replicate, Perplexity, xAI, Logfire, Artifactory;
- JWTs, signed or not (an `alg: none` token with an empty signature included);
- PEM private keys (any type, encrypted ones with Proc-Type / DEK-Info headers, PGP, SSH2, PuTTY): the armour line
  stays, the rest goes, up to the END line or the end of a truncated key;
- credentials in context: `scheme://user:password@host` (passwords containing `/`, `@` or `:` included),
  `curl -u user:password`, `Authorization: Basic/Bearer ...` anywhere, signed-URL signatures, AWS secret access
  keys near "aws" or "secret", and the value of any secret-named key (`password`, `passwd`, `pwd`, `secret`,
  `token`, `api_key`, `client_secret`, `authorization`, `cookie`, `credentials`, `*_key` of a known kind...)
  written as `name=value`, `name: value`, `"name": "value"`, `--name value`, `<name>value</name>` or
  `name is value`;
- high-entropy strings, but only where they cannot flood ordinary text: as the value of an upper-case
  `KEY=value` environment line (random-looking: upper and lower case and digits, entropy >= 3.5 bits/char).

What is deliberately not caught (known gaps, each a trade against false positives in ordinary text and code):
- random strings without a known shape or a secret-named key before them (a bare 32-character hex string could
  be a Datadog key or a checksum; only `DD_API_KEY=...` and the like are caught), and `KEY=value` lines that do
  not start a line;
- after `name:` in running prose, a plain word without digits or symbols that does not end its line
  (`Token: the unit of text`); after `name is`, anything that does not look like a credential; after `name:`, a
  letters-only CamelCase word, taken for a type annotation (`client_secret: ClientSecret`);
- bare values shaped like code: calls and indexing (`get_password()`, `tokens[0]`, so also `password=abc(def)`),
  attribute paths (`self.token`), keywords and type names (`api_key: str`), upper-case constants (`API_KEY`),
  `x = name` with spaces around `=` and a letters-only value (so also INI `password = letmein`), `pwd=pwd`,
  comparisons (`token == X`); paths and URLs; placeholders (`${DB_PASSWORD}`, `<password>`, `%s`, `***`, `{x}`);
- quoted values that are upper-case names with underscores (`"OPENAI_API_KEY"`), paths, or start or end with a
  space; a quote character inside a quoted password ends the replaced span (JSON safety comes first);
- a secret behind a percent-escape in a prompt or a tool's result (`?q=key%20sk-...`: the escape's hex digits
  join the word before the key). Log lines and request spans read such text decoded as well
  (`agentrt.services.log_redaction.redact_url_text`); the ledger's bodies do not (a second scan of every text
  with a `%`, and JSON text to keep valid through it).

Contract:
- `redact_text()` works on the real text: newlines are newlines, so a secret at the start of a line, after a tab,
  inside JSON inside a string a tool returned, inside a URL or in an error body is caught. It also accepts JSON
  text and keeps it valid: a replaced span never contains `"`, never starts inside an escape or in the structure
  between two strings, and contains `\\` only as whole `\\n`/`\\r`/`\\t` escapes.
- Linear time whatever the input: every pattern runs on RE2 (google-re2), whose automata match in time linear in
  the input and never backtrack; the Python work per candidate match is bounded by constants. A single RE2 set of
  literal-like triggers picks the rules a text can match in one pass, so ordinary prose costs one scan.
- Friendly to an event loop when run in a worker thread (`asyncio.to_thread`): RE2 releases the GIL while it
  scans, and no per-match Python object outlives its match (spans are kept as ints), so redaction does not set
  off long garbage collections. See `scripts/bench_redaction.py`.
- Never raises on hostile text: NUL, lone surrogates, megabytes of trigger characters.

For callers: apply `redact_value()` to message parts (prompts, instructions, tool arguments and returns, model
text, error bodies) as Python values, before serialising; redacting serialised JSON works too but sees escapes.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import re2  # google-re2: linear-time matching

from agentrt.services.ledger._secret_checks import BOUND, CHECKS, JSON_STRUCTURE, Candidate, Check, Span, entropy

REDACTED = '[REDACTED]'
_REDACTED_BYTES = REDACTED.encode()
_RULES_FILE = Path(__file__).with_name('redaction_rules.toml')

_T = TypeVar('_T')


@dataclass(frozen=True, slots=True)
class SecretSpan:
    """One secret found in a text: `text[start:end]` is replaced, `rule` is the id of the rule that found it."""

    start: int
    end: int
    rule: str


# ----------------------------------------------------------------------------------------------------------------
# Rules: loaded from the TOML data, checked, compiled once at import.


@dataclass(frozen=True, slots=True)
class _Rule:
    id: str
    kind: str
    source: str
    regex: Any  # re2._Regexp
    groups: dict[str, int]
    secret_groups: tuple[int, ...]
    check: Check | None
    min_entropy: float
    not_followed_by: frozenset[int]
    not_preceded_by: frozenset[int]

    def spans(self, data: bytes) -> Iterator[tuple[int, int]]:
        """Where this rule's secrets are in `data` (UTF-8 bytes), as byte offsets."""
        for m in self.regex.finditer(data):
            spans = _match_spans(m)
            group, (start, end) = 0, spans[0]
            for index in self.secret_groups:
                if spans[index][0] >= 0:
                    group, (start, end) = index, spans[index]
                    break
            if start >= end or data.startswith(_REDACTED_BYTES, start):
                continue
            # After a closing quote, JSON text continues with structure, which always starts with one of these:
            # a "quoted value" there is the gap between two strings (`": "`), not a value.
            if start and data[start - 1] == 34 and data[start] in JSON_STRUCTURE:
                continue
            if self.not_followed_by and end < len(data) and data[end] in self.not_followed_by:
                continue
            if self.not_preceded_by and start > 0 and data[start - 1] in self.not_preceded_by:
                continue
            if self.min_entropy and entropy(data[start:end]) < self.min_entropy:
                continue
            if self.check is not None:
                checked = self.check(Candidate(data, spans, self.groups, group, start, end))
                if checked is None:
                    continue
                start, end = checked
            start = _after_escape(data, start)
            quote = data.find(b'"', start, end)  # the patterns exclude it; this keeps JSON safe whatever a rule says
            if quote != -1:
                end = quote
            if start < end:
                yield start, end


_HEX4 = re.compile(rb'[0-9A-Fa-f]{4}')


def _after_escape(data: bytes, start: int) -> int:
    """Move `start` past a JSON escape it would otherwise begin inside (`\\u2028eyJ...`, `\\npm_...` where the
    `n` belongs to the escape): replacing from there would leave a lone backslash and break JSON text."""
    run = 0
    while run < BOUND and start - run > 0 and data[start - run - 1] == 92:
        run += 1
    if run % 2 == 0 and run < BOUND:
        return start
    if data[start : start + 1] == b'u' and _HEX4.match(data, start + 1, start + 5):
        return start + 5
    return start + 1


def _match_spans(m: Any) -> list[Span]:
    """The spans of all groups of an re2 match. google-re2's `span()` asks C++ for the group count on every call,
    which is most of the per-match cost on hostile input, so read its span list when it has one."""
    spans = getattr(m, '_spans', None)
    return spans if spans is not None else [m.span(i) for i in range(m.re.groups + 1)]


def _byte_class(body: str) -> frozenset[int]:
    """The ASCII bytes in the regex character class `[body]`."""
    pattern = re.compile(f'[{body}]')
    return frozenset(b for b in range(128) if pattern.fullmatch(chr(b)))


def _options() -> Any:
    options = re2.Options()
    options.max_mem = 64 << 20  # room for the DFA of the larger patterns, so RE2 never falls back to its NFA
    return options


def _load_rules(path: Path) -> tuple[tuple[_Rule, ...], Any, tuple[tuple[int, ...], ...]]:
    """The rules, the RE2 set of all triggers, and for each trigger the indexes of the rules it enables."""
    rules: list[_Rule] = []
    triggers: dict[str, list[int]] = {}
    seen: set[str] = set()
    for raw in tomllib.loads(path.read_text(encoding='utf-8'))['rules']:
        rule_id = raw['id']
        if rule_id in seen:
            raise ValueError(f'{path.name}: duplicate rule id {rule_id!r}')
        seen.add(rule_id)
        if not raw.get('triggers'):
            raise ValueError(f'{path.name}: rule {rule_id!r} has no triggers')
        try:
            regex = re2.compile(raw['pattern'], _options())
        except re2.error as exc:
            raise ValueError(f'{path.name}: rule {rule_id!r}: invalid RE2 pattern: {exc}') from exc
        names = regex.groupindex
        if len(names) != regex.groups:
            raise ValueError(f'{path.name}: rule {rule_id!r}: every group must be named (use (?:...) otherwise)')
        secret_groups = tuple(sorted(i for name, i in names.items() if name.startswith('secret')))
        check_name = raw.get('check')
        if check_name is not None and check_name not in CHECKS:
            raise ValueError(f'{path.name}: rule {rule_id!r}: unknown check {check_name!r}')
        index = len(rules)
        rules.append(
            _Rule(
                id=rule_id,
                kind=raw['kind'],
                source=raw['source'],
                regex=regex,
                groups=dict(names),
                secret_groups=secret_groups,
                check=CHECKS[check_name] if check_name else None,
                min_entropy=float(raw.get('min_entropy', 0.0)),
                not_followed_by=_byte_class(raw['not_followed_by']) if 'not_followed_by' in raw else frozenset(),
                not_preceded_by=_byte_class(raw['not_preceded_by']) if 'not_preceded_by' in raw else frozenset(),
            )
        )
        for trigger in raw['triggers']:
            triggers.setdefault(trigger, []).append(index)
    trigger_set = re2.Set.SearchSet(_options())
    for trigger in triggers:
        trigger_set.Add(f'(?i:{trigger})')
    trigger_set.Compile()
    return tuple(rules), trigger_set, tuple(tuple(indexes) for indexes in triggers.values())


_RULES, _TRIGGERS, _RULES_BY_TRIGGER = _load_rules(_RULES_FILE)


def rule_kinds() -> list[tuple[str, str, str]]:
    """`(id, kind, source)` of every rule, in the order they run: what this module catches, for docs and tests."""
    return [(rule.id, rule.kind, rule.source) for rule in _RULES]


# ----------------------------------------------------------------------------------------------------------------
# The matcher.


# A span is kept as one int, start << 40 | end << 8 | rule index: ints are not tracked by the garbage collector, and
# hostile text yields one span per dozen bytes. Keeping tuples or objects alive instead promotes tens of thousands
# of them per megabyte into the old generation, and the full collections that follow (tens of ms on an
# application-sized heap, GIL held) would stall the event loop while a worker thread redacts.
_START, _END, _RULE_BITS = 40, 8, 0xFF
if len(_RULES) > _RULE_BITS:
    raise ValueError(f'{_RULES_FILE.name}: at most {_RULE_BITS} rules fit the span encoding')


def _byte_spans(data: bytes) -> list[int]:
    """Secrets in `data` (UTF-8) as sorted, merged (where they overlap or touch) encoded byte spans."""
    hits = _TRIGGERS.Match(data)
    if not hits:
        return []
    enabled = sorted({index for hit in hits for index in _RULES_BY_TRIGGER[hit]})
    found = [start << _START | end << _END | index for index in enabled for start, end in _RULES[index].spans(data)]
    found.sort()
    merged: list[int] = []
    last_start = last_end = -1
    for span in found:
        start, end = span >> _START, (span >> _END) & _OFFSET_MASK
        if start <= last_end:  # overlaps or touches the previous one: extend it, keep its rule
            last_end = max(last_end, end)
            merged[-1] = last_start << _START | last_end << _END | (merged[-1] & _RULE_BITS)
        else:
            merged.append(span)
            last_start, last_end = start, end
    return merged


_OFFSET_MASK = (1 << (_START - _END)) - 1


def _char_spans(text: str) -> list[int]:
    """`_byte_spans()` of `text`, with character offsets."""
    if not text:
        return []
    # Lone surrogates cannot be encoded as UTF-8; 'replace' turns each into one '?', so character counts stay equal.
    data = text.encode('utf-8', errors='replace')
    spans = _byte_spans(data)
    if not spans or len(data) == len(text):  # ASCII: byte offsets are character offsets
        return spans
    # Map byte offsets to character offsets in one pass over the text (linear, however many spans).
    result, byte_at, char_at = [], 0, 0
    for span in spans:
        start, end = span >> _START, (span >> _END) & _OFFSET_MASK
        char_start = char_at + len(data[byte_at:start].decode('utf-8'))
        char_end = char_start + len(data[start:end].decode('utf-8'))
        result.append(char_start << _START | char_end << _END | (span & _RULE_BITS))
        byte_at, char_at = end, char_end
    return result


def find_secrets(text: str) -> list[SecretSpan]:
    """Where the secrets in `text` are (character offsets, in order, never overlapping) and which rule found each.

    Args:
        text: any text; lone surrogates and NUL are fine.

    Returns:
        The spans `redact_text()` replaces.
    """
    return [
        SecretSpan(span >> _START, (span >> _END) & _OFFSET_MASK, _RULES[span & _RULE_BITS].id)
        for span in _char_spans(text)
    ]


def redact_text(text: str) -> tuple[str, int]:
    """Replace every secret in `text` with `[REDACTED]`.

    Works on the real text (a newline is a newline); JSON text is accepted too and stays valid JSON. Labels that
    say what the secret was (`password=`, `Bearer `, the user of a URL, the armour of a PEM key) are kept.

    Args:
        text: a prompt, a tool result, model output, an error body, a log line.

    Returns:
        The redacted text (the very same object when nothing was found) and the number of secrets replaced.

    Raises:
        TypeError: `text` is not a `str`.
    """
    if not isinstance(text, str):
        raise TypeError(f'redact_text() takes a str, not {type(text).__name__}')
    spans = _char_spans(text)
    if not spans:
        return text, 0
    pieces, last = [], 0
    for span in spans:
        pieces += [text[last : span >> _START], REDACTED]
        last = (span >> _END) & _OFFSET_MASK
    pieces.append(text[last:])
    return ''.join(pieces), len(spans)


def redact_cut(
    text: str,
    keep: int,
    *,
    scan: int | None = None,
    marker: str = '',
    redactor: Callable[[str], tuple[str, int]] | None = None,
) -> str:
    """`text` redacted, then cut to `keep` characters (`marker` added when something was cut): for a message that is
    shown or stored with a bound (an error's text, a log line).

    Redaction runs before the cut, so a secret the cut splits is replaced whole, not left half visible; only the first
    `scan` characters (twice `keep` by default) are read, so the work stays bounded whatever the text holds, and a
    secret can reach the kept part only if redaction shrank what came before it by `scan - keep` characters.
    `redactor` replaces `redact_text` (a log line's also reads percent-escapes: `log_redaction.redact_url_text`).
    """
    redacted = (redactor or redact_text)(text[: 2 * keep if scan is None else scan])[0]
    return redacted[:keep] + marker if len(redacted) > keep else redacted


def redact(text: str) -> tuple[str, int]:
    """The same as `redact_text()`: the name callers used before."""
    return redact_text(text)


# ----------------------------------------------------------------------------------------------------------------
# Nested values: JSON-like tool arguments and results, message parts dumped to dicts.

_SECRET_NAME_END = (
    r'(?i)(?:password|passwd|passphrase|passcode|secret|token|api[_.-]?key|pwd|authorization'
    r'|(?:access|account|app|client|consumer|encryption|license|master|private|secret|service|session'
    r'|shared[_.-]?access|signing|storage|subscription|webhook)[_.-]?key'
    r'|(?:^|[^a-z])(?:pass|credentials?|cookie|sig|signature))'
    r'(?:[_.-]?(?:confirm(?:ation)?|again|new|old|current|plain(?:text)?|value|[0-9]))?'
)
_SECRET_NAME = re.compile(_SECRET_NAME_END + '$')
# In JSON text: a key that `is_secret_name()` accepts (`^` is the key's opening quote, `$` its closing one), or a key
# with an escape in it (the name it stands for is only known once decoded). A match starting inside a string value
# runs to the value's closing quote, which is never followed by `:`. RE2: one linear scan, whatever the text.
_JSON_SECRET_KEY = re2.compile(
    (_SECRET_NAME_END.replace('(?:^|[^a-z])', '[^a-z]') + r'"\s*:|"(?:[^"\\]|\\.)*\\.(?:[^"\\]|\\.)*"\s*:').encode()
)
_AUTH_SCHEME = re.compile(r'(?i)((?:basic|bearer|token|digest)[ \t]+)\S')


def is_secret_name(name: str) -> bool:
    """Whether a key with this name holds a secret: `password`, `api_key`, `client_secret`, `Authorization`,
    `x-auth-token`, `DB_PASSWORD`, `accessToken`, ... but not `max_tokens`, `token_count` or `primary_key`."""
    return _SECRET_NAME.search(name[-80:]) is not None


def json_may_need_redaction(text: str) -> bool:
    """Whether `redact_value()` may change the value `text` is the JSON of (`json.dumps`, any separators).

    False means it would not: the rules find no secret in the text (they read JSON text, escapes included) and no
    key names a secret. One scan in RE2 and C, about 15 times faster than walking the value in Python, so a caller
    can store the JSON as it is in the common case and walk the value only when this says it may hold a secret.
    """
    data = text.encode('utf-8', errors='replace')
    return _JSON_SECRET_KEY.search(data) is not None or _has_secret(data)


def _has_secret(data: bytes) -> bool:
    """Whether `_byte_spans(data)` would find anything, stopping at the first secret (hostile text full of secrets
    then costs one match, not a full scan before the caller redacts it anyway)."""
    hits = _TRIGGERS.Match(data)
    if not hits:
        return False
    for index in sorted({index for hit in hits for index in _RULES_BY_TRIGGER[hit]}):
        for _ in _RULES[index].spans(data):
            return True
    return False


def _redact_scalar(value: Any) -> tuple[Any, int]:
    """The value of a secret-named key: strings, numbers and bytes go (an auth scheme before a string stays)."""
    if isinstance(value, str):
        if not value.strip() or value.startswith(REDACTED):
            return value, 0
        scheme = _AUTH_SCHEME.match(value)
        return (scheme.group(1) if scheme else '') + REDACTED, 1
    if isinstance(value, bool) or value is None:
        return value, 0
    if isinstance(value, int | float | bytes | bytearray):
        return REDACTED, 1
    return value, 0


def redact_value(value: _T) -> tuple[_T, int]:
    """A redacted copy of a JSON-like value: nested dicts, lists and tuples of strings, numbers, bools and None.

    Every string (dict keys included) goes through `redact_text()`. The value of a key that names a secret
    (`is_secret_name()`) is replaced whole when it is a string, a number or bytes; inside a list or tuple under
    such a key every such item is replaced; a dict under it is walked normally (its own keys decide). Other types
    are returned as they are (dump models and dataclasses to dicts first, e.g. with pydantic's `dump_python(...,
    mode='json')`); subclasses of dict, list and tuple come back as the plain type. The walk is iterative, so
    depth is no problem; a container that contains itself is replaced by `[REDACTED]` at the point of the cycle.

    Args:
        value: for example a tool call's arguments, a tool's return value, a message dumped with `model_dump()`.

    Returns:
        The redacted copy (the same object where nothing changed is not guaranteed) and the number of replacements.
    """
    return _Walker().walk(value)


class _Walker:
    """An explicit-stack walk, so hostile nesting depth cannot hit Python's recursion limit."""

    def __init__(self) -> None:
        self.count = 0

    def leaf(self, value: Any, secret: bool) -> Any:
        if secret:
            replaced, n = _redact_scalar(value)
            if n:
                self.count += n
                return replaced
        if isinstance(value, str):
            redacted, n = redact_text(value)
            self.count += n
            return redacted
        return value

    def key(self, key: Any, taken: dict[Any, Any]) -> Any:
        if not isinstance(key, str):
            return key
        redacted, n = redact_text(key)
        self.count += n
        unique, suffix = redacted, 2
        while n and unique in taken:  # two keys that redact alike stay two keys
            unique, suffix = f'{redacted} ({suffix})', suffix + 1
        return unique

    @staticmethod
    def frame(container: Any, secret: bool, key_in_parent: Any) -> _Frame:
        if isinstance(container, dict):
            items = ((k, v, isinstance(k, str) and is_secret_name(k)) for k, v in container.items())
            return _Frame(container, iter(items), {}, key_in_parent)
        return _Frame(container, iter((None, v, secret) for v in container), [], key_in_parent)

    def walk(self, root: Any) -> tuple[Any, int]:
        if not isinstance(root, dict | list | tuple):
            return self.leaf(root, False), self.count
        stack = [self.frame(root, False, None)]
        on_path = {id(root)}
        while True:
            frame = stack[-1]
            step = next(frame.items, None)
            if step is None:  # container done: build it and hand it to its parent
                stack.pop()
                on_path.discard(id(frame.source))
                built = tuple(frame.out) if isinstance(frame.source, tuple) else frame.out
                if not stack:
                    return built, self.count
                _put(stack[-1].out, frame.key_in_parent, built)
                continue
            key, child, secret = step
            if isinstance(frame.out, dict):
                key = self.key(key, frame.out)
            if isinstance(child, dict | list | tuple):
                if id(child) in on_path:  # a container that contains itself
                    self.count += 1
                    _put(frame.out, key, REDACTED)
                    continue
                on_path.add(id(child))
                # Under a secret-named key, list items inherit the secrecy; a dict's own keys decide for it.
                stack.append(self.frame(child, secret and not isinstance(child, dict), key))
                continue
            _put(frame.out, key, self.leaf(child, secret))


@dataclass(slots=True)
class _Frame:
    source: Any
    items: Iterator[tuple[Any, Any, bool]]
    out: Any  # dict or list being built
    key_in_parent: Any


def _put(out: Any, key: Any, value: Any) -> None:
    if isinstance(out, dict):
        out[key] = value
    else:
        out.append(value)
