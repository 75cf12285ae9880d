"""The checks redaction rules name (`check = '...'` in `redaction_rules.toml`): each runs on a candidate after RE2
matched it, and accepts it (the span to replace) or refuses it (code, a placeholder, a word), with bounded work each.
`agentrt.services.ledger.redaction` loads the rules and runs them."""

from __future__ import annotations

import base64
import binascii
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

Span = tuple[int, int]


@dataclass(slots=True)
class Candidate:
    """A secret a rule's pattern matched, for its check to accept (returning the span to replace) or refuse."""

    data: bytes
    spans: list[Span]  # of every group of the match, (-1, -1) where a group did not take part
    groups: dict[str, int]  # the rule's group indexes by name
    group: int  # index of the group holding the secret
    start: int
    end: int

    @property
    def value(self) -> bytes:
        return self.data[self.start : self.end]


Check = Callable[[Candidate], 'Span | None']

_PLACEHOLDER_SHAPES = (
    rb'\[REDACTED|\$\{|\$\(|\{\{|\{%|\{[\w.]*\}$|<[^>]*>|%[sdr]|%\(|\?+$|[*x.\-_#]+$|#[0-9a-f]{3,8}$|\$[0-9]+$'
    rb'|(?-i:\$[A-Z_][A-Z0-9_]*)$|:[a-z_]+$|(?:null|none|nil|undefined|true|false|yes|no|on|off|empty|redacted)$'
)
"""Values that stand for a secret rather than being one: templates, bind parameters, masks, null-ish words."""
_PLACEHOLDER = re.compile(rb'(?i:' + _PLACEHOLDER_SHAPES + rb')')
_CONSTANT = re.compile(rb'_?[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$|[A-Z_]+$')
"""`API_KEY`, `TOKEN`: a bare upper-case name is a constant or an environment variable, not a value."""
_NAME = re.compile(rb'_?[A-Z]+(?:_[A-Z]+)+$')
"""`"OPENAI_API_KEY"`: a quoted name of an environment variable (a quoted `"HUNTER"` stays a secret)."""
_TYPE_NAME = re.compile(rb'_?(?:[A-Z]+[a-z]{2,}){2,}$')
"""`SessionClientSecret`, `UserToken`: a type annotation (`client_secret: ClientSecret`), not a password."""
_TYPE_OR_KEYWORD = frozenset(
    b'str string bytes int integer bool boolean any optional secretstr secretbytes text varchar char object '
    b'await new this self function lambda async yield not typeof input getpass required'.split()
)
_CODE_PATH = re.compile(rb'[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][A-Za-z_$]*)+$|[A-Za-z_$][\w$.]*[(\[]')
_IDENTIFIER = re.compile(rb'[A-Za-z_]+$')
_DOTTED = re.compile(rb'[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$')
_PATH = re.compile(rb'(?:~|\.{1,2})?/[\w./-]*$|[a-z][a-z0-9+.-]*://')
"""A file path or a URL (whose own password, if any, the url-password rule handles)."""
_NOT_A_BARE_VALUE = re.compile(b'|'.join([_PLACEHOLDER.pattern, *(p.pattern for p in (_PATH, _CODE_PATH, _CONSTANT))]))
"""A placeholder, a path, code or a constant: one match for all the shapes a bare value is not a secret in."""
_SYMBOLS = frozenset(b'!@#$%^&+=/?~|')  # not `*`: markdown emphasis
_DIGITS = frozenset(b'0123456789')
_UPPER = frozenset(b'ABCDEFGHIJKLMNOPQRSTUVWXYZ')
_LOWER = frozenset(b'abcdefghijklmnopqrstuvwxyz')
_IDENT = frozenset(b'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-')
_LINE_LEAD = frozenset(b' \t"\'`*>-')
JSON_STRUCTURE = frozenset(b' \t\r\n:,]}')
BOUND = 64
_SHAPE_MAX = 256
"""Longest value the Python-side shape checks (placeholders, code, constants) look at."""
"""How far checks look around a candidate: a constant, so the Python work per match stays bounded."""


def _has_digit(c: Candidate) -> Span | None:
    return (c.start, c.end) if _DIGITS.intersection(c.value) else None


