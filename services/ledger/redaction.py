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
  and its line break stay, the rest goes, up to the END line whatever the lines carry (`> ` or `# ` before them, line
  numbers, string literals, a JSON list of the lines, U+2028 between them; at most 64 KiB), or the run of key
  characters of a truncated key;
- credentials in context: `scheme://user:password@host` (passwords containing `/`, `@` or `:` included),
  `curl -u user:password`, `Authorization: Basic/Bearer ...` anywhere, signed-URL signatures, AWS secret access
  keys near "aws" or "secret", and the value of any secret-named key (`password`, `passwd`, `pwd`, `secret`,
  `token`, `api_key`, `client_secret`, `authorization`, `cookie`, `credentials`, `*_key` of a known kind...)
  written as `name=value`, `name: value`, `"name": "value"`, `--name value`, `<name>value</name>` or
  `name is value`, with Markdown emphasis around the name (`**Password:** value`, `__Password__: value`) or as a
  Markdown table's row (`| password | value |`, a value with a digit or a symbol); SQL's role and user passwords
  (`ALTER USER x WITH PASSWORD '...'`, `CREATE ROLE ... PASSWORD '...'`, `IDENTIFIED BY '...'`);
- the runtime's own credentials as literals, whatever their shape (`_configured_secrets`: the values of the
  environment variables that hold one, `OPENAI_API_KEY=vllm-local-...`, and database URLs' passwords);
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
`redact_value()` reads a string that is JSON text with escapes in it (a model's tool-call arguments:
`"sk\\u002dproj-..."`, `"a\\fsk-proj-..."`, `"\\/"`) decoded, as the tool does, and redacts the input a
validation error quotes for a secret-named field (pydantic's `{"loc": ["api_key"], "input": ...}` in a retry
prompt) as that field's value. JSON text that does not parse (arguments a model's output limit cut off) is read token
by token (`_Walker.cut_off_json`): a secret-named key's value, whatever it is, becomes `"[REDACTED]"` (a list or an
object up to its close, or to the end of the text when it never closes), and each string with an escape is read
decoded.

The rules' loading and checks, the trigger set and the byte-level matcher are in `_redaction_rules.py`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import re2  # google-re2: linear-time matching

from agentrt.services.ledger._configured_secrets import holds_configured_secret, literal_spans
from agentrt.services.ledger._configured_secrets import reread_configured_secrets as reread_configured_secrets
from agentrt.services.ledger._redaction_rules import (
    END,
    OFFSET_MASK,
    RULE_BITS,
    RULES,
    START,
    char_spans,
    has_secret,
    merged_spans,
)

# Part of this module's public face, defined beside the rules.
from agentrt.services.ledger._redaction_rules import REDACTED as REDACTED
from agentrt.services.ledger._redaction_rules import rule_kinds as rule_kinds
from agentrt.services.ledger._secret_checks import PEM_BODY_MAX

_T = TypeVar('_T')

CONFIGURED_CREDENTIAL = 'configured_credential'
"""The rule id `find_secrets()` gives a span of the runtime's own credentials (`_configured_secrets`)."""
_CONFIGURED = RULE_BITS  # its index in a span: one past the last rule's (`_redaction_rules` keeps it free)


def _spans(text: str) -> list[int]:
    """`char_spans(text)` and the configured credentials in it, sorted and merged where they overlap or touch."""
    spans = char_spans(text)
    literals = literal_spans(text)
    if not literals:
        return spans
    return merged_spans(spans + [start << START | end << END | _CONFIGURED for start, end in literals])


def _rule_id(span: int) -> str:
    index = span & RULE_BITS
    return CONFIGURED_CREDENTIAL if index == _CONFIGURED else RULES[index].id


@dataclass(frozen=True, slots=True)
class SecretSpan:
    """One secret found in a text: `text[start:end]` is replaced, `rule` is the id of the rule that found it."""

    start: int
    end: int
    rule: str


