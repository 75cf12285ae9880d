"""Redact secrets (API keys, bearer tokens, passwords in URLs and key=value pairs) before text is stored or logged."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

REDACTED = '[REDACTED]'

# Python's `re` scans at roughly 30-100 ns per character per pattern, too slow to run a dozen patterns
# over every stored prompt. So each pattern runs only when a C-speed substring check finds one of its
# triggers, and key=value secrets are found with `str.find` and matched anchored at each hit.
# Every replaced span keeps `"` and `\` out, so redacting JSON text (where quotes inside strings are
# escaped as `\"`) never breaks the JSON. Prefixes that say what the secret was are kept.


@dataclass(frozen=True, slots=True)
class _Rule:
    triggers: tuple[str, ...]
    """Substrings one of which must occur (in the original text, or lower-cased when `fold`)."""
    pattern: re.Pattern[str]
    replace: str | Callable[[re.Match[str]], str]
    fold: bool = False
    requires: str = ''
    """A character the text must contain for the rule to apply: a `memchr`-speed first check."""


_TOKEN_RULES: tuple[_Rule, ...] = (
    # OpenAI / Anthropic / DeepSeek-style keys: sk-..., sk-proj-..., sk-ant-api03-...
    _Rule(('sk-',), re.compile(r'\bsk-[A-Za-z0-9_\-]{16,}'), REDACTED, requires='-'),
    # Stripe-style live/test keys.
    _Rule(('_live_', '_test_'), re.compile(r'\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,}'), REDACTED, requires='_'),
    # GitHub, Slack, Hugging Face, Groq, Replicate and Logfire tokens.
    _Rule(
        ('ghp_', 'gho_', 'ghu_', 'ghs_', 'ghr_', 'github_pat_', 'xox', 'hf_', 'gsk_', 'r8_', 'pylf_'),
        re.compile(
            r'\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,}|xox[abposr]-[A-Za-z0-9\-]{10,}'
            r'|hf_[A-Za-z0-9]{30,}|gsk_[A-Za-z0-9]{40,}|r8_[A-Za-z0-9]{30,}|pylf_v\d_[A-Za-z0-9_]{20,})'
        ),
        REDACTED,
    ),
    # Google API keys and AWS access key ids.
    _Rule(('AIza', 'AKIA', 'ASIA'), re.compile(r'\b(?:AIza[0-9A-Za-z_\-]{35}|(?:AKIA|ASIA)[0-9A-Z]{16}\b)'), REDACTED),
    # JSON Web Tokens.
    _Rule(
        ('eyJ',), re.compile(r'\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}'), REDACTED, requires='.'
    ),
    # PEM private keys: the body only; the armour lines stay.
    _Rule(
        ('PRIVATE KEY',),
        re.compile(r'(?<=-----BEGIN )[A-Z ]*PRIVATE KEY-----[^-]+(?=-----END)'),
        REDACTED,
        requires='-',
    ),
    # `Bearer <token>`; a real token has a digit, which spares "bearer instruments".
    _Rule(
        ('bearer',),
        re.compile(r'\b(bearer\s+)(?=[A-Za-z\-._~+/]*[0-9])[A-Za-z0-9\-._~+/]{8,}=*', re.IGNORECASE),
        lambda m: f'{m.group(1)}{REDACTED}',
        fold=True,
    ),
    # `scheme://user:password@host`: keep the user, drop the password.
    _Rule(
        ('://',),
        re.compile(r'\b([a-z][a-z0-9+.\-]*://[^\s:/@"\\]*:)([^\s@/"\\]+)(@)', re.IGNORECASE),
        lambda m: f'{m.group(1)}{REDACTED}{m.group(3)}',
        requires=':',
    ),
)

# Names whose value is a secret. `token` also covers access_token, auth_token, refresh_token, x-auth-token.
_SECRET_NAMES = (
    'password',
    'passwd',
    'passphrase',
    'pwd',
    'secret',
    'apikey',
    'api_key',
    'api-key',
    'private_key',
    'private-key',
    'token',
    'authorization',
)
# After the name: an optional closing quote, `:` or `=`, then the value, quoted (up to the closing quote,
# so "two words" goes too) or bare (up to the next separator). An auth scheme before the value is kept.
_SEPARATOR = r'(?:\\*["\'])?\s*[:=]\s*'
_SCHEME = r'(?:(?:basic|bearer|token)\s+)?+'
_QUOTED_VALUE = re.compile(
    _SEPARATOR + r'\\*["\']' + _SCHEME + r'(?!\[REDACTED\])([^"\'\\\r\n]{1,256}+)(?=\\*["\'])', re.IGNORECASE
)
_BARE_VALUE = re.compile(
    _SEPARATOR + r'(?:\\*["\'])?+' + _SCHEME + r'(?!\[REDACTED\])([^\s"\'\\,;&}<>]{3,})', re.IGNORECASE
)


def redact(text: str) -> tuple[str, int]:
    """Replace secrets in `text` with `[REDACTED]`.

    Safe on JSON text: replaced spans never contain quotes or backslashes, so the result stays valid JSON.

    Args:
        text: any text: a prompt, a serialised message list, an error message.

    Returns:
        The redacted text and the number of secrets replaced.
    """
    lowered = _lower(text)
    count = 0
    for rule in _TOKEN_RULES:
        if rule.requires and rule.requires not in text:
            continue
        haystack = lowered if rule.fold else text
        if any(trigger in haystack for trigger in rule.triggers):
            text, n = rule.pattern.subn(rule.replace, text)
            count += n
            if n:
                lowered = _lower(text)
    spans = _secret_value_spans(text, lowered)
    if spans:
        pieces, last = [], 0
        for start, end in spans:
            pieces += [text[last:start], REDACTED]
            last = end
        text = ''.join([*pieces, text[last:]])
    return text, count + len(spans)


def _secret_value_spans(text: str, lowered: str) -> list[tuple[int, int]]:
    """Where the values of `password=...`-style pairs are, found with `str.find` and anchored matches."""
    spans: list[tuple[int, int]] = []
    if ':' not in text and '=' not in text:
        return spans
    for name in _SECRET_NAMES:
        at = lowered.find(name)
        while at != -1:
            end = at + len(name)
            if at == 0 or not lowered[at - 1].isalnum():
                match = _QUOTED_VALUE.match(text, end) or _BARE_VALUE.match(text, end)
                if match is not None:
                    spans.append(match.span(1))
            at = lowered.find(name, end)
    if len(spans) < 2:
        return spans
    spans.sort()  # in text order, each value once even if two names led to it
    merged = [spans[0]]
    for span in spans[1:]:
        if span[0] >= merged[-1][1]:
            merged.append(span)
    return merged


_ASCII_LOWER = str.maketrans('ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')


def _lower(text: str) -> str:
    """Lower-case with the same length as `text`, so offsets found in it are offsets in `text`."""
    lowered = text.lower()
    # A few characters lower-case to two (e.g. 'İ'): fall back to ASCII-only folding, which keeps offsets.
    return lowered if len(lowered) == len(text) else text.translate(_ASCII_LOWER)


def redact_text(text: str) -> str:
    """`redact()` without the count, for log lines and error messages."""
    return redact(text)[0]
