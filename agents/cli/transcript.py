"""A stored prompt, response or error body, shown as people read a conversation: who said what, which tool was
called with what, and what it returned.

Bodies are the ledger's JSON (`services/ledger/_contents.py`): a prompt is `{"instructions", "messages"}`, a response
one pydantic-ai message, an error `{"type", "message", ...}`. A body that is not JSON (cut at the size cap, or
stored by an older version) is shown as it is.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.text import Text

INDENT = 2
# Terminal control characters (all but newline and tab): a stored body is anyone's text, and an escape sequence in it
# must show as text, not move the cursor or recolour the terminal. With them the bidirectional embeddings, overrides
# and isolates (U+202A-U+202E, U+2066-U+2069) and marks (U+200E, U+200F, U+061C: they reorder digits and
# punctuation): `\u202e` before a stored prompt showed it reversed in `audit show`, an audit trail anyone who can chat
# could make read otherwise (QA); the web UI and the API's errors escape them too. And the line and paragraph
# separators, which some terminals break a line at and others do not.
_CONTROL = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]')
_ROLE_STYLES = {
    'instructions': 'bold magenta',
    'system': 'bold magenta',
    'user': 'bold cyan',
    'assistant': 'bold green',
    'tool': 'bold yellow',
    'retry': 'bold red',
    'thinking': 'dim',
    'error': 'bold red',
}


def parse_body(body: str, *, truncated: bool) -> tuple[Any, bool]:
    """The body as JSON values and True, or the text as it is and False (not JSON, or cut short)."""
    if truncated:
        return body, False
    try:
        return json.loads(body), True
    except (ValueError, RecursionError):  # nested past Python's parser (a tool's hostile result): the text as stored
        return body, False


def render_body(kind: str, body: str, *, truncated: bool) -> RenderableType:
    """`kind` (prompt, response, error) as a conversation; the raw text when it cannot be read as one."""
    value, is_json = parse_body(body, truncated=truncated)
    if not is_json:
        return Text(visible(body))
    try:
        if kind == 'prompt' and isinstance(value, dict):
            return _prompt(value)
        if kind == 'response' and isinstance(value, dict):
            return Group(*_message(value))
        if kind == 'error' and isinstance(value, dict):
            return Group(*_turn('error', str(value.get('type') or ''), _pretty(value)))
    except (AttributeError, TypeError, ValueError):
        pass  # an unexpected shape: show the JSON itself
    return Text(visible(_pretty(value)))


def visible(text: str) -> str:
    """`text` with terminal control characters written out (`\\x1b`), and the bidirectional controls and line
    separators (`\\u202e`); newlines and tabs kept."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f'\\x{code:02x}' if code <= 0xFF else f'\\u{code:04x}'


def visible_line(text: str) -> str:
    """`visible(text)` on one line: newlines and tabs written out too (`\\n`, `\\t`), for a table's cell, whose row a
    newline in a name (a key's, an agent's) split into lines that read as other rows."""
    return visible(text).replace('\n', '\\n').replace('\t', '\\t')


def _prompt(prompt: dict[str, Any]) -> RenderableType:
    parts: list[RenderableType] = []
    if prompt.get('instructions'):
        parts += _turn('instructions', '', str(prompt['instructions']))
    for message in prompt.get('messages') or []:
        parts += _message(message)
    return Group(*parts)


def _message(message: dict[str, Any]) -> list[RenderableType]:
    shown: list[RenderableType] = []
    for part in message.get('parts') or []:
        kind = part.get('part_kind')
        if kind == 'system-prompt':
            shown += _turn('system', '', _text(part.get('content')))
        elif kind == 'user-prompt':
            shown += _turn('user', '', _text(part.get('content')))
        elif kind == 'text':
            shown += _turn('assistant', '', _text(part.get('content')))
        elif kind == 'thinking':
            shown += _turn('thinking', '', _text(part.get('content')))
        elif kind == 'tool-call':
            shown += _turn('assistant', f'→ {part.get("tool_name")}  {_call_id(part)}', _arguments(part.get('args')))
        elif kind == 'tool-return' and part.get('outcome') == 'retried':  # pydantic-ai 2.78's validation retry
            shown += _turn('retry', f'{part.get("tool_name")}  {_call_id(part)}', _result(part.get('content')))
        elif kind == 'tool-return':
            shown += _turn('tool', f'{part.get("tool_name")}  {_call_id(part)}', _result(part.get('content')))
        elif kind == 'retry-prompt':
            shown += _turn('retry', str(part.get('tool_name') or ''), _text(part.get('content')))
        else:
            shown += _turn(str(kind or 'part'), '', _pretty(part))
    return shown


def _turn(role: str, label: str, content: str) -> list[RenderableType]:
    heading = Text(visible_line(role), style=_ROLE_STYLES.get(role, 'bold'))
    if label.strip():
        # On the heading's line: a newline in a tool's name (a model's invention) started a line that read as the body.
        heading.append(f'  {visible_line(label.strip())}', style='dim')
    return [heading, Padding(Text(visible(content)), (0, 0, 0, INDENT))]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # a user prompt of several items: text, images, documents...
        return '\n'.join(item if isinstance(item, str) else _pretty(item) for item in content)
    return _pretty(content)


def _result(content: Any) -> str:
    """A tool's result: text as it is, anything else as JSON (a list of strings was shown as lines of text; QA)."""
    return content if isinstance(content, str) else _pretty(content)


def _arguments(args: Any) -> str:
    try:
        if isinstance(args, str):  # arguments as the model sent them: JSON text, or not
            try:
                parsed: Any = json.loads(args)
            except ValueError:
                return args
            return _pretty(parsed)
        return _pretty(args)
    except RecursionError:  # nested past Python's parser (a model's hostile arguments): as stored (exit 70; QA)
        return args if isinstance(args, str) else '(arguments nested too deeply to show here; --json has them)'


def _call_id(part: dict[str, Any]) -> str:
    call_id = str(part.get('tool_call_id') or '')
    return f'(call {call_id})' if call_id else ''


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)