def _credential_like(value: bytes) -> bool:
    """A digit, a symbol, or a length no word has: what a password or key has and a word of prose does not."""
    chars = set(value)
    return bool(chars & _DIGITS or chars & _SYMBOLS or len(value) >= 24)


def _credential_like_check(c: Candidate) -> Span | None:
    return (c.start, c.end) if _credential_like(c.value) else None


_COLUMN_TYPES = (
    rb'var(?:char|binary)|n?(?:var)?char(?:acter)?(?: varying)?|binary|bit(?: varying)?|string|text|bytes|blob'
    rb'|numeric|decimal|number|float|double|real|u?int(?:eger)?[0-9]*|(?:tiny|small|medium|big)int|serial[0-9]*'
    rb'|timestamp(?:tz)?|time(?:tz)?|datetime[0-9]*|date|interval|uuid|bytea|jsonb?|bool(?:ean)?|money|inet|cidr'
)
"""Column types (SQL's, an ORM's) a schema table lists under a secret-named field, with or without a length."""
_TABLE_NOT_A_SECRET = re.compile(
    rb'(?i:(?:' + _COLUMN_TYPES + rb')(?:\s*\(\s*[0-9]+(?:\s*,\s*[0-9]+)?\s*\))?(?:\[\])?)'  # varchar(255), int4
    rb'|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+\(.*\)'  # a dotted call: os.urandom(32), secrets.token_hex(16)
    rb'|[A-Za-z_][\w.]*\((?:\)|\s*[A-Za-z_]\w*\s*=.*\)|\s*[A-Za-z_][\w.]*\(.*\))'  # f(), f(cost=12), f(g(64))
    rb'|\$?[0-9.,:/ +-]+'  # a number, a price, a date, a range
    rb'|[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?(?:Z|[+-][0-9]{2}:?[0-9]{2})?'
    rb'|[a-z][a-z0-9+.-]*://\S*'  # a URL (a password in it is the url-password rule's)
    rb'|id_(?:rsa|dsa|ecdsa|ed25519)(?:[_-]sk)?(?:\.pub)?|[\w.-]+\.(?:pem|key|pub|ppk|p12|pfx|jks|crt|cer|der|asc|gpg)'
    rb'|\$(?:[a-z_][a-z0-9_]*|[A-Z_][A-Z0-9_]*|\{[^}]*\}|\([^)]*\))'  # a shell variable: $password, ${DB_PASS}
    rb'|(?i:n/a)'
    # Short technical terms a settings table names in a secret's row (QA: `| token | HS256 |`, `| password |
    # SHA-256 |`, `| token | 24h |`, `| secret | 256-bit |` lost their cells): algorithms, durations, sizes,
    # encodings and standards, versions and model names, percentages and prices per period.
    rb'|(?i:[HRE]S(?:256|384|512)|PS(?:256|384|512)|EdDSA|(?:HMAC-?)?SHA-?(?:1|224|256|384|512|3(?:-(?:256|512))?)'
    rb'|AES(?:-?(?:128|192|256))?(?:-(?:GCM|CBC|CTR))?|(?:3)?DES|MD5|RSA(?:-?(?:2048|3072|4096))?|ECDSA|Ed25519'
    rb'|bcrypt|scrypt|argon2(?:id|i|d)?|PBKDF2(?:-SHA(?:1|256|512))?|x\.?509|PKCS ?#?(?:1|7|8|10|11|12)'
    rb'|[0-9]+(?:\.[0-9]+)? ?(?:ms|s|sec|secs|m|min|mins|h|hr|hrs|d|days?|w|wk|weeks?|mo|months?|y|yrs?|years?)'
    rb'|[0-9]+-(?:second|minute|hour|day|week|month|year)s?'
    rb'|[0-9]+[ -]?(?:bits?|bytes?|chars?|characters?|digits?|[KMGT]i?B)|[0-9]+%'
    rb'|UTF-?(?:8|16|32)|Base(?:16|32|58|64)(?:url)?|ASCII|Latin-?1|hex|OAuth ?2?(?:\.[01])?|OIDC|SAML ?2?'
    rb'|IPv[46]|[0-9]FA|MFA(?:/2FA)?|K8s|TLS ?1\.[0-3]|mTLS|JWT|JWE|JWS|v?[0-9]+(?:\.[0-9]+){1,3}'
    rb'|gpt-[0-9][\w.-]*|o[1-4](?:-mini)?|claude-[\w.-]+|gemini-[\w.-]+)'
    rb'|\$[0-9]+(?:\.[0-9]+)?/(?:mo|month|yr|year|day|user|seat)'
)
"""The cells of a secret-named row that are plainly no credential: column types, code (a library call, a call with
no or keyword arguments, or a call in it: `uuid_generate_v4()`, `bcrypt(cost=12)`, `Column(String(64))`), numbers,
dates and timestamps, URLs, key files' names, variables, `n/a` (placeholders and masks: `_is_placeholder`)."""
_TABLE_PATH = re.compile(rb'(?:~[\w.-]*|\.{1,2})?(?:/[\w.-]+)+/?')
_RANDOM_SEGMENT = re.compile(rb'(?=[^/]*[A-Z])(?=[^/]*[a-z])(?=[^/]*[0-9])[^/]{8,}')
_COUNTED_TOKEN = re.compile(
    rb'(?i)(?:input|output|prompt|completion|cached?|max|min|total|reasoning|per|context)[ _.-]*tokens?$'
)
"""A row that counts or prices a model's tokens (`| input token | 0.0002 |`), not a credential's name."""