def find_secrets(text: str) -> list[SecretSpan]:
    """Where the secrets in `text` are (character offsets, in order, never overlapping) and which rule found each.

    Args:
        text: any text; lone surrogates and NUL are fine.

    Returns:
        The spans `redact_text()` replaces.
    """
    return [SecretSpan(span >> START, (span >> END) & OFFSET_MASK, _rule_id(span)) for span in _spans(text)]


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
    spans = _spans(text)
    if not spans:
        return text, 0
    pieces, last = [], 0
    for span in spans:
        pieces += [text[last : span >> START], REDACTED]
        last = (span >> END) & OFFSET_MASK
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
    r'(?i)(?:password|passwd|passphrase|passcode|secret|token|api[ _.-]?key|pwd|authorization'
    r'|(?:access|account|app|client|consumer|encryption|license|master|private|secret|service|session'
    r'|shared[_.-]?access|signing|storage|subscription|webhook)[_.-]?key'
    r'|(?:^|[^a-z])(?:pass|credentials?|cookie|sig|signature))'
    r'(?:[_.-]?(?:confirm(?:ation)?|again|new|old|current|plain(?:text)?|value|[0-9]{1,4}))?'
)
_SECRET_NAME = re.compile(_SECRET_NAME_END + '$')
# JSON escapes that can stand for a secret's own characters or glue a letter to its start (`\u002d` for `-`, `\/`,
# `\f`, `\b`, and `\t` before anything but another escape: a tab is the space of `password:\thunter2` and of
# `password=\t$ecret`, which the rules read decoded but not escaped; QA), at either level of JSON text escaped again
# (a model's arguments in a message): the rules read the text as it is written, so a text holding one is decoded and
# walked (`json_may_need_redaction`, `_Walker.leaf`). Not any backslash: a Windows path or a regular expression in a
# message walked it, 30 times the CPU (QA). Case-sensitive.
_HIDING_ESCAPE = r'(?-i:\\(?:u[0-9a-fA-F]{4}|[/fb]|t(?:[^\\]|\\+")))'
# In JSON text: a key that `is_secret_name()` accepts (`^` is the key's opening quote, `$` its closing one), or a key
# with an escape in it (the name it stands for is only known once decoded); a key of JSON text inside a string (a
# model's arguments: `\"password\": [`), at any depth of JSON-in-string (`\\\"password\\\": ...`: arguments of JSON text
# holding JSON text), whatever its value, so the text is walked and the value goes whole (the rules over the text as
# written left `\"password\": 2.5}` invalid JSON once redacted, read a value only up to its first escape, and refuse
# values that start with punctuation or look like placeholders, `;lFCc...`, `/Xq7...`: fine in free text, stored in
# clear as a model's arguments; QA); and the name as an item of a validation error's `loc`, whose `input` is that
# field's value (`["password", 0]`). A match starting inside a string value runs to the value's closing quote, which
# is never followed by `:`.
# What `is_secret_name()` strips after a name, as JSON text writes it at any depth of JSON in strings (`\\\\n`,
# `\\ufffd`) or not escaped (`ensure_ascii=False`; a lone surrogate is the `?` of `json_may_need_redaction`'s
# encoding): `"Password "`, a spreadsheet's header, and `"password\ufffd"`, a NUL a turn mended, were stored in clear
# (QA).
_NAME_TRAIL = r'(?:[\p{Cc}\p{Cf}\p{Zs}\p{Zl}\p{Zp}\p{Mn}\p{Me}\x{fffd}?]|\\+(?:[nrtbf]|u[0-9a-fA-F]{4}))*'
_JSON_NAME_END = _SECRET_NAME_END.replace('(?:^|[^a-z])', '[^a-z]') + _NAME_TRAIL
_JSON_SECRET_KEY = (
    _JSON_NAME_END
    + r'(?:"\s*:|(?:\\\\)*\\"\s*:)'
    + r'|"(?:[^"\\]|\\.)*\\.(?:[^"\\]|\\.)*"\s*:|"loc"\s*:\s*\[[^\]]*'
    + _JSON_NAME_END
    + '"'
)
# A private key's armour line as an item of a JSON list (a key as a list of its lines, cut off before its END line:
# the rules read each string alone; `_list_items`).
_PEM_BEGIN_ITEM = r'(?-i:PRIVATE KEY(?: BLOCK)? ?-{4,5})\s*(?:\\\\)*\\?"\s*,'
# All in one scan (RE2: linear, whatever the text): JSON text the rules cannot be trusted to read whole.
_WORTH_DECODING = re2.compile((_JSON_SECRET_KEY + '|' + _HIDING_ESCAPE + '|' + _PEM_BEGIN_ITEM).encode())
# A secret-named key of JSON text inside a string (`\\"password\\": [`) whose value is a list or an object, for text
# that does not parse; the tokens that find where a value ends (strings skipped whole); what `cut_off_json` reads.
_CONTAINER_UNDER_SECRET_NAME = re2.compile((_JSON_NAME_END + r'\\"\s*:\s*[\[{]').encode())
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]')
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?')  # a string, or one cut off at the text's end
_KEY_COLON = re.compile(r'\s*:\s*')
_SCALAR = re.compile(r'[^,}\]\s]*')
_NOT_SECRETS = frozenset({'null', 'true', 'false', '""'})
_QUOTED = f'"{REDACTED}"'
_CUT_OFF = object()  # `_json_to_decode`'s answer for JSON text worth decoding that cannot be parsed
_INVISIBLE = frozenset(('Cc', 'Cf', 'Cs', 'Zs', 'Zl', 'Zp', 'Mn', 'Me'))
"""Unicode categories of what may sit unseen beside a key's name: controls, format characters (zero-width space,
BOM, direction marks), spaces (NBSP), line and paragraph separators, combining marks, lone surrogates."""
_AUTH_SCHEME = re.compile(r'(?i)((?:basic|bearer|token|digest)[ \t]+)\S')


