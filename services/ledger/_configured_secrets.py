"""The runtime's own credentials, redacted as literals: the values of the environment variables that hold one.

The rules (`redaction_rules.toml`) know secrets by their shapes, so a key without a published one (a vLLM, LiteLLM or
Ollama server's `OPENAI_API_KEY=vllm-local-...`, a database password) was stored and shown in clear when a provider's
error echoed it (`Incorrect API key provided: vllm-local-...`; QA). The runtime knows the exact values it sends: these
are found wherever they appear, whatever their shape, by `redact_text()` and everything built on it (stored bodies and
error messages, log lines, the CLI's `error:` line, HTTP error messages).

What counts: every environment variable whose name ends in `API_KEY`, `APIKEY`, `SECRET_KEY`, `ACCESS_KEY`,
`PRIVATE_KEY`, `TOKEN`, `SECRET`, `PASSWORD`, `PASSWD` or `PASSPHRASE` after an underscore (or is just that word),
which covers what pydantic-ai's providers and their SDKs read (`OPENAI_API_KEY`, `ANTHROPIC_API_KEY`, `GEMINI_API_KEY`,
`GROQ_API_KEY`, `MISTRAL_API_KEY`, `CO_API_KEY`, `HF_TOKEN`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, ...),
`PGPASSWORD`, and the password of a URL in a variable whose name ends in `_URL` or `_DSN` (`DATABASE_URL`...; with the
database URLs the settings read from `.env`, passed by the runtime). Not any `_KEY`: `PARTITION_KEY=tenant_id` or
`SORT_KEY=created_at` name no credential, and their values blanked every query that named the column (QA). Left out,
so that a value cannot blank ordinary text: one shorter than `MIN_CHARS` (`1234`, `true`), one of letters only or
digits only (`postgres` of `postgresql://postgres:postgres@localhost/app`, a development set-up's, would blank every
`postgresql` of every text), one without a letter or digit (`--------`, a Markdown rule), a path
(`/etc/ssl/private/server.key`, `~/.config/...`: a file's name is not the secret it holds), and one holding `"` or
`\\` (JSON text writes them escaped, where the value as written is not found, and a replacement that splits an escape
makes the text invalid JSON: such a key is left to the rules, as before; QA). A value is found only where it stands
apart: not inside a longer word (`sk-local` in `sk-localhost`, `password1` in `password123`; QA), a letter, digit or
`_` on either side keeping it whole, except the letter of a JSON escape before it (`\\n`).

Cost: the values are read once, and again by `reread_configured_secrets()` (each turn's start calls it), which
compares the environment with the one read before (a few microseconds) and builds the list again only when it changed;
a text is searched with `in` per value (with RE2 once for many values).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

import re2  # google-re2: linear-time matching, one scan for all the values

from agentrt.services.ledger._redaction_rules import REDACTED

MIN_CHARS = 8
"""The shortest value redacted: a shorter one would blank ordinary words and numbers wherever they appear."""

_CREDENTIAL_NAME = re.compile(
    r'(?i)(?:^|_)(?:API_?KEY|SECRET_KEY|ACCESS_KEY|PRIVATE_KEY|TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE)$|^PGPASSWORD$'
)
_URL_NAME = re.compile(r'(?i)(?:_URL|_DSN)$')
_PATH = re.compile(r'^(?:~|\.{0,2}/)')
_FEW_VALUES = 8  # up to this many values, `in` per value is cheaper than one RE2 scan


class _Known:
    """The values in force: the environment they were read from, the extra URLs, and the values (longest first, so a
    value that holds another is replaced whole), as text and as UTF-8, with one RE2 pattern of them all when there are
    many. `in` per value runs at about 0.3 ns a byte (a tenth of the rules' own scan with three values); RE2 over
    values that start differently runs at about 3 ns a byte however many there are, so it takes over past
    `_FEW_VALUES`. Only a text that holds one is searched again for where."""

    __slots__ = ('encoded', 'environment', 'extra', 'regex', 'texts')

    def __init__(self, environment: object, extra: tuple[str, ...], texts: tuple[str, ...]) -> None:
        self.environment = environment
        self.extra = extra
        self.texts = texts
        self.encoded = tuple(text.encode() for text in texts)
        many = len(texts) > _FEW_VALUES
        self.regex: Any = re2.compile('|'.join(re2.escape(text) for text in texts)) if many else None

    def found_in(self, text: str | bytes) -> bool:
        """Whether `text` holds one of the values."""
        if self.regex is not None:
            try:
                return self.regex.search(text) is not None
            except UnicodeEncodeError:  # lone surrogates, which RE2 cannot take as UTF-8: the values' own search
                pass
        if isinstance(text, bytes):
            return any(value in text for value in self.encoded)
        return any(value in text for value in self.texts)


_known: _Known | None = None
_lock = threading.Lock()  # redaction runs in worker threads: one build at a time, readers see a whole `_Known`


def _environment_now() -> object:
    """What `os.environ` holds, cheaply compared: its raw items (about 2 µs; decoding them all costs 50 times more)."""
    raw = getattr(os.environ, '_data', None)
    return tuple(raw.items()) if isinstance(raw, dict) else tuple(os.environ.items())


def _url_passwords(url: str) -> set[str]:
    """The password of `url`, as written and percent-decoded (both can reach a text); none without one."""
    try:
        userinfo = urlsplit(url.strip()).netloc.rpartition('@')[0]
    except ValueError:
        return set()
    written = userinfo.partition(':')[2]
    return {written, unquote(written)} if written else set()


def credential_values(environment: Iterable[tuple[str, str]], urls: Iterable[str] = ()) -> tuple[str, ...]:
    """The credentials among `environment`'s variables and the passwords of `urls`, as `_known` keeps them.

    Args:
        environment: `(name, value)` pairs, `os.environ.items()`.
        urls: database URLs read from elsewhere (the settings' `.env`).

    Returns:
        The distinct values to redact, longest first.
    """
    values: set[str] = set()
    for name, value in environment:
        if _CREDENTIAL_NAME.search(name):
            values.add(value)
        elif _URL_NAME.search(name) and '@' in value:
            values.update(_url_passwords(value))
    for url in urls:
        values.update(_url_passwords(url))
    kept = {
        value
        for value in values
        if len(value) >= MIN_CHARS
        and not value.isspace()
        and not value.isalpha()
        and not value.isdigit()
        and any(character.isalnum() for character in value)
        and '"' not in value
        and '\\' not in value
        and not _PATH.match(value)
        and value not in REDACTED  # it would replace the replacement again
        and _is_utf8(value)
    }
    return tuple(sorted(kept, key=lambda value: (-len(value), value)))


def _is_utf8(value: str) -> bool:
    """Whether `value` can be written as UTF-8: a variable's bytes that were not (Python keeps them as lone surrogates)
    are in no text the runtime sends or stores as they are."""
    try:
        value.encode('utf-8')
    except UnicodeEncodeError:
        return False
    return True


def reread_configured_secrets(urls: Iterable[str | None] = ()) -> None:
    """Read the credentials again if the environment (or `urls`) changed since they were last read.

    Args:
        urls: database URLs from the settings (`DATABASE_URL` and the others may come from `.env`, which the
            environment does not show); None items are skipped.
    """
    global _known
    extra = tuple(url for url in urls if url)
    environment = _environment_now()
    known = _known
    if known is not None and known.environment == environment and known.extra == extra:
        return
    with _lock:
        _known = _Known(environment, extra, credential_values(os.environ.items(), extra))


def configured_secrets() -> tuple[str, ...]:
    """The credential values redaction replaces (read on first use)."""
    known = _known
    if known is None:
        reread_configured_secrets()
        known = _known
        assert known is not None
    return known.texts


def literal_spans(text: str) -> list[tuple[int, int]]:
    """Where the configured credentials are in `text`, as sorted `(start, end)` character offsets (they may overlap).

    A value is found only where it stands apart (`_apart`): not inside a longer word. No value holds a `"` or a
    backslash (`credential_values`), so a replacement never splits an escape of JSON text.
    """
    configured_secrets()
    known = _known
    if known is None or not known.found_in(text):
        return []
    spans: list[tuple[int, int]] = []
    for value in known.texts:
        at = text.find(value)
        while at != -1:
            end = at + len(value)
            if _apart(text, at, end):
                spans.append((at, end))
            at = text.find(value, at + 1)
    spans.sort()
    return spans


def _apart(text: str, start: int, end: int) -> bool:
    """Whether `text[start:end]` is not part of a longer word: no letter, digit or `_` touching it, but for the letter
    of a JSON escape before it (`\\nvllm-...`: a line break, in JSON text)."""
    before = text[start - 1] if start else ''
    after = text[end] if end < len(text) else ''
    if after and (after.isalnum() or after == '_'):
        return False
    if before and (before.isalnum() or before == '_'):
        return before.isalpha() and _escaped(text, start - 1)
    return True


def _escaped(text: str, at: int) -> bool:
    """Whether `text[at]` follows an odd run of backslashes."""
    run = 0
    while at - run > 0 and text[at - run - 1] == '\\':
        run += 1
    return run % 2 == 1


def holds_configured_secret(data: bytes) -> bool:
    """Whether the UTF-8 text `data` holds a configured credential."""
    configured_secrets()
    known = _known
    return known is not None and known.found_in(data)
