"""Where the interactive `agentrt chat` reads its lines: a line editor with history in a terminal, plain lines else.

In a terminal (prompt_toolkit): arrows, Home/End, Ctrl-A/E/K/U/W, Alt-B/F, history (Up/Down, Ctrl-R) kept in a file
across sessions; Ctrl-C clears the line, and at an empty prompt asks once more before leaving; Ctrl-D at an empty
prompt leaves. A line stops growing at the message limit (what comes after it is counted, and the line is refused
as too long when Enter is pressed): prompt_toolkit copies the whole line for each key typed (and keeps each copy for
undo), so a megabyte arriving as keys rather than as a bracketed paste took gigabytes and minutes.

Elsewhere (a pipe, a file, a test), lines are read as they come, with no prompt on standard output:
there the answers are what a script captures (`agentrt chat < questions.txt > answers.txt`), and a `you> ` before each
one was mixed into them. A person typing into a terminal whose output goes elsewhere (`agentrt chat | tee log`) gets
the prompt on stderr. Either way `read()` raises `EOFError` when the conversation should end.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import errno
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prompt_toolkit.buffer import Buffer
    from prompt_toolkit.history import FileHistory, History
    from prompt_toolkit.key_binding import KeyBindings

from agentrt.agents.cli.support import console, err_console

PROMPT = '[bold cyan]you>[/] '  # rich markup, for plain lines typed at a terminal; the line editor draws the same
HISTORY_ENV = 'AGENTRT_CHAT_HISTORY'
LEAVE_HINT = 'press Ctrl-C again (or Ctrl-D) to leave'
# A line longer than this keeps no undo steps: each one is a copy of the whole line.
UNDO_MAX_CHARS = 2_000


class LineSource(Protocol):
    """Where the conversation's lines come from."""

    async def read(self) -> str:
        """The next line, without its end of line.

        Raises:
            EOFError: the user left (Ctrl-D, end of input, Ctrl-C twice at an empty prompt, `interrupt()`).
        """
        ...

    def interrupt(self) -> None:
        """End a `read()` in progress with `EOFError` (a SIGINT while waiting for input: leave)."""
        ...


def history_path(data_dir: Path) -> Path | None:
    """The history file: `AGENTRT_CHAT_HISTORY` (empty: no history), else `chat-history` beside the data directory."""
    configured = os.environ.get(HISTORY_ENV)
    if configured is not None:
        return Path(configured).expanduser() if configured.strip() else None
    return data_dir.parent / 'chat-history'


def open_line_source(history: Path | None, *, max_chars: int | None = None) -> LineSource:
    """A line editor when both ends are a terminal, else plain lines from stdin (prompted on stderr when a person types
    them at a terminal, not prompted when they come from a pipe or a file).

    Args:
        history: the line editor's history file (None: kept in memory only).
        max_chars: the longest line the line editor takes in (the message limit); None: no limit.
    """
    typed = _is_terminal(sys.stdin)
    if typed and _is_terminal(sys.stdout):
        return TerminalLines(history, max_chars=max_chars)
    return PlainLines(prompted=typed)


def _is_terminal(stream: object) -> bool:
    """Whether `stream` is a terminal; a closed descriptor (`agentrt chat <&-`: the stream is None) is not."""
    isatty = getattr(stream, 'isatty', None)
    return bool(isatty()) if isatty is not None else False


_LINE_END = re.compile(r'\r\n|\r|\n')
"""A line's end in piped input: universal newlines, as `open()` reads text."""