MAX_JSON_IN_STRING_DEPTH = 4
"""Levels of JSON text in strings decoded and walked in turn (`_Walker.leaf`, `_Walker.cut_off_json`): deeper ones are
read by the rules as text. Each level reads its whole text again, so a hostile nesting cost its depth times its size."""


_JSON_TEXT_START = re.compile(r'(?:\s|\\[nrt])*[\[{]')
"""A string's text that starts as JSON text does (blanks, escaped or not, then `[` or `{`)."""


def _redact_inside_strings(text: str) -> tuple[str, int]:
    """`redact_text()` on JSON text, keeping only the replacements that lie inside one of its strings, and not inside
    a string that holds JSON text itself: the walk read that one at its own level, where a replacement across its
    structure was dropped (kept here, `"password":null},[2,3]` one level down was cut all the same; QA)."""
    spans = _spans(text)
    if not spans:
        return text, 0
    strings = [(m.start() + 1, m.end() - 1) for m in _JSON_STRING.finditer(text)]
    pieces, last, kept, at = [], 0, 0, 0
    for span in spans:
        start, end = span >> START, (span >> END) & OFFSET_MASK
        while at < len(strings) and strings[at][1] < end:
            at += 1
        if at < len(strings) and strings[at][0] <= start and not _JSON_TEXT_START.match(text, strings[at][0]):
            pieces += [text[last:start], REDACTED]
            last, kept = end, kept + 1
    return (''.join(pieces) + text[last:], kept) if kept else (text, 0)


def _strictly_decoded(token: str) -> str | None:
    """A JSON string token's text, decoded (one cut off at the text's end closed first); None when it cannot be."""
    closed = token if len(token) > 1 and token.endswith('"') and not token.endswith('\\"') else token + '"'
    try:
        decoded = json.loads(closed)
    except ValueError:
        return None
    return decoded if isinstance(decoded, str) else None


def is_secret_name(name: str) -> bool:
    """Whether a key with this name holds a secret: `password`, `api_key`, `client_secret`, `Authorization`,
    `x-auth-token`, `DB_PASSWORD`, `accessToken`, ... but not `max_tokens`, `token_count` or `primary_key`."""
    # Control characters after the name (`"password\u0000"` of a model's arguments) hid it, and so did U+FFFD (what a
    # turn makes of a NUL or a lone surrogate in a tool's result) or a zero-width space (QA); `_NAME_TRAIL` is the same
    # for JSON text.
    return _SECRET_NAME.search(_bare_name(name[-80:])) is not None


def _bare_name(name: str) -> str:
    """`name` without the invisible characters (`_INVISIBLE`, U+FFFD) at either end."""
    end = len(name)
    while end and (name[end - 1] == '\ufffd' or unicodedata.category(name[end - 1]) in _INVISIBLE):
        end -= 1
    start = 0
    while start < end and (name[start] == '\ufffd' or unicodedata.category(name[start]) in _INVISIBLE):
        start += 1
    return name[start:end]


