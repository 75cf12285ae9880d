"""The redaction rules (`redaction_rules.toml`): loaded, checked and compiled once at import, and the matcher that
finds their spans in UTF-8 bytes with one RE2 trigger scan (`byte_spans`, `char_spans`, `has_secret`).

Split from `agentrt.services.ledger.redaction`, the public face (`redact_text`, `redact_value`, `find_secrets`, ...),
whose docstring says what the rules catch and what they do not.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import re2  # google-re2: linear-time matching

from agentrt.services.ledger._secret_checks import BOUND, CHECKS, JSON_STRUCTURE, Candidate, Check, Span, entropy

REDACTED = '[REDACTED]'
_REDACTED_BYTES = REDACTED.encode()
_RULES_FILE = Path(__file__).with_name('redaction_rules.toml')


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
    quoted_pieces: bool

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
            if self.quoted_pieces:
                yield from _quoted_pieces(data, start, end)
                continue
            start = _after_escape(data, start)
            quote = data.find(b'"', start, end)  # the patterns exclude it; this keeps JSON safe whatever a rule says
            if quote != -1:
                end = quote
            if start < end:
                yield start, end


_KEY_TEXT = re.compile(rb'[A-Za-z0-9+/]{2}')
_BLANK = frozenset(b' \t\r\n\x0b\x0c')
_ESCAPED_BLANK = frozenset(b'nrt')


def _quoted_pieces(data: bytes, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The pieces of `data[start:end]` between its double quotes that hold key text, each without the blanks (and
    `\\n` escapes) around it: a key written as string literals (`"MIIE...\\n" +`) or a JSON list of lines goes line
    by line, its quotes and what lies between its strings kept, so JSON text stays valid and the lines stay lines."""
    while start < end:
        quote = data.find(b'"', start, end)
        stop = end if quote == -1 else quote
        piece = _trimmed(data, start, stop)
        if piece is not None:
            yield piece
        start = stop + 1


def _trimmed(data: bytes, start: int, end: int) -> tuple[int, int] | None:
    """`data[start:end]` without the blanks and whole escapes of them (`\\n`, `\\\\n` of JSON text in JSON text) at its
    ends (at most `BOUND` bytes each side: bounded work), nor the backslashes before its end, which escape the quote
    after it at some level of JSON text; None when no key text is left in it."""
    start = _after_escape(data, start)
    floor = min(end, start + BOUND)
    while start < floor:
        if data[start] in _BLANK:
            start += 1
            continue
        escape = start
        while escape < floor and data[escape] == 92:
            escape += 1
        if escape == start or escape >= end or data[escape] not in _ESCAPED_BLANK:
            break
        start = escape + 1
    ceiling = max(start, end - BOUND)
    while end > ceiling:
        if data[end - 1] in _BLANK:
            end -= 1
            continue
        escape = end - 1
        while escape > ceiling and data[escape - 1] == 92:
            escape -= 1
        if escape == end - 1 or data[end - 1] not in _ESCAPED_BLANK:
            break
        end = escape
    while end > start and data[end - 1] == 92:
        end -= 1
    if start >= end or data.startswith(_REDACTED_BYTES, start) or not _KEY_TEXT.search(data, start, end):
        return None
    return start, end


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
                quoted_pieces=bool(raw.get('quoted_pieces', False)),
            )
        )
        for trigger in raw['triggers']:
            triggers.setdefault(trigger, []).append(index)
    trigger_set = re2.Set.SearchSet(_options())
    for trigger in triggers:
        trigger_set.Add(f'(?i:{trigger})')
    trigger_set.Compile()
    return tuple(rules), trigger_set, tuple(tuple(indexes) for indexes in triggers.values())


RULES, TRIGGERS, RULES_BY_TRIGGER = _load_rules(_RULES_FILE)


def rule_kinds() -> list[tuple[str, str, str]]:
    """`(id, kind, source)` of every rule, in the order they run: what this module catches, for docs and tests."""
    return [(rule.id, rule.kind, rule.source) for rule in RULES]


# ----------------------------------------------------------------------------------------------------------------
# The matcher.


# A span is kept as one int, start << 40 | end << 8 | rule index: ints are not tracked by the garbage collector, and
# hostile text yields one span per dozen bytes. Keeping tuples or objects alive instead promotes tens of thousands
# of them per megabyte into the old generation, and the full collections that follow (tens of ms on an
# application-sized heap, GIL held) would stall the event loop while a worker thread redacts.
START, END, RULE_BITS = 40, 8, 0xFF
if len(RULES) > RULE_BITS:
    raise ValueError(f'{_RULES_FILE.name}: at most {RULE_BITS} rules fit the span encoding')


def byte_spans(data: bytes) -> list[int]:
    """Secrets in `data` (UTF-8) as sorted, merged (where they overlap or touch) encoded byte spans."""
    hits = TRIGGERS.Match(data)
    if not hits:
        return []
    enabled = sorted({index for hit in hits for index in RULES_BY_TRIGGER[hit]})
    found = [start << START | end << END | index for index in enabled for start, end in RULES[index].spans(data)]
    return merged_spans(found)


def merged_spans(found: list[int]) -> list[int]:
    """Packed spans (`start << START | end << END | rule index`) sorted, and merged where they overlap or touch: a
    merged span keeps the rule of its first."""
    found.sort()
    merged: list[int] = []
    last_start = last_end = -1
    for span in found:
        start, end = span >> START, (span >> END) & OFFSET_MASK
        if start <= last_end:  # overlaps or touches the previous one: extend it, keep its rule
            last_end = max(last_end, end)
            merged[-1] = last_start << START | last_end << END | (merged[-1] & RULE_BITS)
        else:
            merged.append(span)
            last_start, last_end = start, end
    return merged


OFFSET_MASK = (1 << (START - END)) - 1


def char_spans(text: str) -> list[int]:
    """`byte_spans()` of `text`, with character offsets."""
    if not text:
        return []
    # Lone surrogates cannot be encoded as UTF-8; 'replace' turns each into one '?', so character counts stay equal.
    data = text.encode('utf-8', errors='replace')
    spans = byte_spans(data)
    if not spans or len(data) == len(text):  # ASCII: byte offsets are character offsets
        return spans
    # Map byte offsets to character offsets in one pass over the text (linear, however many spans).
    result, byte_at, char_at = [], 0, 0
    for span in spans:
        start, end = span >> START, (span >> END) & OFFSET_MASK
        char_start = char_at + len(data[byte_at:start].decode('utf-8'))
        char_end = char_start + len(data[start:end].decode('utf-8'))
        result.append(char_start << START | char_end << END | (span & RULE_BITS))
        byte_at, char_at = end, char_end
    return result


def has_secret(data: bytes) -> bool:
    """Whether `byte_spans(data)` would find anything, stopping at the first secret (hostile text full of secrets
    then costs one match, not a full scan before the caller redacts it anyway)."""
    hits = TRIGGERS.Match(data)
    if not hits:
        return False
    for index in sorted({index for hit in hits for index in RULES_BY_TRIGGER[hit]}):
        for _ in RULES[index].spans(data):
            return True
    return False
