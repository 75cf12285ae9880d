"""`agentrt chat`: stream a chat turn to the terminal, showing each tool call and a summary line."""

from __future__ import annotations

import json
import os
import uuid
import warnings
from typing import TYPE_CHECKING, cast

import typer
from rich.markup import escape

from agentrt.agents.cli import support
from agentrt.agents.cli.pipes import reader_left
from agentrt.agents.cli.support import (
    EXIT_FAILURE,
    console,
    err_console,
    error_line,
    exit_code_of,
    run,
)
from agentrt.db.errors import (
    BudgetExceededError,
    DatabaseUnavailableError,
    InvalidInputError,
    ModelBehaviorError,
    ModelProviderError,
    RuntimeBusyError,
    TurnLimitExceededError,
)

if TYPE_CHECKING:
    from agentrt.agents.simple_chat import ChatResult, ToolEvent

DEFAULT_ACCOUNT = 'acme-health'  # services.demo_data.MEDICAL_ACCOUNT, not imported here: `chat --help` stays fast


def turn_errors() -> tuple[type[BaseException], ...]:
    """What can fail one turn of an interactive conversation without ending it."""
    from agentrt.services.conversations import ConcurrentTurnError

    # A budget's refusal and a busy process too: the next line may fit (a raised limit, a new period, a quieter
    # moment); they ended the whole conversation.
    return (
        BudgetExceededError,
        ConcurrentTurnError,
        DatabaseUnavailableError,
        RuntimeBusyError,
        InvalidInputError,
        ModelBehaviorError,
        ModelProviderError,
        TurnLimitExceededError,
    )


def _delay_seconds(value: float) -> float:
    """`--delay` from 0 to 2 seconds. Checked here, not by typer's range: `nan` passes every comparison, and typer
    said of it "Input should be less than or equal to 2"."""
    if not 0 <= value <= 2:  # False for nan
        raise typer.BadParameter(f'{value:g} is not a number of seconds from 0 to 2')
    return value


def chat(
    message: str | None = typer.Argument(None, help='Your message; omit it for an interactive conversation.'),
    session: str | None = typer.Option(None, '--session', '-s', help='Conversation id to continue.'),
    account: str = typer.Option(DEFAULT_ACCOUNT, '--account', '-a', help='Account slug (tenant).'),
    agent: str | None = typer.Option(None, '--agent', help='Agent slug of the account (default: its first agent).'),
    model: str | None = typer.Option(None, '--model', '-m', help="'demo' or a pydantic-ai model string."),
    delay: float = typer.Option(
        0.02, '--delay', callback=_delay_seconds, help='Pause between words of the demo model (s, 0 to 2).'
    ),
) -> None:
    """Chat with an agent; the answer streams as it is produced."""
    session_id = session if session is not None else f'cli-{uuid.uuid4().hex[:12]}'
    run(_chat, message, session_id, account, agent, model, delay)