def json_may_need_redaction(text: str) -> bool:
    """Whether `redact_value()` may change the value `text` is the JSON of (`json.dumps`, any separators).

    False means it would not: the rules find no secret in the text (they read JSON text, escapes included) and no
    key names a secret. One scan in RE2 and C, about 15 times faster than walking the value in Python, so a caller
    can store the JSON as it is in the common case and walk the value only when this says it may hold a secret.
    """
    data = text.encode('utf-8', errors='replace')
    return _WORTH_DECODING.search(data) is not None or has_secret(data) or holds_configured_secret(data)


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
    such a key every such item is replaced, and so is every value of a dict under it. Other types
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

    def __init__(self, depth: int = 0) -> None:
        self.count = 0
        self.depth = depth
        """How many levels of JSON text in strings this walk is inside."""

    def leaf(self, value: Any, secret: bool) -> Any:
        if secret:
            replaced, n = _redact_scalar(value)
            if n:
                self.count += n
                return replaced
        if isinstance(value, str):
            # JSON text in strings is decoded a few levels deep: each level reads its whole text again (QA).
            decoded = _json_to_decode(value) if self.depth < MAX_JSON_IN_STRING_DEPTH else None
            if decoded is _CUT_OFF:  # JSON text that does not parse (a model's arguments cut off): no tree to walk
                value = self.containers_under_secret_names(self.cut_off_json(value))
            elif decoded is not None:  # JSON text the rules cannot read whole: read as the tool does, then walked
                walked, n = _Walker(self.depth + 1).walk(decoded)
                text = json.dumps(walked, ensure_ascii=False) if n else value
                # Then the rules over the text as written, for what they read across its strings (a label in one, the
                # AWS key in the next: the walk reads each alone; QA), kept where it lies inside a string: across its
                # structure (`"password":null},[2,3]` taken for a value) one left invalid JSON, data lost (QA).
                redacted, found = _redact_inside_strings(text)
                self.count += n + found
                return redacted
            redacted, n = redact_text(value)
            self.count += n
            return redacted
        return value

    def cut_off_json(self, text: str) -> str:
        """JSON text that does not parse, read token by token as a walk reads a value: the value of a secret-named key
        (its name decoded: `pass\\u0077ord`) replaced whole, a string, a number or a list or an object up to its
        close (or the text's end where it never closes), and each string with an escape decoded for the rules
        (`password:\\thunter2`), written back as JSON when they redact it. The arguments of a model's answer cut off
        at its output limit kept what the escapes hid, and `{"password": ["hunter2", ...` whole (QA)."""
        pieces, last, at = [], 0, 0
        while (token := _JSON_STRING.search(text, at)) is not None:
            at = token.end()
            colon = _KEY_COLON.match(text, at)
            if colon is not None:  # a key
                if not is_secret_name(_decoded(token.group())):
                    at = colon.end()
                    continue
                start = colon.end()
                end = _value_end(text, start)
                if end > start and not text.startswith(_QUOTED, start) and text[start:end] not in _NOT_SECRETS:
                    # Quoted: JSON nested past Python's parser comes here too, and stays JSON (QA).
                    pieces += [text[last:start], _QUOTED]
                    last = end
                    self.count += 1
                at = max(end, at)
            elif '\\' in token.group():  # a string value with an escape: the rules read it decoded
                decoded = _strictly_decoded(token.group())
                found = self.count
                if decoded is not None and self.depth < MAX_JSON_IN_STRING_DEPTH:
                    # As a walk reads a leaf: JSON text in it decoded and walked in turn (the rules alone kept a
                    # secret-named value of it whole; QA). Only a string that decodes, a few levels deep: one with a
                    # broken escape read raw, level after level, hit the recursion limit on 7 KB (QA).
                    inner = _Walker(self.depth + 1)
                    redacted = inner.leaf(decoded, False)
                    self.count += inner.count
                else:
                    redacted, n = redact_text(_decoded(token.group()))
                    self.count += n
                if self.count > found:
                    pieces += [text[last : token.start()], json.dumps(redacted, ensure_ascii=False)]
                    last = token.end()
        return ''.join(pieces) + text[last:] if pieces else text

    def containers_under_secret_names(self, text: str) -> str:
        """`text` with every list or object under a secret-named key of JSON text inside a string (`\\"password\\": [`)
        replaced up to its close, or to the end of the text where it never closes (`cut_off_json` reads the text's
        own keys)."""
        pieces, last = [], 0
        for start in _byte_ends_as_char_offsets(text, _CONTAINER_UNDER_SECRET_NAME):
            start -= 1  # the opening bracket
            if start < last:  # inside a container already replaced
                continue
            pieces += [text[last:start], REDACTED]
            last = _container_end(text, start)
            self.count += 1
        return ''.join(pieces) + text[last:] if pieces else text

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
            quoted = _quotes_a_secret(container)
            items = (
                (k, v, secret or (isinstance(k, str) and (is_secret_name(k) or (quoted and k == 'input'))))
                for k, v in container.items()
            )
            return _Frame(container, iter(items), {}, key_in_parent)
        return _Frame(container, _list_items(container, secret), [], key_in_parent)

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
                # Under a secret-named key, everything inherits the secrecy: a list's items, a dict's values (`secret:
                # {"db": "..."}` was stored whole; QA); elsewhere a dict's own keys decide.
                stack.append(self.frame(child, secret, key))
                continue
            _put(frame.out, key, self.leaf(child, secret))