def _table_path(value: bytes) -> bool:
    """A file path (`/home/user`, `~/.ssh/id_rsa`): none of its segments random-looking, since a base64 secret starts
    with `/` once in 64 (`/aB3kL9mQ2xY7pR4zT8w`)."""
    if _TABLE_PATH.fullmatch(value) is None:
        return False
    return not any(_RANDOM_SEGMENT.fullmatch(segment) for segment in value.split(b'/'))


def _table_constant(value: bytes) -> bool:
    """An environment variable's or a constant's name (`SECRET_KEY_2`, `DB_PASSWORD`): upper case, with two words of
    letters (`ABC_123` may be a password)."""
    if _CONSTANT.match(value) is None:
        return False
    return sum(1 for word in value.split(b'_') if word[:2].isalpha()) >= 2


def _table_secret(c: Candidate) -> Span | None:
    """A Markdown table's value in a secret-named row, unless it is plainly no credential: a word (not
    `_credential_like`), a placeholder or mask, a column type, code, a number, a date, a URL, a path, a key file's
    name, a variable or a constant (`_TABLE_NOT_A_SECRET`, `_table_path`, `_table_constant`): schema and pricing
    tables (`| password | varchar(255) |`, `| token | uuid_generate_v4() |`, `| token | 0.0002 |`) lost their cells
    (QA). A short value is still a password (`| password | hunter2 |`), and so is one starting with `/`, `~` or `$` or
    shaped like a call (`$ecretP4ss!`, `/aB3kL9mQ2xY7pR4zT8w`, `Hunter(2024)`); only a row counting a model's tokens
    (`| input token | 1,024 |`) needs 8 characters."""
    value = c.value
    if len(value) > _SHAPE_MAX:
        return c.start, c.end
    if _too_short(value) or not _credential_like(value) or _is_placeholder(value):
        return None
    if _TABLE_NOT_A_SECRET.fullmatch(value) or _table_path(value) or _table_constant(value):
        return None
    name_start, name_end = c.spans[c.groups['name']]
    if len(value) < 8 and _COUNTED_TOKEN.search(c.data[name_start:name_end]):
        return None
    return c.start, c.end


def _random_looking(c: Candidate) -> Span | None:
    """Upper and lower case letters and a digit: random keys of 32+ characters nearly always have all three;
    paths, words, hex digests and version strings rarely do. `K8S = Attributes.K8S_POD_UID`, `X = Cls2(...)` are
    code."""
    value = c.value
    chars = set(value)
    if not (chars & _UPPER and chars & _LOWER and chars & _DIGITS) or _DOTTED.match(value[: _SHAPE_MAX + 1]):
        return None
    if c.data[c.end : c.end + 1] in (b'(', b'['):  # `NAME = SomeClass2(...)`
        return None
    head = value[:BOUND]
    runs = sum(1 for a, b in itertools.pairwise(head) if b == a + 1)
    return None if runs * 3 > len(head) else (c.start, c.end)  # `ABCDEFGH...0123456789`: an alphabet, not a key