async def _chat(
    message: str | None, session_id: str, account: str, agent: str | None, model: str | None, delay: float
) -> None:
    from agentrt.agents.chat_turn import check_turn_input
    from agentrt.agents.model_resolution import resolve_model
    from agentrt.agents.runtime import shutdown_runtime
    from agentrt.agents.turn_input import validate_identifiers
    from agentrt.db.engine import current_settings, init_database
    from agentrt.db.settings import get_settings

    # Bad flags and a bad message fail here, before the database starts or anything is billed.
    if message is None:
        validate_identifiers(session_id=session_id, account=account, agent_instance=agent)
    else:
        message = check_turn_input(message, session_id=session_id, account=account, agent_instance=agent).message
    # So does a model that cannot be used (unknown, its API key or provider package missing): it waited for the
    # database to start (a first start's initdb, migrations and seeding: seconds), and a conversation then refused
    # each of its lines with it. Each turn resolves it again (no I/O: the provider's client is built, not called).
    resolve_model(model, default=get_settings().model)
    try:
        await init_database()
    except DatabaseUnavailableError as exc:
        raise type(exc)(f'{exc}; the message was not sent and nothing was saved') from exc
    try:
        await _seed_demo_if_empty(account)
        if message is not None:
            await _turn(message, session_id, account, agent, model, delay)
            _saved(f'the turn was saved (session {session_id})')
            return
        from agentrt.agents.cli.chat_input import TerminalLines, history_path, open_line_source
        from agentrt.agents.cli.chat_loop import converse

        settings = current_settings()
        lines = open_line_source(history_path(settings.data_dir), max_chars=settings.message_max_chars)
        err_console.print(
            f'conversation {session_id}; Ctrl-C stops an answer, Ctrl-D (or exit) leaves', style='dim', highlight=False
        )
        conversed = await converse(
            lines, lambda line: _turn(line, session_id, account, agent, model, delay), turn_errors(), reader_left
        )
        ended = f'the conversation ended (session {session_id})'
        _saved(ended)
        if conversed.last_error is not None and not isinstance(lines, TerminalLines):
            # Lines from a pipe or a file: the script that fed them reads the exit code, not the error lines (an
            # answer Ctrl-C stopped, unsaved, exited 0 with no line saying so).
            stopped = f' ({conversed.stopped} stopped by Ctrl-C)' if conversed.stopped else ''
            error_line(
                f'{conversed.failed + conversed.stopped} of {conversed.turns} turns failed{stopped}; '
                "the exit code is the last failed one's"
            )
            code = exit_code_of(conversed.last_error) or EXIT_FAILURE
            _saved(ended, code)
            raise typer.Exit(code)
    finally:
        await shutdown_runtime()


def _saved(what: str, code: int = 0) -> None:
    """The chat's work is saved (`what`): a stop signal from now on (its clean-up, the event loop's end, the exit) says
    so and ends the command with `code`. It exited 130 with "nothing in progress was saved" after the summary line,
    and a script that read that as "send it again" added the turn twice (QA)."""
    support.work_done(
        f'interrupted after {what}: only its clean-up was cut short (background work such as the usage rollup or '
        'the title, which a later turn does again)',
        code,
    )


async def _seed_demo_if_empty(account: str) -> None:
    """On a fresh install, `agentrt chat` seeds the demo data itself rather than failing."""
    from sqlalchemy import select

    from agentrt.db.models import Account
    from agentrt.db.session import Unscoped, get_db_session
    from agentrt.services.demo_data import MEDICAL_ACCOUNT, PRODUCE_ACCOUNT, seed_demo_data

    if account not in (MEDICAL_ACCOUNT, PRODUCE_ACCOUNT):  # the demo's accounts (the README's examples name both)
        return

    async with get_db_session(account=Unscoped.ADMIN) as session:
        if (await session.execute(select(Account.id).limit(1))).first() is not None:
            return
        report = await seed_demo_data(session=session)
    if report.inserted_entries:  # else another process started at once seeded it (its rows won: ON CONFLICT)
        err_console.print(f'empty database: seeded the demo data ({report.directory_entries:,} directory entries)')


async def _turn(
    message: str, session_id: str, account: str, agent: str | None, model: str | None, delay: float
) -> None:
    from pydantic_ai import UsageExtractionFailedWarning, UsageLimitUnavailableWarning

    from agentrt.agents.simple_chat import simple_chat_stream

    display = _Display()
    try:
        # A provider that reports no usage made pydantic-ai warn as Python does, under the answer: a source path, the
        # warning's paragraph, `warnings.warn(`; one whose usage cannot be read (`prompt_tokens: -50`) too, as a line
        # glued to the answer's (QA). The summary line says it instead (`usage not measured`).
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', UsageLimitUnavailableWarning)
            warnings.simplefilter('ignore', UsageExtractionFailedWarning)
            async with simple_chat_stream(
                message,
                session_id=session_id,
                account=account,
                agent_instance=agent,
                model=model,
                on_tool_event=display.tool,
                stream_delay=delay,
            ) as stream:
                async for delta in stream:
                    display.text(delta)
    except DatabaseUnavailableError as exc:
        raise type(exc)(f'{exc}; the turn was not saved: {_send_again(exc)}') from exc
    finally:
        display.unfinished()
    assert stream.result is not None
    summary = _summary(stream.result)
    # Not markup: a model's name is the operator's text (`--model 'openai-chat:gpt[/x]'` was a MarkupError after the
    # turn was saved, exit 70, and `[link=...]` made a hyperlink).
    console.print(summary, style='dim', markup=False, highlight=False, soft_wrap=True)