_PEM_BEGIN = re.compile(r'BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)? ?-{4,5}\s*$')
_PEM_END = re.compile(r'-{4,5} ?END [A-Z0-9 ]{0,40}PRIVATE KEY')


def _list_items(items: list[Any] | tuple[Any, ...], secret: bool) -> Iterator[tuple[None, Any, bool]]:
    """A list's items for the walk: those after an item that ends with a private key's armour line, up to the END
    line's (at most `PEM_BODY_MAX` characters of them), are secrets (a key given as a list of its lines: each line is
    a string of its own, which the rules read alone)."""
    body = -1  # characters of a key's body seen so far; -1 outside one
    for item in items:
        if not isinstance(item, str):
            body = -1
        elif body >= 0 and not _PEM_END.search(item[:80]) and body + len(item) <= PEM_BODY_MAX:
            body += len(item)
            yield None, item, True
            continue
        else:
            body = 0 if _PEM_BEGIN.search(item[-80:]) else -1
        yield None, item, secret


def _json_to_decode(text: str) -> Any:
    """The object or array `text` is the JSON of, when the rules cannot read it whole: an escape in it may hide a
    secret, or a key names a secret whose value is no string (`"password": ["..."]`, which the rules' `key: "value"`
    does not cover); `_CUT_OFF` when such text cannot be parsed; else None."""
    if text.lstrip()[:1] not in ('{', '['):  # JSON may start with whitespace (`\n{...}`): its secrets were kept (QA)
        return None
    data = text.encode('utf-8', 'replace')
    if _WORTH_DECODING.search(data) is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # cut off, only looking like JSON, or nested past what Python's parser takes
        return _CUT_OFF


def _byte_ends_as_char_offsets(text: str, pattern: Any) -> Iterator[int]:
    """Where each match of the RE2 bytes `pattern` in `text` ends, as a character offset of `text` (RE2 scans the
    UTF-8 bytes in linear time; Python's `re` took 0.7 s for 4 MB of this name pattern)."""
    data = text.encode('utf-8', 'surrogatepass')
    if len(data) == len(text):  # ASCII: bytes and characters are the same offsets
        yield from (match.end() for match in pattern.finditer(data))
        return
    chars, done = 0, 0
    for match in pattern.finditer(data):
        chars += len(data[done : match.end()].decode('utf-8', 'surrogatepass'))
        done = match.end()
        yield chars


def _decoded(token: str) -> str:
    """A JSON string token's text, decoded (one cut off at the text's end closed first); as written when it cannot
    be (an escape broken by the cut)."""
    decoded = _strictly_decoded(token)
    return token.strip('"') if decoded is None else decoded


def _value_end(text: str, start: int) -> int:
    """Where the JSON value starting at `text[start]` ends: a container at its close, a string after its quote, a
    number or a literal before the next `,`, `}`, `]` or space; the end of `text` for one cut off."""
    if start >= len(text):
        return start
    if text[start] in '[{':
        return _container_end(text, start)
    if text[start] == '"':
        string = _JSON_STRING.match(text, start)
        return string.end() if string is not None else len(text)
    scalar = _SCALAR.match(text, start)
    return scalar.end() if scalar is not None else start


def _container_end(text: str, start: int) -> int:
    """Where the list or object opening at `text[start]` ends (after its closing bracket), strings and their escapes
    skipped; the end of `text` when it never closes."""
    depth = 0
    for token in _JSON_TOKEN.finditer(text, start):
        bracket = token.group()
        if bracket in '[{':
            depth += 1
        elif bracket in ']}':
            depth -= 1
            if not depth:
                return token.end()
    return len(text)


def _quotes_a_secret(error: dict[Any, Any]) -> bool:
    """Whether `error` is a validation error (pydantic's) of a secret-named field, whose `input` is its value."""
    loc = error.get('loc') if 'input' in error else None
    # Anywhere in it: an item of a secret-named list (`["password", 0]`; QA) is its value too.
    return isinstance(loc, list | tuple) and any(isinstance(part, str) and is_secret_name(part) for part in loc)


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