def _basic_credentials(c: Candidate) -> Span | None:
    """`Basic <base64>` is a credential when the base64 decodes to `user:password`, which spares "basic text"."""
    value = c.value
    try:
        decoded = base64.b64decode(value + b'=' * (-len(value) % 4), validate=True).decode('utf-8')
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return (c.start, c.end) if decoded.find(':') > 0 and decoded.isprintable() else None


def _not_placeholder(c: Candidate) -> Span | None:
    value = c.value
    return None if _too_short(value) or _is_placeholder(value) else (c.start, c.end)


_SQL_KEYWORDS = frozenset(b'values password random externally globally'.split())
"""What follows Oracle's or MySQL's IDENTIFIED BY and is no password: `BY VALUES '...'`, `BY RANDOM PASSWORD`."""


def _sql_password(c: Candidate) -> Span | None:
    """A SQL statement's password unless it is a placeholder (or, bare after IDENTIFIED BY, a keyword); in prose after
    a user or role (`The user bob has password 'S3cretPass!' now.`) only when it also looks like a credential: "the
    user's password 'must' be changed" holds none."""
    if c.group == c.groups['secret_prose'] and not _credential_like(c.value):
        return None
    if c.group == c.groups['secret_bare'] and c.value.lower() in _SQL_KEYWORDS:
        return None
    return _not_placeholder(c)


def _is_placeholder(value: bytes) -> bool:
    return len(value) <= _SHAPE_MAX and _PLACEHOLDER.match(value) is not None


def _shaped(pattern: re.Pattern[bytes], value: bytes) -> bool:
    """Whether a short value has a shape (code, type name, constant); a long one never has: a long value after a
    secret name is a secret, and the Python regexes never see more than `_SHAPE_MAX` characters."""
    return len(value) <= _SHAPE_MAX and pattern.match(value) is not None


def _url_password(c: Candidate) -> Span | None:
    value = c.value
    if re.match(rb'[0-9]{1,5}(?:/|$)', value):  # http://host:8000/@user: a port and a path, not a password
        return None
    return _not_placeholder(c)


def _too_short(value: bytes) -> bool:
    """Fewer than 3 characters (not bytes: a lone emoji is 4 bytes) is no secret worth a redaction."""
    return len(value) < 3 or (len(value) < 12 and len(value.decode('utf-8', errors='replace')) < 3)


def _name_before(data: bytes, at: int) -> bytes:
    """The key name (identifier characters, at most `BOUND`) that ends before `at`, skipping its closing quote."""
    end = at
    while end > 0 and at - end < 4 and data[end - 1] in b'"\'`]\\':
        end -= 1
    start, floor = end, max(0, end - BOUND)
    while start > floor and data[start - 1] in _IDENT:
        start -= 1
    return data[start:end]


def _starts_line(data: bytes, at: int) -> bool:
    """Whether only a key name and indentation/quotes/bullets stand between `at` and the start of its line."""
    i, floor = at, max(0, at - BOUND)
    while i > floor and data[i - 1] in _IDENT:
        i -= 1
    floor = max(0, i - 16)
    while i > floor and data[i - 1] in _LINE_LEAD:
        i -= 1
    return i == 0 or data[i - 1] in b'\r\n' or (i >= 2 and data[i - 2] == 92 and data[i - 1] in b'nr')


def _ends_line(data: bytes, at: int) -> bool:
    """Whether the value ending at `at` is the last thing on its line (YAML `password: letmein`); a newline may be
    escaped any number of times (`\\n` in JSON text, `\\\\n` in JSON inside JSON or in a Python repr of it)."""
    i, ceiling = at, min(len(data), at + 16)
    while i < ceiling and data[i] in b' \t':
        i += 1
    if i == len(data) or data[i] in b'\r\n;}':
        return True
    j = i
    while j < i + 16 and data[j : j + 1] == b'\\':
        j += 1
    return j > i and data[j : j + 1] in (b'n', b'r')