def _send_again(exc: DatabaseUnavailableError) -> str:
    """When to send a message whose turn the database failed again: PostgreSQL was not away for each such failure."""
    from agentrt.db.failures import disk_full, given_up, pool_exhausted  # here: `chat --help` loads no SQLAlchemy

    if pool_exhausted(exc):  # every connection of this process's pool stayed in use: PostgreSQL was there
        return 'send the message again shortly'
    if disk_full(exc) is not None:
        return 'send the message again once there is room'
    if given_up(exc) is not None:  # a lock or statement timeout, a deadlock: the server is there
        return 'send the message again'
    return 'send the message again once PostgreSQL is back'


def _one_destination() -> bool:
    """Whether the answer and the log lines are read together: one terminal, or one file or pipe (`> out 2>&1`, `2>&1 |
    tee`), where a log line printed after the answer's unterminated last line was glued to it (`...is 42.WARNING
    ledger: ...`; QA). Answers and log lines kept apart (`> answers.txt`) are left as they are: a script's captured
    answer gets no line break the model did not write."""
    if console.is_terminal and err_console.is_terminal:
        return True
    try:
        out, err = os.fstat(console.file.fileno()), os.fstat(err_console.file.fileno())
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (a test's StringIO): not shared
        return False
    return (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


class _Display:
    """Interleaves tool progress lines with the streamed answer."""

    def __init__(self) -> None:
        from agentrt.agents.cli.transcript import visible, visible_line
        from agentrt.services.pg_text import storable_text  # here: `chat --help` imports no service

        def printable(text: str) -> str:
            # A lone surrogate (`"\ud83d"` in a provider JSON) cannot be written as UTF-8: shown as the store saves it.
            text = storable_text(text)
            if not console.is_terminal:  # a script capturing the answers gets the model's text as it is
                return text
            # An escape sequence in the model's text (an echo of what it was given) is shown, not obeyed by the
            # terminal (a new title, colours, the clipboard), as `audit show` shows it.
            return visible(text.replace('\r\n', '\n'))

        def one_line(text: str) -> str:
            # A tool call's name and arguments are the model's text in a progress line of the CLI's own: a newline in
            # a name it invented split `→ name(args)` and `✗ retried name` into lines that read as others (QA),
            # terminal or not, so control characters, newlines and tabs are written out there.
            return visible_line(storable_text(text))

        self.printable = printable
        self.one_line = one_line
        self.mid_line = False
        self.held_cr = False
        """A terminal's answer so far ended with a CR, held back: the first half of a CRLF the next delta ends."""
        self.running: dict[str, str] = {}
        """The tool calls shown started and not finished, by call id: their names, as shown."""
        if _one_destination():  # a log line starts on a line of its own
            support.open_answer_line = self.end_line

    def tool(self, event: ToolEvent) -> None:
        self.end_line()
        name = escape(self.one_line(event.tool_name))
        if not event.finished:
            args = escape(self.one_line(_short_args(event.args)))
            console.print(f'  [yellow]→[/] {name}({args})', highlight=False, soft_wrap=True)
            self.running[event.tool_call_id] = name
            return
        self.running.pop(event.tool_call_id, None)
        mark = '[green]✓[/]' if event.outcome == 'success' else f'[red]✗ {event.outcome}[/]'
        took = f'{event.duration_s * 1000:.0f} ms' if event.duration_s is not None else ''
        console.print(f'  {mark} {name} {took}', highlight=False, soft_wrap=True)

    def unfinished(self) -> None:
        """Close the lines of the tool calls the turn's end cut off (a failure, a stop): each started line had its
        `✓`/`✗` line but these, which stayed open above the error (QA: a database that hangs)."""
        self.end_line()
        for name in self.running.values():
            console.print(f'  [red]✗ not finished[/] {name}', highlight=False, soft_wrap=True)
        self.running.clear()

    def text(self, delta: str) -> None:
        if not console.is_terminal:
            # Written as it is, not through rich, which expands tabs and drops CR, BEL, BS, VT and FF (and let ESC
            # through): a script capturing the answer (a TSV, a Makefile) gets the text `simple_chat` gives.
            console.file.write(self.printable(delta))
            console.file.flush()
            self.mid_line = not delta.endswith('\n')
            return
        if self.held_cr:
            delta, self.held_cr = '\r' + delta, False
        if delta.endswith('\r'):  # a CRLF split across two deltas showed as `\x0d`: the next delta says which it is
            delta, self.held_cr = delta[:-1], True
        console.print(self.printable(delta), end='', markup=False, highlight=False, soft_wrap=True)
        self.mid_line = self.held_cr or not delta.endswith('\n')

    def end_line(self) -> None:
        if self.held_cr:  # the answer (or its text before a tool call) ended with a lone CR: shown as one
            self.held_cr = False
            console.print(self.printable('\r'), end='', markup=False, highlight=False, soft_wrap=True)
        if self.mid_line:
            console.print()
            self.mid_line = False


def _short_args(args: object) -> str:
    try:
        return _shown_args(args)
    except RecursionError:  # a model's arguments nested past Python's parser: a traceback ended the chat (QA)
        return args[:120] if isinstance(args, str) else '...'


def _shown_args(args: object) -> str:
    if isinstance(args, str):
        try:
            parsed: object = json.loads(args)
        except ValueError:
            return args[:120]
        args = parsed
    if isinstance(args, dict):
        shown = {str(k): v for k, v in cast(dict[object, object], args).items() if v not in (None, {}, [])}
        text = ', '.join(f'{k}={json.dumps(v, ensure_ascii=False)}' for k, v in shown.items())
        return text if len(text) <= 160 else text[:157] + '...'
    return ''


def _summary(result: ChatResult) -> str:
    usage = result.usage
    tokens = f'{usage.total_tokens:,} tokens ({usage.input_tokens:,} in / {usage.output_tokens:,} out)'
    cost = 'unpriced' if usage.cost is None else f'${usage.cost:.6f}'
    if usage.unmeasured_requests:
        # Not 0 tokens and "unpriced": the provider did not say, so neither is known (nor the turn's token limit kept).
        # Not "not reported": a provider's 2^70 tokens were reported, and are not a measurement either (QA).
        unmeasured = f'usage not measured for {usage.unmeasured_requests} of {_count(usage.requests, "request")}'
        tokens = f'at least {tokens}, {unmeasured}' if usage.total_tokens else f'tokens unknown ({unmeasured})'
        cost = 'unknown' if usage.cost is None or not usage.total_tokens else f'at least ${usage.cost:.6f}'
    from agentrt.agents.cli.transcript import visible_line

    cut = _CUT_OFF.get(result.finish_reason or '')
    return (
        # Its control characters written out, as `audit list` shows the name: an ESC, a U+202E, a newline in it
        # (`--model`, AGENTRT_MODEL) reached the terminal as they were.
        f'model {visible_line(result.model_name)} · {_count(usage.requests, "request")} · {tokens} · cost {cost} · '
        # The turn's count of tools run (pydantic-ai's, the HTTP turn's `tool_calls`), not the tool lines shown: a
        # call refused by validation (arguments not JSON, an unknown tool) was a line, `1 tool` where both said 0 (QA).
        f'{_count(usage.tool_calls, "tool")} · '
        f'{result.duration_s:.2f} s · session {result.session_id}' + (f' · {cut}' if cut else '')
    )


def _count(number: int, noun: str) -> str:
    """`1 request`, `3 requests` (the summary said `1 requests`; QA)."""
    return f'{number:,} {noun}' + ('' if number == 1 else 's')


# A cut-off answer reads like a whole one: the summary says it was cut (the turn is saved as it is).
_CUT_OFF = {
    'length': 'the answer was cut off at its output token limit',
    'content_filter': "the answer was cut off by the provider's content filter",
}
