"""`agentrt chat`: in-process through the CLI runner, plus one end-to-end run in a subprocess."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from pydantic_ai.messages import UserPromptPart
from pydantic_ai.models import override_allow_model_requests
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from rich.console import Console
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from agentrt.agents.cli import chat
from agentrt.db.errors import DatabaseDisconnectedError
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services import directory_service
from agentrt.services.conversations import PostgresConversationStore
from tests.agents.cli.helpers import ROOT, invoke, run_cli
from tests.agents.conftest import account_id
from tests.factories import ledger_rows
from tests.fake_openai import FakeOpenAI, Reply

QUESTION = 'Find me cardiologists in Seattle who accept Medicare'


async def test_chat_in_a_subprocess_streams_a_grounded_answer_with_tool_calls_and_summary(
    demo_data: None, database_url: str
) -> None:
    result = await asyncio.to_thread(
        run_cli, 'chat', QUESTION, '--delay', '0', '--session', 'cli-1', env={'DATABASE_URL': database_url}
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count('→ search_directory(') == 4
    assert out.count('✓ search_directory') == 4
    assert out.count('✓ get_directory_entry') == 3
    assert 'I found ' in out and 'Cardiology providers in Seattle who accept Medicare' in out
    assert 'model demo · 3 requests' in out and 'cost unpriced · 7 tools' in out
    assert 'session cli-1' in out
    # A search starts for every criterion before the first one finishes: they run in parallel.
    lines = [line.strip() for line in out.splitlines()]
    first_done = next(i for i, line in enumerate(lines) if line.startswith('✓'))
    assert sum(1 for line in lines[:first_done] if line.startswith('→ search_directory')) == 4


async def test_the_tool_calls_a_failed_turn_cut_off_are_closed_as_not_finished(
    demo_data: None, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database that stops answering in the middle of the searches: each started `→` line stayed open above the
    # error, as if the searches were still running (QA).
    search = directory_service.search_directory
    calls: list[int] = []

    async def one_fails(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise DatabaseDisconnectedError('PostgreSQL did not answer a statement within 35s')
        await asyncio.sleep(0.3)
        return await search(*args, **kwargs)

    monkeypatch.setattr(directory_service, 'search_directory', one_fails)
    result = await invoke(
        'chat', QUESTION, '--delay', '0', '--session', 'cut-tools', env={'DATABASE_URL': database_url}
    )
    assert result.exit_code == 3, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    assert sum(line.startswith('→ search_directory(') for line in lines) == 4
    assert lines[4:] == ['✗ not finished search_directory'] * 4, result.stdout
    assert 'did not answer a statement' in result.stderr


async def test_a_second_turn_continues_the_conversation(demo_data: None, database_url: str) -> None:
    env = {'DATABASE_URL': database_url}
    first = await invoke('chat', QUESTION, '--delay', '0', '--session', 'cli-2', env=env)
    assert first.exit_code == 0, first.stderr
    assert first.stdout.count('✓ get_directory_entry') == 3 and 'model demo · 3 requests' in first.stdout
    again = await invoke('chat', 'and dermatologists?', '--delay', '0', '--session', 'cli-2', env=env)
    assert again.exit_code == 0, again.stderr
    assert 'session cli-2' in again.stdout


async def test_interactive_loop_reads_stdin_until_exit(demo_data: None, database_url: str) -> None:
    result = await invoke(
        'chat', '--delay', '0', input='organic berries in Fresno\nexit\n', env={'DATABASE_URL': database_url}
    )
    assert result.exit_code == 0, result.stderr
    assert 'conversation cli-' in result.stderr
    assert 'model demo' in result.stdout


async def test_piped_lines_get_no_prompt_among_the_answers(demo_data: None, database_url: str) -> None:
    # `agentrt chat < questions.txt > answers.txt`: a `you> ` before each answer was mixed into what the script read.
    lines = 'organic berries in Fresno\nand apples?\n'
    result = await invoke('chat', '--delay', '0', input=lines, env={'DATABASE_URL': database_url})
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count('model demo') == 2
    assert 'you>' not in result.stdout and 'you>' not in result.stderr


async def test_piped_lines_exit_with_the_last_failed_turns_code(demo_data: None, database_url: str) -> None:
    # A script feeding lines cannot read the errors: the exit code says that a turn failed, and which kind last.
    env = {'DATABASE_URL': database_url, 'AGENTRT_MESSAGE_MAX_CHARS': '40'}
    lines = 'organic berries in Fresno\n' + 'x' * 41 + '\norganic berries in Fresno\n'
    result = await invoke('chat', '--delay', '0', input=lines, env=env)
    assert result.exit_code == 2, result.stderr  # InvalidInputError's code, as for `agentrt chat <that message>`
    assert result.stdout.count('model demo') == 2  # the failed line did not end the conversation
    assert 'AGENTRT_MESSAGE_MAX_CHARS' in result.stderr
    assert 'error: 1 of 3 turns failed' in result.stderr
    every_line_answered = await invoke('chat', '--delay', '0', input='organic berries in Fresno\n', env=env)
    assert every_line_answered.exit_code == 0, every_line_answered.stderr
    assert 'turns failed' not in every_line_answered.stderr


# A turn the database failed though PostgreSQL was there: what it said, and when to send the message again.
DATABASE_THERE = {
    # The demo's four searches at once on a pool of two, each holding its connection a while: two wait DB_POOL_TIMEOUT.
    'pool exhausted': (
        'SELECT 1',
        {'DB_POOL_SIZE': '2', 'DB_MAX_OVERFLOW': '0', 'DB_POOL_TIMEOUT': '0.2'},
        'no database connection became free within 0.2s (DB_POOL_TIMEOUT)',
        'send the message again shortly',
    ),
    'statement timeout': (
        'SELECT pg_sleep(5)',
        {'DB_STATEMENT_TIMEOUT_MS': '200'},
        'PostgreSQL cancelled a statement',
        'send the message again',
    ),
}


@pytest.mark.parametrize('case', list(DATABASE_THERE))
async def test_a_turn_the_database_failed_while_there_is_not_said_to_wait_for_postgresql(
    demo_data: None, database_url: str, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    # It said "send the message again once PostgreSQL is back" of a pool that was full and a statement PostgreSQL
    # cancelled: PostgreSQL was never away.
    statement, env, said, advice = DATABASE_THERE[case]
    search = directory_service.search_directory

    async def slow_search(*args: Any, session: AsyncSession, **kwargs: Any) -> Any:
        await session.execute(text(statement))  # the session takes its connection at its first statement
        await asyncio.sleep(1)
        return await search(*args, session=session, **kwargs)

    monkeypatch.setattr(directory_service, 'search_directory', slow_search)
    result = await invoke('chat', QUESTION, '--delay', '0', env={'DATABASE_URL': database_url, **env})
    assert result.exit_code == 3, result.stdout + result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert said in line and line.endswith(f'the turn was not saved: {advice}'), line


async def test_unknown_account_is_a_clear_error(demo_data: None, database_url: str) -> None:
    result = await invoke('chat', QUESTION, '--account', 'nope', env={'DATABASE_URL': database_url})
    assert result.exit_code == 2
    assert "unknown account 'nope'" in result.stderr and 'acme-health' in result.stderr


@pytest.mark.parametrize(
    ('model', 'said'),
    [('nosuch:model', 'Unknown model: nosuch:model'), ('openai:gpt-4o', 'Set the `OPENAI_API_KEY` environment')],
)
async def test_a_model_that_cannot_be_used_is_refused_before_the_database_starts(model: str, said: str) -> None:
    # It was found by the first turn, after the database started: a server that cannot be reached was the error
    # (exit 3), a first start waited for initdb, the migrations and the seeding, and a conversation (lines piped or
    # typed) refused each of its lines with it.
    env = {'DATABASE_URL': 'postgresql://agentrt@127.0.0.1:9/never', 'OPENAI_API_KEY': None}
    for args, lines in [(['chat', QUESTION], None), (['chat'], f'{QUESTION}\nand in Denver?\n')]:
        result = await invoke(*args, '--model', model, env=env, input=lines)  # type: ignore[arg-type]
        assert result.exit_code == 2, result.stderr
        assert result.stderr.startswith(f"error: model '{model}' cannot be used: {said}"), result.stderr
        assert result.stderr.count('error:') == 1 and result.stdout == ''


async def test_unknown_model_is_a_usage_error(demo_data: None, database_url: str) -> None:
    result = await invoke('chat', QUESTION, '--model', 'nosuch:model', env={'DATABASE_URL': database_url})
    assert result.exit_code == 2
    assert "model 'nosuch:model'" in result.stderr


async def test_bad_flag_value_is_rejected(database_url: str) -> None:
    result = await invoke('chat', QUESTION, '--delay', 'fast', env={'DATABASE_URL': database_url})
    assert result.exit_code == 2
    assert '--delay' in result.stderr


def _chat_on_an_open_pipe_then(signal_number: int, database_url: str) -> tuple[int, str, str]:
    """`agentrt chat` reading its lines from a pipe that stays open (a script feeding it): the first line answered,
    the signal sent while it waits for the next one."""
    env = {**os.environ, 'COLUMNS': '200', 'DATABASE_URL': database_url, 'AGENTRT_CHAT_HISTORY': ''}
    with subprocess.Popen(
        [sys.executable, '-m', 'agentrt.agents.cli', 'chat', '--delay', '0', '--session', 'piped'],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    ) as process:  # its pipes closed at the end
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        try:
            process.stdin.write(f'{QUESTION}\n'.encode())
            process.stdin.flush()
            answered = b''
            # The turn's summary line: it waits for the next line then (no prompt: the input is not a terminal).
            while b'session piped\n' not in answered:
                chunk = process.stdout.read1(4096)
                assert chunk, 'the chat ended before answering'
                answered += chunk
            time.sleep(0.2)  # the summary is written just before the next read starts
            process.send_signal(signal_number)
            # Not `communicate()`: it closes stdin, and the end of input would end the read before the process exits.
            out, err = process.stdout.read(), process.stderr.read()  # a few lines: neither pipe fills up meanwhile
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    return process.returncode, (answered + out).decode(), err.decode()


async def test_a_signal_while_a_piped_chat_waits_for_its_next_line_stops_it_cleanly(
    demo_data: None, database_url: str
) -> None:
    # The reader thread blocked in the buffered sys.stdin made the interpreter abort at exit (SIGABRT, "Fatal Python
    # error: _enter_buffered_busy") instead of exiting with the signal's code.
    code, out, err = await asyncio.to_thread(_chat_on_an_open_pipe_then, signal.SIGTERM, database_url)
    assert 'I found ' in out and 'you>' not in out  # answers only: a prompt was mixed into them
    assert code == 143, err
    assert 'Fatal Python error' not in err and 'stopped by SIGTERM' in err


def _piped_chat_stopped_by_ctrl_c(database_url: str, session_id: str) -> tuple[int, str, str]:
    """`printf 'QUESTION\nand in Boston?\n' | agentrt chat`, with Ctrl-C (SIGINT) while the first answer streams."""
    env = {**os.environ, 'DATABASE_URL': database_url, 'COLUMNS': '200', 'AGENTRT_CHAT_HISTORY': ''}
    command = [sys.executable, '-m', 'agentrt.agents.cli', 'chat', '--session', session_id, '--delay', '0.05']
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(f'{QUESTION}\n'.encode())
        process.stdin.flush()
        answered = process.stdout.read(10)  # the answer is streaming, word by word
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        process.stdin.write(b'and in Boston?\n')  # the chat goes on with the next line
        out, err = process.communicate(timeout=120)  # then the end of its input
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return process.returncode, (answered + out).decode(), err.decode()


async def test_a_piped_chat_whose_answer_ctrl_c_stopped_says_so_and_exits_130(
    demo_data: None, database_url: str
) -> None:
    # It said the answer was stopped and not saved, then exited 0 with no summary: a script feeding lines saw success.
    code, out, err = await asyncio.to_thread(_piped_chat_stopped_by_ctrl_c, database_url, 'piped-stop')
    assert 'stopped: this answer was not saved' in err
    assert "error: 1 of 2 turns failed (1 stopped by Ctrl-C); the exit code is the last failed one's" in err, err
    assert code == 130, err
    assert 'Traceback' not in err and 'Boston' in out
    stored = await PostgresConversationStore(await account_id('acme-health')).load('piped-stop')
    assert stored is not None  # the next line was answered and saved; the stopped one was not
    prompts = [part.content for m in stored.messages for part in m.parts if isinstance(part, UserPromptPart)]
    assert prompts == ['and in Boston?']


# The usage rollup the turn leaves, held (it says when it runs): the chat's clean-up is waiting for it at the stop.
_SLOW_ROLLUP_CHAT = """
import asyncio, os, sys
from agentrt.services import post_turn