_NEXT_PAIR = re.compile(rb'[,;&](?=\s|[\w.-]+[:=]|$)')


def _cut_bare(value: bytes) -> bytes:
    """A bare value ends where `,` `;` `&` start the next pair (`?password=abc&next=/`, `Password=abc;Host=db`) or
    end the value, but a password may contain them (`password=Tr0ub4dor&3`)."""
    cut = _NEXT_PAIR.search(value)
    return _trim_closers(value[: cut.start()] if cut else value)


def _trim_closers(value: bytes) -> bytes:
    """Drop trailing punctuation and closing brackets the value did not open: `{token: abc}`, `f(password=abc)`,
    `def f(pwd=None):` and `the password=hunter2.` end before them. At most `BOUND` characters go."""
    if not value or value[-1] not in b'.,;:)]}':
        return value
    unmatched = {close: value.count(close) - value.count(_OPENER[close]) for close in _OPENER}
    end, floor = len(value), max(0, len(value) - BOUND)
    while end > floor:
        last = value[end - 1]
        if last in b'.,;:':
            end -= 1
        elif last in unmatched and unmatched[last] > 0:
            unmatched[last] -= 1
            end -= 1
        else:
            break
    return value[:end]


_OPENER = {ord(')'): ord('('), ord(']'): ord('['), ord('}'): ord('{')}


def _secret_assignment(c: Candidate) -> Span | None:
    """The value of a secret-named key, unless it is code, a placeholder or prose.

    Quoted values are secrets unless they are placeholders, constants or the gap between two string literals.
    Bare values are secrets after `=` unless they are code (a call, an index, an attribute path, a constant, a
    variable passed on) or a path; after `:` they must also look like a credential or stand alone at the end of a
    line that starts with the key (YAML, HTTP headers), and not be a type name; after `is` they must look like a
    credential.
    """
    value = c.value
    sep_start, sep_end = c.spans[c.groups['sep']]
    raw_sep = c.data[sep_start:sep_end]
    sep = raw_sep.strip()
    if c.group != c.groups['secret_bare']:
        return (c.start, c.end) if _quoted_secret(c, value, sep, sep_start) else None
    value = _cut_bare(value)
    end = c.start + len(value)
    if _too_short(value) or _shaped(_NOT_A_BARE_VALUE, value) or sep == b'==':  # `==`: a comparison is code
        return None
    if value.lower() in _TYPE_OR_KEYWORD or (raw_sep != sep and value.isdigit()):  # `OPTION_TOKEN = 1256`
        return None
    variable = _shaped(_IDENTIFIER, value)
    if variable and _name_before(c.data, sep_start).lower().endswith(value.lower()):
        return None  # `password=password`, `identity_token=identity_token`: passing a variable on
    if sep.startswith(b'=') or sep in (b':=', b'=>'):
        # `x = name` with spaces is code reading a variable, and so is `f(pwd=pwd)`; `.env` lines and URL pairs
        # have no spaces, and passwords in INI files usually have a digit or symbol.
        if variable and (raw_sep != sep or c.data[end : end + 1] in (b')', b',')):
            return None
        return c.start, end
    if sep.startswith(b':'):
        if _shaped(_TYPE_NAME, value):
            return None
        if _credential_like(value) or (_ends_line(c.data, end) and _starts_line(c.data, sep_start)):
            return c.start, end
        return None
    return (c.start, end) if _credential_like(value) else None  # `is` / `was`


def _quoted_secret(c: Candidate, value: bytes, sep: bytes, sep_start: int) -> bool:
    if _too_short(value):
        return False
    # A value that starts or ends with a space or an operator is the gap between two string literals
    # (`"Password: " + pw`, `"Basic " + b64`), and one that names the key is a constant (`SECRET = "secret"`).
    if value[:1] in b' \t)],;+' or value[-1:] in b' \t' or _is_placeholder(value):
        return False
    if _shaped(_NAME, value) or _shaped(_PATH, value):
        return False
    if _name_before(c.data, sep_start).lower().endswith(value.lower()):
        return False
    if c.group == c.groups['secret_bt'] and not _credential_like(value):  # markdown `code`, JS `template`
        return False
    return sep != b'==' or (len(value) >= 6 and _credential_like(value))  # not `if token == "lambda":`