class PlainLines:
    """Lines from stdin as they come, read in a daemon thread: a signal that stops the command while it waits for
    input must not leave the process waiting for that thread at exit.

    The thread reads the file descriptor itself (`os.read`), not `sys.stdin`: a daemon thread blocked inside the
    buffered `sys.stdin` holds its lock, and the interpreter, closing `sys.stdin` as it exits, then aborts ("Fatal
    Python error: _enter_buffered_busy", SIGABRT) instead of exiting with the signal's code. One thread reads ahead
    for every `read()`, so a line is never lost to a read that was interrupted. A stdin without a file descriptor (a
    test's in-memory input) is read line by line in a thread per `read()`.
    """

    def __init__(self, *, prompted: bool = False) -> None:
        """`prompted`: show `you> ` on stderr before each line (someone types them); never on stdout, the answers'."""
        self._prompted = prompted
        self._pending: asyncio.Future[str] | None = None
        self._lines: collections.deque[str] = collections.deque()
        self._end: BaseException | None = None  # EOFError at the end of input, or what reading raised
        self._reading = False

    def interrupt(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(EOFError())

    async def read(self) -> str:
        if sys.stdin is None:  # no standard input at all (`agentrt chat <&-`): the end of input, as an empty one
            raise EOFError
        loop = asyncio.get_running_loop()
        fd = _stdin_fd()
        if fd is None:
            return await self._read_in_memory(loop)
        self._prompt()
        if not self._reading:
            self._reading = True
            threading.Thread(target=self._pump, args=(fd, loop), name='agentrt-chat-input', daemon=True).start()
        if self._lines:
            return self._lines.popleft()
        if self._end is not None:
            raise self._end
        line: asyncio.Future[str] = loop.create_future()
        self._pending = line
        return await line

    def _pump(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        """Read `fd` to its end, handing each line (or the end, or the error) to the event loop."""
        decoder = codecs.getincrementaldecoder(getattr(sys.stdin, 'encoding', None) or 'utf-8')('replace')
        buffered = ''
        try:
            while chunk := os.read(fd, 65536):
                buffered += decoder.decode(chunk)
                # Lines end as Python's own text files say (`\n`, `\r\n` or `\r`): a file saved with CR endings was
                # one message, its questions but the last lost (QA). A CR at the end of what has come waits for
                # the next read, which may begin with the LF of the same line end.
                held = buffered.endswith('\r')
                *lines, buffered = _LINE_END.split(buffered[:-1] if held else buffered)
                buffered += '\r' if held else ''
                for line in lines:
                    self._hand(loop, line)
            buffered += decoder.decode(b'', final=True)
            if buffered:
                self._hand(loop, buffered.removesuffix('\r'))
            self._hand(loop, EOFError())
        except BaseException as exc:  # anything the stream raises ends the conversation as EOF would
            self._hand(loop, exc)

    def _hand(self, loop: asyncio.AbstractEventLoop, item: str | BaseException) -> None:
        try:
            loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the loop is closed: the command has ended
            pass

    def _deliver(self, item: str | BaseException) -> None:
        pending, self._pending = self._pending, None
        if isinstance(item, BaseException):
            self._end = item
            if pending is not None and not pending.done():
                pending.set_exception(item)
        elif pending is not None and not pending.done():
            pending.set_result(item)
        else:
            self._lines.append(item)

    def _prompt(self) -> None:
        if self._prompted:
            err_console.print(PROMPT, end='')

    async def _read_in_memory(self, loop: asyncio.AbstractEventLoop) -> str:
        self._prompt()
        line: asyncio.Future[str] = loop.create_future()
        self._pending = line

        def settle(outcome: Callable[[], None]) -> None:
            if not line.done():
                outcome()

        def read() -> None:
            try:
                text = sys.stdin.readline()
                if not text:
                    raise EOFError
                text = text.removesuffix('\n').removesuffix('\r')
            except BaseException as exc:  # EOFError at the end of input, anything else the stream raises
                error = exc
                loop.call_soon_threadsafe(settle, lambda: line.set_exception(error))
            else:
                loop.call_soon_threadsafe(settle, lambda: line.set_result(text))

        threading.Thread(target=read, name='agentrt-chat-input', daemon=True).start()
        return await line


def _stdin_fd() -> int | None:
    """The file descriptor behind `sys.stdin`, or None when it has none (an in-memory stream)."""
    try:
        return sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return None


class TerminalLines:
    """prompt_toolkit's line editor, with the history file (created readable by its owner only)."""

    def __init__(self, history: Path | None, *, max_chars: int | None = None) -> None:
        """`max_chars`: a line stops growing there, and `read()` refuses it as too long (None: no limit)."""
        from prompt_toolkit import PromptSession
        from prompt_toolkit.formatted_text import HTML

        self._armed = False  # Ctrl-C was pressed at an empty prompt: a second one leaves
        self._max_chars = max_chars
        self._untaken = 0  # characters typed or pasted past `max_chars` into the line being read
        self._taking = False  # an insertion of `_take` is under way
        self._message = HTML('<ansicyan><b>you&gt;</b></ansicyan> ')
        # The default file's directory (beside the data directory) is made when missing; the one of a file
        # AGENTRT_CHAT_HISTORY names must exist: `/nonexistent/dir/hist` made `/nonexistent/dir/`, as root (QA).
        make_parents = os.environ.get(HISTORY_ENV) is None
        stored = _private_file(history, make_parents=make_parents) if history is not None else None
        self._history_path = history
        self._history_file = _kept_history(stored) if isinstance(stored, Path) else None
        # A file refused at the start is said as one whose write fails is: a directory named by AGENTRT_CHAT_HISTORY
        # was silently no history at all.
        self._history_refused = stored if isinstance(stored, str) else None
        self._history_told = False
        kept: History = self._history_file if self._history_file is not None else _memory_history()
        # A line refused as too long is not kept: kept cut to the limit, Up then Enter sent the cut text, silently
        # another question (QA); nor is one recalled from an earlier session's history that is over today's limit,
        # which each Up and Enter added again (QA).
        kept.refuses = self._too_long  # type: ignore[attr-defined]  # both classes below have it
        self._session: PromptSession[str] = PromptSession(
            history=kept,
            key_bindings=self._key_bindings(),
            enable_history_search=False,
            search_ignore_case=True,  # Ctrl-R: `derm` finds "Dermatologists in Boston", as a shell's search does
        )
        self._session.default_buffer.on_text_changed += self._disarm

    async def read(self) -> str:
        """The next line.

        Raises:
            EOFError: the user left.
            InvalidInputError: the line went past the message limit (the chat goes on: the next line is read).
        """
        self._armed = False
        self._untaken = 0
        self._tell_history_failure()  # a file refused at the start: before the first prompt
        # The chat loop owns SIGINT (it stops an answer); at the prompt Ctrl-C is a key (the terminal is raw).
        line = await self._session.prompt_async(self._message, handle_sigint=False)
        self._tell_history_failure()
        if self._too_long(line) and self._max_chars is not None:
            from agentrt.agents.turn_input import message_too_long

            raise message_too_long(len(line) + self._untaken, max_chars=self._max_chars)
        return line

    def _too_long(self, line: str) -> bool:
        """Whether `line`, the one being accepted, went past the limit: typed or pasted past it (`_untaken`), or
        recalled from the history whole."""
        return self._max_chars is not None and (self._untaken > 0 or len(line) > self._max_chars)

    def _tell_history_failure(self) -> None:
        """Say once that the history file could not be written (the chat goes on, its lines kept in memory)."""
        failure = self._history_refused or getattr(self._history_file, 'failure', None)
        if failure is None or self._history_told:
            return
        self._history_told = True
        err_console.print(
            f"chat history: cannot use {self._history_path} ({failure}); this session's lines are kept "
            f'in memory only ({HISTORY_ENV} names another file, empty for none)',
            style='yellow',
            highlight=False,
            markup=False,
        )

    def interrupt(self) -> None:
        if self._session.app.is_running:
            self._session.app.exit(exception=EOFError())

    def _disarm(self, _: object) -> None:
        self._armed = False
        if not self._taking:
            # Any change but an insertion (Backspace, Ctrl-U, Ctrl-C's clearing, a history line): the line is what
            # the person now sees and chose, not the one that stopped growing; its length judged so. It was refused
            # with the length of text long deleted ("45 characters; the limit is 40" of a short line: QA).
            self._untaken = 0

    def _take(self, buffer: Buffer, text: str) -> None:
        """Insert `text` up to the limit; count the rest (a line is never sent cut short: `read()` refuses it)."""
        if self._max_chars is not None:
            room = max(self._max_chars - len(buffer.text), 0)
            if len(text) > room:
                self._untaken += len(text) - room
                text = text[:room]
        if text:
            self._taking = True
            try:
                buffer.insert_text(text)
            finally:
                self._taking = False

    def _key_bindings(self) -> KeyBindings:
        from prompt_toolkit.application import run_in_terminal
        from prompt_toolkit.filters import emacs_insert_mode, vi_insert_mode
        from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
        from prompt_toolkit.keys import Keys

        bindings = KeyBindings()

        def undo_point(event: KeyPressEvent) -> bool:
            return len(event.current_buffer.text) < UNDO_MAX_CHARS

        # In place of prompt_toolkit's own (ours are looked up last, so they win).
        @bindings.add(Keys.Any, filter=vi_insert_mode | emacs_insert_mode, save_before=undo_point)
        def _insert(event: KeyPressEvent) -> None:
            self._take(event.current_buffer, event.data * event.arg)

        @bindings.add(Keys.BracketedPaste)
        def _paste(event: KeyPressEvent) -> None:
            # As prompt_toolkit's: some terminals paste \r\n or \r line endings.
            self._take(event.current_buffer, event.data.replace('\r\n', '\n').replace('\r', '\n'))

        @bindings.add(Keys.Vt100MouseEvent)
        def _not_a_mouse(event: KeyPressEvent) -> None:
            # The mouse is not turned on, so no terminal reports it: this is a colour code typed or pasted without
            # bracketing (ESC [ 3 1 m), which prompt_toolkit's mouse handler failed on with a traceback.
            pass

        @bindings.add('c-c')
        def _interrupt(event: KeyPressEvent) -> None:
            buffer = event.app.current_buffer
            if buffer.text:
                buffer.reset()  # (no text-changed event: the count of what did not fit is cleared here)
                self._untaken = 0
            elif self._armed:
                event.app.exit(exception=EOFError())
            else:
                self._armed = True
                run_in_terminal(lambda: console.print(LEAVE_HINT, style='dim', highlight=False))

        return bindings


def _memory_history() -> History:
    """prompt_toolkit's history in memory, which keeps no line `refuses` says not to (`_kept_history` alike)."""
    from prompt_toolkit.history import InMemoryHistory

    class MemoryHistory(InMemoryHistory):
        refuses: Callable[[str], bool] = staticmethod(lambda line: False)

        def append_string(self, string: str) -> None:
            if not self.refuses(string):
                super().append_string(string)

    return MemoryHistory()


def _kept_history(path: Path) -> FileHistory:
    """prompt_toolkit's history file, whose writes may fail without breaking the line editor: one failing (a full
    disk, its directory gone) was a traceback and "Press ENTER to continue..." in the middle of the chat, for every
    line. The line is kept in memory all the same (prompt_toolkit's own list), and the failure noted (`failure`)."""
    from prompt_toolkit.history import FileHistory

    class KeptHistory(FileHistory):
        failure: str | None = None
        refuses: Callable[[str], bool] = staticmethod(lambda line: False)  # the line accepted is not to be kept

        def append_string(self, string: str) -> None:
            if not self.refuses(string):
                super().append_string(string)

        def load_history_strings(self) -> Iterable[str]:
            try:
                yield from super().load_history_strings()
            except OSError as exc:  # read when the editor first starts: one that fails is an empty history
                self.failure = self.failure or exc.strerror or str(exc)

        def store_string(self, string: str) -> None:
            try:
                super().store_string(string)
            except OSError as exc:
                self.failure = self.failure or exc.strerror or str(exc)

    return KeptHistory(str(path))


def _private_file(path: Path, *, make_parents: bool = True) -> Path | str:
    """`path`, created if missing with owner-only permissions (what is typed may be private), an existing one of ours
    made owner-only; else why it is not used: it cannot be, its directory does not exist or is not a directory (and
    `make_parents` is False), it is a symlink, not a file, or another user's (a `chat-history` beside a data directory
    under `/tmp` is a name anyone could have taken first, to read what is typed)."""
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif (problem := _directory_problem(path.parent)) is not None:
            return problem
        fd = os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                return 'not a file'
            if status.st_uid != os.geteuid():
                return "another user's file"
            if stat.S_IMODE(status.st_mode) & 0o077:  # an earlier version's, or made by hand
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW on a symlink
            return 'a symlink, not followed'
        if exc.errno in (errno.EEXIST, errno.ENOTDIR) and (problem := _directory_problem(path.parent)) is not None:
            return problem  # the default's directory could not be made: "File exists", "Not a directory"
        return exc.strerror or str(exc)
    return path


def _directory_problem(directory: Path) -> str | None:
    """Why `directory` cannot hold the history file, when it does not exist or is not a directory; else None."""
    try:
        if stat.S_ISDIR(directory.stat().st_mode):
            return None
    except FileNotFoundError:
        return f'its directory {directory} does not exist'
    except NotADirectoryError:
        pass  # a file above it
    except OSError as exc:
        return f'its directory {directory}: {exc.strerror or exc}'
    # A file where a directory is meant (`file.txt/history`, `file.txt/sub/history`): "does not exist" was said (QA).
    blocking = next((p for p in (*reversed(directory.parents), directory) if p.exists() and not p.is_dir()), directory)
    if blocking == directory:
        return f'its parent {directory} is not a directory'
    return f'its parent {directory} cannot exist: {blocking} is not a directory'
