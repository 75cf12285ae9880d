"""A retry's rejected input cut short: the model is told what was wrong, not sent its oversized arguments again.

pydantic-ai's retry for arguments that failed validation is the list of pydantic's error details, each with the
`input` it rejected: a 1,000,000-character `query` (capped at 200) came back whole in the retry, so the next request
carried it twice (the resent call and the retry) and the conversation stored it twice (QA). `SendableText` cuts each
rejected input (and a location naming an oversized key) to its first `SHOWN` characters before the request is sent
and saved, for every tool.
"""

from __future__ import annotations

from typing import Any

from pydantic_core import to_json

SHOWN = 300
"""Characters of a rejected input (or of its JSON text) kept in a retry."""


def shorten_retry(part: Any) -> None:
    """Cut the rejected inputs of `part` in place when it is a retry holding validation errors (a tool call's
    `outcome='retried'` return, a `RetryFeedbackPart`, a legacy `RetryPromptPart`); leave any other part alone."""
    kind = getattr(part, 'part_kind', None)
    if not (getattr(part, 'outcome', None) == 'retried' or kind in ('retry-feedback', 'retry-prompt')):
        return
    content = getattr(part, 'content', None)
    if not isinstance(content, list) or not any(_long_error(error) for error in content):
        return
    part.content = [_shortened(error) if _long_error(error) else error for error in content]


def _long_error(error: Any) -> bool:
    if not isinstance(error, dict):
        return False
    location = error.get('loc')
    if isinstance(location, list | tuple) and any(isinstance(item, str) and len(item) > SHOWN for item in location):
        return True
    return 'input' in error and _is_long(error['input'])


def _is_long(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) > SHOWN
    if value is None or isinstance(value, bool | int | float):
        return False
    return len(_text(value)) > SHOWN  # a dict or a list: its JSON, as the model would read it


def _shortened(error: dict[str, Any]) -> dict[str, Any]:
    shortened = dict(error)
    location = error.get('loc')
    if isinstance(location, list | tuple):
        shortened['loc'] = [_cut(item) if isinstance(item, str) else item for item in location]
    if 'input' in error and _is_long(error['input']):
        value = error['input']
        shortened['input'] = _cut(value if isinstance(value, str) else _text(value))
    return shortened


def _cut(text: str) -> str:
    if len(text) <= SHOWN:
        return text
    return f'{text[:SHOWN]}... ({len(text):,} characters)'


def _text(value: Any) -> str:
    try:
        return to_json(value, fallback=repr).decode('utf-8', errors='replace')
    except Exception:  # a value pydantic cannot serialise (nested too deep): its repr, which is cut all the same
        return repr(value)