def _not_code(c: Candidate) -> Span | None:
    """Real signatures have digits; `signature=block.signature` and `sig=obj.data` are code."""
    value = c.value
    if _shaped(_CODE_PATH, value) or not _DIGITS.intersection(value):
        return None
    return c.start, c.end


PEM_BODY_MAX = 64 << 10
"""The most of a private key's body replaced up to its END line (a 4096-bit key in PEM is about 3.3 KB)."""
_KEY_RUN = re.compile(rb'(?:[A-Za-z0-9+/=\s:,.()_>#|*\x00]|\xe2\x80[\xa8\xa9]|\xef\xbf\xbd|-[A-Za-z0-9]|\\+[nrt])+')


_BASE64_LINE = re.compile(
    rb'[A-Za-z0-9+/]{40,}'  # a PEM body's line (64 characters; an encrypted key's headers are followed by them too)
    rb'|MII[A-Za-z0-9+/]{8,}'  # the start of a DER key's base64 (an ASN.1 sequence), whatever the lines' length
    rb'|MII[A-Za-z0-9+/]{0,4}(?:[ \t]+[A-Za-z0-9+/]{4}){3,}'  # the same in groups of 4: MIIE pAIB AAKC AQEA
    rb'|(?:[0-9A-Fa-f]{2}[: \t]){12,}[0-9A-Fa-f]{2}'  # a key's bytes in hex: 30:77:02:01:01:04:20:6b:...
    rb'|Proc-Type:[ \t]*4,|DEK-Info:[ \t]*[A-Z0-9-]+,'  # an encrypted key's headers (not prose naming them)
    # a random-looking line of its own (or a string literal's): short lines of a key; an identifier in code between
    # the armour lines (`x509.ParsePKCS8PrivateKey(`, `+ base64Encoded +`) is not
    rb'|(?:(?:^|(?<=[\r\n])|(?<=\\[nr])|(?<=\xe2\x80[\xa8\xa9]))[ \t>#*|0-9.:-]*|")'
    rb'(?=[A-Za-z0-9+/]*[A-Z])(?=[A-Za-z0-9+/]*[a-z])(?=[A-Za-z0-9+/]*[0-9])[A-Za-z0-9+/]{12,}={0,2}'
    rb'(?=[ \t]*(?:["\',\]\\\r\n]|\xe2\x80[\xa8\xa9]|$))',
    re.MULTILINE,
)
"""What a key's body holds and prose or code between two armour lines does not."""


def _pem_body(c: Candidate) -> Span | None:
    """A private key's body: up to its END line when that is at most `PEM_BODY_MAX` away (an armour line mentioned in
    prose and an END line far below it), else the run of key characters, as for a key cut off; either only when it
    holds a run of base64 (`_BASE64_LINE`): code that tests for the BEGIN and END lines, or a how-to naming both,
    lost everything between them (QA)."""
    if c.end - c.start <= PEM_BODY_MAX:
        span = c.start, c.end
    else:
        run = _KEY_RUN.match(c.data, c.start, c.start + PEM_BODY_MAX)
        if run is None:
            return None
        span = c.start, run.end()
    return span if _BASE64_LINE.search(c.data, *span) is not None else None


CHECKS: dict[str, Check] = {
    'pem_body': _pem_body,
    'not_code': _not_code,
    'has_digit': _has_digit,
    'credential_like': _credential_like_check,
    'table_secret': _table_secret,
    'random_looking': _random_looking,
    'basic_credentials': _basic_credentials,
    'not_placeholder': _not_placeholder,
    'sql_password': _sql_password,
    'url_password': _url_password,
    'secret_assignment': _secret_assignment,
}


def entropy(value: bytes) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(value)
    total = len(value)
    return -sum(n / total * math.log2(n / total) for n in counts.values())