async def held_rollup(*args, **kwargs):
    os.write(2, b'rollup running\\n')
    await asyncio.sleep(60)

post_turn.roll_up_account_usage = held_rollup
from agentrt.agents.cli_entry import main
main()
"""


def _chat_stopped_after_its_summary(database_url: str, session_id: str, signal_number: int) -> tuple[int, str, str]:
    """`agentrt chat QUESTION`, the signal sent once the summary line is out, while the clean-up waits on the rollup."""
    env = {**os.environ, 'DATABASE_URL': database_url, 'COLUMNS': '200'}
    command = [sys.executable, '-c', _SLOW_ROLLUP_CHAT, 'chat', QUESTION, '--delay', '0', '--session', session_id]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        said = b''
        while b'rollup running\n' not in said:
            chunk = process.stderr.read1(4096)
            assert chunk, 'the chat ended before its rollup ran'
            said += chunk
        answered = b''
        while f'session {session_id}\n'.encode() not in answered:  # the summary line: the turn is saved
            chunk = process.stdout.read1(4096)
            assert chunk, 'the chat ended before its summary line'
            answered += chunk
        process.send_signal(signal_number)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return process.returncode, (answered + out).decode(), (said + err).decode()


async def test_a_ctrl_c_after_the_turn_was_saved_says_so_and_exits_0(demo_data: None, database_url: str) -> None:
    # A Ctrl-C just after the summary line, while the clean-up waited on the usage rollup: exit 130 and "stopped by
    # SIGINT; nothing in progress was saved", though the turn was saved; a script sending it again added it twice (QA).
    code, out, err = await asyncio.to_thread(
        _chat_stopped_after_its_summary, database_url, 'saved-then-int', signal.SIGINT
    )
    assert 'session saved-then-int' in out
    assert 'interrupted after the turn was saved (session saved-then-int): only its clean-up was cut short' in err
    assert 'nothing in progress was saved' not in err and 'error:' not in err, err
    assert code == 0, err
    stored = await PostgresConversationStore(await account_id('acme-health')).load('saved-then-int')
    assert stored is not None
    prompts = [part.content for m in stored.messages for part in m.parts if isinstance(part, UserPromptPart)]
    assert prompts == [QUESTION]


def _chat_read_by_head(database_url: str, session_id: str, lines: bytes | None = None) -> tuple[int, bytes, str]:
    """`agentrt chat QUESTION | head -c 20` (or `... lines | agentrt chat | head -c 20`): the reader takes 20 bytes
    and closes its end of the pipe, the answer still streaming (the demo model pauses between words)."""
    env = {**os.environ, 'DATABASE_URL': database_url, 'COLUMNS': '200'}
    question = [] if lines is not None else [QUESTION]
    command = [sys.executable, '-m', 'agentrt.agents.cli', 'chat', *question, '--session', session_id]
    command += ['--delay', '0.02']
    stdin = subprocess.DEVNULL if lines is None else subprocess.PIPE
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stderr is not None
        if lines is not None:
            assert process.stdin is not None
            process.stdin.write(lines)
            process.stdin.close()
        head = process.stdout.read(20)
        process.stdout.close()  # the reader went away
        err = process.stderr.read()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        assert process.stderr is not None
        process.stderr.close()
    return process.returncode, head, err.decode()


async def test_a_reader_that_closes_stdout_early_ends_the_output_not_the_turn(
    demo_data: None, database_url: str
) -> None:
    # It exited 1 with nothing said (click's own handling of a broken pipe), the turn cut short and not saved.
    code, head, err = await asyncio.to_thread(_chat_read_by_head, database_url, 'read-by-head')
    assert len(head) == 20
    assert code == 0, err
    assert 'error' not in err.lower() and 'Traceback' not in err and 'Exception ignored' not in err, err
    # The turn ran to its end and was saved, as billed: the next turn continues it.
    async with get_db_session(account=Unscoped.ADMIN) as session:
        saved = await session.execute(
            text("SELECT count(*) FROM conversations WHERE conversation_id = 'read-by-head' AND title IS NOT NULL")
        )
        assert saved.scalar_one() == 1
    statuses = {row['status'] for row in await ledger_rows(chat_session_id='read-by-head')}
    assert statuses == {'complete'}


async def test_piped_lines_stop_when_the_reader_of_the_output_goes_away(demo_data: None, database_url: str) -> None:
    # `questions | agentrt chat | head -c 20`: the turn the reader left in runs to its end (billed), and no further
    # line is sent to the model for an output nobody reads.
    lines = f'{QUESTION}\nand in Boston?\nand in Denver?\n'.encode()
    code, head, err = await asyncio.to_thread(_chat_read_by_head, database_url, 'left-early', lines)
    assert len(head) == 20 and code == 0, err
    assert 'Traceback' not in err and 'the lines left were not sent' in err, err
    rows = await ledger_rows(chat_session_id='left-early')
    assert len(rows) == 3 and {row['status'] for row in rows} == {'complete'}  # the first turn's 3 requests only


async def test_a_lone_surrogate_in_the_models_answer_is_printed_as_a_replacement_character(
    demo_data: None, database_url: str
) -> None:
    # A provider's JSON can carry "\ud83d" (half an emoji cut at a chunk boundary). Printing it to a pipe failed in
    # the middle of the answer: "internal error: UnicodeEncodeError: 'utf-8' codec can't encode character '\ud83d'",
    # exit 70. It prints as U+FFFD, as the store saves it.
    answer = 'Found Dr \ud83d in Seattle \udc00.'
    with FakeOpenAI(lambda _: Reply(text=answer)).running() as fake:
        env = {
            'DATABASE_URL': database_url,
            'AGENTRT_MODEL': 'openai:gpt-4o-mini',
            'OPENAI_BASE_URL': fake.base_url,
            'OPENAI_API_KEY': 'sk-test',
        }
        done = await asyncio.to_thread(run_cli, 'chat', '--session', 'odd', 'hi', env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'Found Dr \ufffd in Seattle \ufffd.' in done.stdout
    async with get_db_session(account=Unscoped.OWNER) as session:
        saved = (await session.execute(text('SELECT count(*) FROM conversations'))).scalar_one()
    assert saved == 1


async def test_a_piped_answer_is_the_models_text_byte_for_byte(demo_data: None, database_url: str) -> None:
    # Piped, the answer went through rich: tabs became spaces, CR, BEL, BS, VT and FF were dropped, ESC, DEL and C1
    # passed (qa140). A script capturing it (a TSV, a Makefile) now gets the text `simple_chat` gives, NUL as U+FFFD.
    from agentrt.agents.simple_chat import simple_chat

    answer = 'name\tcity\nAva\tBoston\r\nA\rB\x07C\x08D\x0bE\x0cF\x1b[2JG\x7fH\x00I\x85J\u2028K\x9b\u202eL\n\tmake\n'
    with override_allow_model_requests(True), FakeOpenAI(lambda _: Reply(text=answer, chunks=7)).running() as fake:
        env = {
            **os.environ,
            'DATABASE_URL': database_url,
            'AGENTRT_MODEL': 'openai:gpt-4o-mini',
            'OPENAI_BASE_URL': fake.base_url,
            'OPENAI_API_KEY': 'sk-test',
        }
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, '-m', 'agentrt.agents.cli', 'chat', '--session', 'bytes', '--delay', '0', 'hi'],
            capture_output=True,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
        model = OpenAIChatModel('gpt-4o-mini', provider=OpenAIProvider(base_url=fake.base_url, api_key='sk-test'))
        said = await simple_chat('hi', session_id='bytes-python', account='acme-health', model=model)
    assert done.returncode == 0, done.stderr[-2000:]
    assert said.output == answer.replace('\x00', '\ufffd')
    assert done.stdout.startswith(said.output.encode() + b'model gpt-4o-mini'), done.stdout[:300]


@pytest.mark.parametrize(
    ('name', 'shown'),
    [
        ('gpt[/x]', 'gpt[/x]'),  # a MarkupError after the turn was saved: exit 70, a piped batch stopped there
        ('[local]model', '[local]model'),  # taken for a style: the summary named another model
        ('gpt[link=http://evil.example/]-4o[/link][red]', 'gpt[link=http://evil.example/]-4o[/link][red]'),
        ('gpt\x1b]0;T\x07\x1b[2J\u202eX\nforged', 'gpt\\x1b]0;T\\x07\\x1b[2J\\u202eX\\nforged'),
    ],
    ids=['closing tag', 'style', 'hyperlink', 'controls'],
)
async def test_the_summary_shows_the_models_name_as_text(demo_data: None, name: str, shown: str) -> None:
    # The summary was printed as rich markup with the model's name in it raw (qa140).
    with override_allow_model_requests(True), FakeOpenAI(lambda _: Reply(text='ok')).running() as fake:
        env = {'OPENAI_BASE_URL': fake.base_url, 'OPENAI_API_KEY': 'sk-test'}
        done = await invoke('chat', '--session', 'named', '--model', f'openai-chat:{name}', 'hi', env=env)
    assert done.exit_code == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f'ok\nmodel {shown} · 1 request · '), done.stdout
    assert done.stdout.count('\n') == 2 and '\x1b' not in done.stdout and '\u202e' not in done.stdout


async def test_chats_starting_at_once_on_an_empty_database_say_seeded_once() -> None:
    # Wave 2: three `agentrt chat` started together on a new data directory each printed "empty database: seeded the
    # demo data (4,500 directory entries)", though only the first one's inserts found no row there (ON CONFLICT).
    from agentrt.agents.cli.chat import _seed_demo_if_empty
    from agentrt.agents.cli.support import err_console

    saved = err_console._file
    err_console.file = io.StringIO()
    try:
        await asyncio.gather(*(_seed_demo_if_empty('acme-health') for _ in range(3)))
        said = err_console.file.getvalue()
    finally:
        err_console._file = saved
    assert said.count('empty database: seeded the demo data') == 1, said


async def test_a_chat_with_the_job_queue_prints_the_answer_and_no_queue_notice(
    demo_data: None, database_url: str
) -> None:
    # With AGENTRT_BACKGROUND=queue, the post-turn work opens the queue after the answer is printed: its INFO line
    # ("job queue open on postgresql://...") came after the answer, in the middle of an interactive conversation.
    # The worker, whose log it is, still prints its lines.
    url = database_url.replace('postgresql+asyncpg://', 'postgresql://')  # as a user gives it
    env = {'DATABASE_URL': url, 'AGENTRT_BACKGROUND': 'queue'}
    chat = await invoke('chat', QUESTION, '--delay', '0', '--session', 'queued', env=env)
    assert chat.exit_code == 0, chat.stderr[-2000:]
    assert 'Cardiology' in chat.stdout
    assert 'job queue' not in chat.stderr, chat.stderr
    worker = await invoke('worker', '--burst', env=env)  # runs the turn's jobs, and empties the queue again
    assert worker.exit_code == 0, worker.stderr[-2000:]
    assert 'worker: queues' in worker.stderr and 'job queue open' in worker.stderr, worker.stderr


@pytest.mark.parametrize('terminal', [True, False])
def test_an_escape_sequence_in_the_streamed_answer_is_shown_not_obeyed_in_a_terminal(
    monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    # A model echoing what it was given (a directory entry, a pasted text) sent ESC ] 0 ; ... BEL (the terminal's title)
    # or colour codes straight to the terminal; `audit show` already wrote them out.
    screen = io.StringIO()
    monkeypatch.setattr(chat, 'console', Console(file=screen, force_terminal=terminal, color_system=None))
    display = chat._Display()
    display.text('Dr \x1b]0;PWNED\x07 \x1b[31mred\r\n')
    if terminal:
        assert screen.getvalue() == 'Dr \\x1b]0;PWNED\\x07 \\x1b[31mred\n'
    else:  # a script capturing the answers gets the model's text as it is
        assert screen.getvalue() == 'Dr \x1b]0;PWNED\x07 \x1b[31mred\r\n'


@pytest.mark.parametrize('terminal', [True, False])
def test_a_tool_calls_name_and_arguments_stay_on_their_progress_line(
    monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    # A newline in a tool name the model invented split `→ name(args)` and `✗ retried name N ms` into lines that read
    # as others (QA); ESC was written out, a newline was not, and in a pipe nothing was.
    from agentrt.agents.simple_chat import ToolEvent

    screen = io.StringIO()
    monkeypatch.setattr(chat, 'console', Console(file=screen, force_terminal=terminal, color_system=None, width=200))
    display = chat._Display()
    name = 'search\n  ✓ forged\x1b[2J\r\t'
    display.tool(ToolEvent(name, 'c1', 'not json\nsecond', finished=False))
    display.tool(ToolEvent(name, 'c1', None, finished=True, duration_s=0.012, outcome='retried'))
    display.tool(ToolEvent(name, 'c2', None, finished=False))
    display.unfinished()
    shown = 'search\\n  ✓ forged\\x1b[2J\\x0d\\t'
    assert screen.getvalue().splitlines() == [
        f'  → {shown}(not json\\nsecond)',
        f'  ✗ retried {shown} 12 ms',
        f'  → {shown}()',
        f'  ✗ not finished {shown}',
    ]


def test_a_crlf_split_across_two_deltas_is_one_line_break_in_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CRLF cut between two stream chunks ('line1\r', '\nline2') showed as `line1\x0d` (qa140): the CR is held
    # until the next delta says whether a newline follows it. A CR that ends the answer is still written out.
    screen = io.StringIO()
    monkeypatch.setattr(chat, 'console', Console(file=screen, force_terminal=True, color_system=None))
    display = chat._Display()
    for delta in ('line1\r', '\nline2\r', '', 'x\r', '\r', '\nend\r'):
        display.text(delta)
    display.end_line()
    assert screen.getvalue() == 'line1\nline2\\x0dx\\x0d\nend\\x0d\n'


def test_a_tools_arguments_nested_past_pythons_parser_are_shown_cut_not_a_crash() -> None:
    # `agentrt chat` ended with an internal error (RecursionError, exit 70), a piped session at that line (QA).
    from agentrt.agents.cli.chat import _short_args

    nested = '{"query": null, "filters": ' + '[' * 100_000 + ']' * 100_000 + '}'
    assert _short_args(nested) == nested[:120]
    deep: object = 'leaf'
    for _ in range(100_000):
        deep = [deep]
    assert _short_args({'filters': deep}) == '...'
    assert _short_args('{"query": "cardiology", "limit": 5}') == 'query="cardiology", limit=5'


@pytest.mark.parametrize('account', ['green-grocer', 'acme-health'])
async def test_a_first_chat_with_either_demo_account_seeds_the_demo_data(account: str) -> None:
    # `agentrt chat --account green-grocer ...` (a README example) as the first command on a new data directory failed:
    # "unknown account 'green-grocer'; accounts: none", for only the default account seeded (QA).
    from agentrt.agents.cli.chat import _seed_demo_if_empty

    await _seed_demo_if_empty(account)
    async with get_db_session(account=Unscoped.OWNER) as session:
        slugs = set((await session.execute(text('SELECT slug FROM accounts'))).scalars())
    assert {'acme-health', 'green-grocer'} <= slugs


async def test_a_first_chat_with_an_account_of_ones_own_seeds_nothing() -> None:
    from agentrt.agents.cli.chat import _seed_demo_if_empty

    await _seed_demo_if_empty('my-own-account')
    async with get_db_session(account=Unscoped.OWNER) as session:
        assert (await session.execute(text('SELECT count(*) FROM accounts'))).scalar_one() == 0


def _chat_to_a_full_disk(database_url: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, 'DATABASE_URL': database_url}
    command = [sys.executable, '-m', 'agentrt.agents.cli', 'chat', QUESTION, '--session', 'to-a-full-disk']
    with open('/dev/full', 'w') as full:
        return subprocess.run(
            [*command, '--delay', '0'], cwd=ROOT, env=env, stdout=full, stderr=subprocess.PIPE, timeout=120
        )


async def test_an_output_that_cannot_be_written_is_said_after_the_turn_ran_to_its_end(
    demo_data: None, database_url: str
) -> None:
    # `agentrt chat ... > /dev/full`: "internal error: OSError: [Errno 28] No space left on device" (exit 70), the
    # turn cut off at its first line of output (qa121). The turn runs to its end, saved as billed; one line, exit 1.
    done = await asyncio.to_thread(_chat_to_a_full_disk, database_url)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.decode().splitlines() if line.startswith('error:')]
    assert lines == ['error: the output could not be written (No space left on device); the command ran to its end']
    assert 'Traceback' not in done.stderr.decode()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        saved = await session.execute(
            text("SELECT count(*) FROM conversations WHERE conversation_id = 'to-a-full-disk'")
        )
        assert saved.scalar_one() == 1
    assert {row['status'] for row in await ledger_rows(chat_session_id='to-a-full-disk')} == {'complete'}


def _chat_on_a_terminal_that_goes_away(database_url: str) -> int:
    """`agentrt chat QUESTION` writing to a terminal (not its controlling one) that is closed once the answer comes:
    its exit code."""
    master, terminal = os.openpty()
    env = {**os.environ, 'DATABASE_URL': database_url, 'COLUMNS': '200'}
    command = [sys.executable, '-m', 'agentrt.agents.cli', 'chat', QUESTION, '--session', 'hung-up', '--delay', '0.05']
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True
    )
    os.close(terminal)
    try:
        seen = b''
        while b'Cardiolog' not in seen:  # the answer is being written
            seen += os.read(master, 4096)
        os.close(master)  # the terminal goes away
        return process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


async def test_a_terminal_closed_while_the_answer_is_written_stops_the_chat_as_a_hang_up(
    demo_data: None, database_url: str
) -> None:
    # The window closed (or ssh dropped) during an answer: the next write to the terminal fails with EIO, which was
    # "internal error: OSError: [Errno 5] Input/output error ... report it" (exit 70; qa121). It is the hang-up it is:
    # exit 129, the turn not saved, as a SIGHUP there. (The terminal is not the process's controlling one here, so no
    # SIGHUP comes: only the failed write tells.)
    code = await asyncio.to_thread(_chat_on_a_terminal_that_goes_away, database_url)
    assert code == 128 + signal.SIGHUP
    async with get_db_session(account=Unscoped.ADMIN) as session:
        saved = await session.execute(text("SELECT count(*) FROM conversations WHERE conversation_id = 'hung-up'"))
        assert saved.scalar_one() == 0
    statuses = [row['status'] for row in await ledger_rows(chat_session_id='hung-up')]
    assert statuses and set(statuses) <= {'complete', 'cancelled'}, statuses
