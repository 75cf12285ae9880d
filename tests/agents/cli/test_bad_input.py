"""Every command against bad input: the exit code of its class, exactly one `error:` line, never a traceback."""

from __future__ import annotations

import asyncio
import re

import pytest

from agentrt.db.flags import env_flag
from tests.agents.cli.helpers import invoke, run_cli

BIG = str(2**70)  # beyond 64 bits
NUL = 'a\x00b'
SURROGATE = 'caf\udce9'  # a lone surrogate, as a mis-decoded argument arrives
HUGE = 'x' * 200_000
ANSI = '\x1b[2J\x1b[31mred'  # clears the screen, then red: an argument typed or pasted with an escape sequence

# (arguments, environment, exit code, words the error line has). The database ones use the test server's URL
# unless the case sets DATABASE_URL itself.
CASES: list[tuple[list[str], dict[str, str], int, str]] = [
    # usage: the command line
    (['nosuch'], {}, 2, 'No such command'),
    (['db', 'status', '--bogus'], {}, 2, 'No such option'),
    (['chat', 'hi', '--delay', 'fast'], {}, 2, '--delay'),
    (['chat', 'hi', '--delay', '-1'], {}, 2, '--delay'),
    # typer's range let nan through its comparisons and said "Input should be less than or equal to 2"
    (['chat', 'hi', '--delay', 'nan'], {}, 2, "'--delay': nan is not a number of seconds from 0 to 2"),
    (['chat', 'hi', '--delay', '2.5'], {}, 2, "'--delay': 2.5 is not a number of seconds from 0 to 2"),
    (['chat', ''], {}, 2, 'empty'),
    (['chat', 'hi', '--account', 'nope'], {}, 2, "unknown account 'nope'"),
    (['chat', 'hi', '--account', NUL], {}, 2, ''),  # refused by PostgreSQL, or by the chat's own checks
    (['chat', 'hi', '--agent', 'nope'], {}, 2, 'nope'),
    (['chat', 'hi', '--model', 'nosuch:model'], {}, 2, "model 'nosuch:model'"),
    (['audit', 'list', '--page', '0'], {}, 2, '--page'),
    (['audit', 'list', '--page', BIG], {}, 2, '--page'),
    (['audit', 'list', '--page-size', '101'], {}, 2, '--page-size'),
    (['audit', 'list', '--since', 'yesterday'], {}, 2, '--since'),
    (['audit', 'list', '--failed', '--succeeded'], {}, 2, 'exclude each other'),
    # past a bigint no id, so a slug (slugs may be all digits), one no account has
    (['audit', 'list', '--account', BIG], {}, 2, f"unknown account '{BIG}'"),
    # an account that does not exist: was an empty list, read as "no activity" (a known one with none is still empty)
    (['audit', 'list', '--account', 'nosuch'], {}, 2, "unknown account 'nosuch'; accounts:"),
    (['audit', 'list', '--account', '424242'], {}, 2, 'unknown account id 424242'),
    # `id:N` is always the id N; without one it is refused, not a slug no account has
    (['audit', 'list', '--account', 'id:'], {}, 2, "account 'id:' is not an account id: id: takes the digits"),
    (['costs', '--account', 'id:7x'], {}, 2, "account 'id:7x' is not an account id"),
    (['budget', 'set', '--account', f'id:{BIG}', '--limit', '5'], {}, 2, 'is not an account id'),
    (['audit', 'prune', '--before', '1d', '--account', 'id:424242'], {}, 2, 'unknown account id 424242'),
    (['costs', '--account', 'nosuch'], {}, 2, "unknown account 'nosuch'"),
    (['costs', '--account', 'nosuch', '--source', 'ledger'], {}, 2, "unknown account 'nosuch'"),
    (['keys', 'list', '--account', 'nosuch'], {}, 2, "unknown account 'nosuch'"),
    (['audit', 'show', 'zz'], {}, 2, 'not a request id'),
    (['audit', 'show', NUL], {}, 2, 'not a request id'),
    (['audit', 'show', HUGE], {}, 2, 'not a request id'),
    (['audit', 'show', SURROGATE], {}, 2, 'not a request id'),
    (['audit', 'show', 'ffffffff'], {}, 1, 'no model request'),
    (['costs', '--by', 'planet'], {}, 2, '--by'),
    (['costs', '--since', '2026-13-45'], {}, 2, '--since'),
    (['costs', '--account', BIG], {}, 2, f"unknown account '{BIG}'"),
    # a time past the last (or before the first) moment once in UTC: was an internal error (rollup), a driver's
    # message (ledger)
    (['costs', '--until', '9999-12-31T23:59:59-14:00'], {}, 2, '--until 9999-12-31T23:59:59-14:00 is out of range'),
    (['costs', '--since', '0001-01-01T00:00+14:00', '--source', 'ledger'], {}, 2, '--since'),
    (['audit', 'list', '--until', '9999-12-31T23:00-05:00'], {}, 2, 'out of range'),
    (['audit', 'list', '--since', '2030-01-01', '--until', '2020-01-01'], {}, 2, '--since must be before --until'),
    (
        [
            'budget',
            'set',
            '--account',
            'acme-health',
            '--limit',
            '5',
            '--period',
            '7d',
            '--anchor',
            '0001-01-01T00:00+01:00',
        ],
        {},
        2,
        '--anchor',
    ),
    (['db', 'upgrade', 'nosuchrevision'], {}, 2, 'nosuchrevision'),
    # Alembic asserts on it: was "migrating ... failed: AssertionError: AssertionError" (exit 5)
    (['db', 'upgrade', 'head+1'], {}, 2, "cannot migrate to 'head+1': it names no migration after"),
    (['ledger', 'replay', '--spool', '/proc/no/such/dir/spool.jsonl'], {}, 2, 'spool'),
    # a path the system refuses to look at (ENAMETOOLONG): was an internal error; an empty one was "'.' is a directory"
    (['ledger', 'replay', '--spool', HUGE], {}, 2, '--spool: xxxx'),
    (['ledger', 'replay', '--spool', ''], {}, 2, '--spool is empty'),
    # was an internal error (ValueError: embedded null byte, exit 70) from opening the file
    (['ledger', 'replay', '--spool', NUL], {}, 2, "--spool: 'a\\x00b' has a NUL character"),
    # a library's message quoting the value as it came: the escape sequence went to the terminal (cleared it)
    (['chat', 'hi', '--model', ANSI], {}, 2, 'Unknown model: \\x1b[2J\\x1b[31mred'),
    (['db', 'upgrade', NUL], {}, 2, "Can't locate revision identified by 'a\\x00b'"),
    (['db', 'upgrade', ANSI], {}, 2, "cannot migrate to '\\x1b[2J\\x1b[31mred'"),
    # empty, blank and hostile values of the other free-text options: one line naming the option
    (
        ['costs', '--since', '   '],
        {},
        2,
        "--since must be an ISO date or time (e.g. 2026-03-01 or 2026-03-01T12:00), got ' '",
    ),
    (['costs', '--until', NUL], {}, 2, '--until must be an ISO date or time'),
    (['audit', 'list', '--since', ANSI], {}, 2, '--since must be an ISO date or time'),
    (['costs', '--by', ''], {}, 2, '--by must be one of'),
    (['costs', '--source', SURROGATE], {}, 2, '--source must be one of'),
    (['audit', 'list', '--page-size', '-1'], {}, 2, '--page-size'),
    (['audit', 'list', '--agent', ''], {}, 2, '--agent is blank; leave it out to match every value'),
    (['keys', 'revoke', ANSI], {}, 2, 'not an API key id'),
    (['keys', 'create', '--account', 'acme-health', '--name', ANSI], {}, 2, 'the key name'),
    # a blank name was quoted as "' '" (the error line folds whitespace): said blank, with its length (QA)
    (
        ['keys', 'create', '--account', 'acme-health', '--name', '     '],
        {},
        2,
        'the key name is blank (only whitespace: 5 spaces): give a visible label, or no name at all',
    ),
    (['keys', 'create', '--account', 'acme-health', '--scope', '   '], {}, 2, 'unknown scope'),
    (['budget', 'set', '--account', 'acme-health', '--limit', '   '], {}, 2, 'the limit must be an amount'),
    (['budget', 'set', '--account', 'acme-health', '--limit', '-5'], {}, 2, 'limit'),
    (['budget', 'set', '--account', 'acme-health', '--limit', BIG], {}, 2, 'limit'),
    (['budget', 'set', '--account', 'acme-health', '--limit', '5', '--period', ''], {}, 2, 'the period must be'),
    (['budget', 'set', '--account', 'acme-health', '--limit', '5', '--period', f'{BIG}d'], {}, 2, 'the period'),
    (['worker', '--concurrency', BIG, '--burst'], {}, 2, '--concurrency'),
    (['serve', '--workers', '-1'], {}, 2, '--workers'),
    (['serve', '--log-level', ANSI], {}, 2, '--log-level'),
    (['chat', 'hi'], {'AGENTRT_LEDGER_SPOOL': HUGE}, 2, 'AGENTRT_LEDGER_SPOOL'),
    # the embedded server's directory: too long, or not UTF-8 (an undecodable byte): were internal errors
    (['db', 'status'], {'DATABASE_URL': '', 'AGENTRT_DATA_DIR': HUGE}, 4, 'File name too long'),
    (['db', 'status'], {'DATABASE_URL': '', 'AGENTRT_DATA_DIR': SURROGATE}, 4, 'not valid UTF-8'),
    # text PostgreSQL cannot take (an undecodable argument is a lone surrogate): refused, or simply not found
    (['keys', 'create', '--account', 'acme-health', '--name', SURROGATE], {}, 2, '(U+DCE9, a lone surrogate)'),
    (['keys', 'create', '--account', SURROGATE], {}, 2, 'unknown account'),
    (['budget', 'show', '--account', SURROGATE], {}, 2, 'unknown account'),
    # was the driver's "invalid input for query argument $1" (`keys list` sent the slug as it came)
    (['keys', 'list', '--account', SURROGATE], {}, 2, "unknown account 'caf\\udce9'"),
    # configuration
    (['db', 'status'], {'DATABASE_URL': 'postgresql://u:hunter2@localhost:99999/db'}, 2, 'port'),
    (['db', 'status'], {'DATABASE_URL': 'mysql://u:hunter2@localhost/db'}, 2, 'DATABASE_URL'),
    (['db', 'status'], {'DATABASE_URL': 'postgresql://u:hunter2@localhost/db?sslmode=sometimes'}, 2, 'sslmode'),
    (['db', 'status'], {'DATABASE_URL': 'postgresql://u:hunter2@localhost/db?pgbouncer=true'}, 2, 'DB_POOLER'),
    (['db', 'status'], {'DB_POOL_SIZE': '0'}, 2, 'DB_POOL_SIZE'),
    # beyond PostgreSQL's INT_MAX ms: the server refused it at connect, reported as unreachable (exit 3)
    (['db', 'status'], {'DB_STATEMENT_TIMEOUT_MS': str(2**31)}, 2, 'DB_STATEMENT_TIMEOUT_MS'),
    (['db', 'status'], {'DB_LOCK_TIMEOUT_MS': BIG}, 2, 'DB_LOCK_TIMEOUT_MS'),
    # a host name the resolver cannot encode (a label over 63 characters): was an internal error (idna UnicodeError)
    (['db', 'status'], {'DATABASE_URL': f'postgresql://u:hunter2@{"h" * 64}/db'}, 2, 'not a valid host name'),
    (['db', 'status'], {'DATABASE_URL': f'postgresql://u:hunter2@/db?host=localhost,{"h" * 64}'}, 2, 'host name'),
    (['chat', 'hi'], {'AGENTRT_MODEL': 'nosuch:model'}, 2, 'nosuch:model'),
    # the database is not there
    (['db', 'status'], {'DATABASE_URL': 'postgresql://u:hunter2@127.0.0.1:1/db'}, 3, '127.0.0.1:1'),
    (['chat', 'hi'], {'DATABASE_URL': 'postgresql://u:hunter2@127.0.0.1:1/db'}, 3, 'nothing was saved'),
]


# Only these reach the demo account (the others fail before, or never look it up): the rest run without copying it.
_NEED_DEMO = {'--account', '--agent', '--model', 'AGENTRT_MODEL'}
DEMO_CASES = [c for c in CASES if (c[0][0] == 'chat' and _NEED_DEMO & {*c[0], *c[1]}) or c[0][:2] == ['audit', 'show']]
PLAIN_CASES = [c for c in CASES if c not in DEMO_CASES]


def _ids(cases: list[tuple[list[str], dict[str, str], int, str]]) -> list[str]:
    return [' '.join(c[0])[:40] + ' ' + ' '.join(c[1])[:30] for c in cases]


@pytest.mark.parametrize(('args', 'env', 'code', 'words'), PLAIN_CASES, ids=_ids(PLAIN_CASES))
async def test_bad_input_is_one_error_line_and_its_exit_code(
    database_url: str, args: list[str], env: dict[str, str], code: int, words: str
) -> None:
    await _check(database_url, args, env, code, words)


@pytest.mark.parametrize(('args', 'env', 'code', 'words'), DEMO_CASES, ids=_ids(DEMO_CASES))
async def test_bad_input_with_the_demo_data(
    demo_data: None, database_url: str, args: list[str], env: dict[str, str], code: int, words: str
) -> None:
    await _check(database_url, args, env, code, words)


async def _check(database_url: str, args: list[str], env: dict[str, str], code: int, words: str) -> None:
    result = await invoke(*args, env={'DATABASE_URL': database_url, 'DB_CONNECT_TIMEOUT': '2', **env})
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert result.exit_code == code, result.stderr
    assert len(errors) == 1, result.stderr
    assert words in errors[0], errors[0]
    assert len(errors[0]) < 2000, f'{len(errors[0]):,} characters'  # a 100 KB value is not quoted whole
    assert 'Traceback' not in result.stderr + result.stdout
    # A value quoted in a message shows its control characters written out: none reaches the terminal as it is.
    assert not re.search('[\x00-\x08\x0b-\x1f\x7f]', result.stderr), repr(result.stderr)
    assert 'hunter2' not in result.stderr + result.stdout


async def test_debug_shows_the_traceback(database_url: str) -> None:
    result = await invoke('--debug', 'audit', 'list', '--account', BIG, env={'DATABASE_URL': database_url})
    assert result.exit_code == 2 and 'error:' in result.stderr
    env = {'DATABASE_URL': 'postgresql://u:p@127.0.0.1:1/db', 'AGENTRT_DEBUG': '1', 'DB_CONNECT_TIMEOUT': '2'}
    result = await invoke('db', 'status', env=env)
    assert result.exit_code == 3
    assert 'Traceback' in result.stderr and result.stderr.strip().splitlines()[-1].startswith('error:')


async def test_a_logfire_variable_logfire_refuses_is_one_configuration_error() -> None:
    # logfire reads LOGFIRE_* when it is first imported (pydantic-ai imports it): a value it refuses raised there,
    # and again in the error boundary's own import of the services, so the command ended in a traceback. A new
    # process: this one imported logfire long ago.
    env = {
        'LOGFIRE_CONSOLE_INCLUDE_TIMESTAMP': 'maybe',
        'DATABASE_URL': 'postgresql://u:hunter2@127.0.0.1:1/db',
        'DB_CONNECT_TIMEOUT': '2',
    }
    done = await asyncio.to_thread(run_cli, 'chat', 'hi', env=env)
    assert done.returncode == 2, done.stderr
    assert 'Traceback' not in done.stderr
    refused = "logfire refused a LOGFIRE_* variable: Expected console_include_timestamp to be a boolean, got 'maybe'"
    assert [line for line in done.stderr.splitlines() if line.strip()] == [f'error: invalid configuration: {refused}']


async def test_a_sampling_ratio_logfire_cannot_read_is_named_by_its_variable() -> None:
    # OTEL_TRACES_SAMPLER_ARG, read by logfire as its trace_sample_rate whatever the sampler, tracing on or off:
    # "logfire refused a LOGFIRE_* variable: Expected trace_sample_rate to be a number, got 'abc'" (QA). A new process,
    # as above.
    env = {
        'OTEL_TRACES_SAMPLER_ARG': 'abc',
        'DATABASE_URL': 'postgresql://u:p@127.0.0.1:1/db',
        'DB_CONNECT_TIMEOUT': '2',
    }
    done = await asyncio.to_thread(run_cli, 'chat', 'hi', env=env)
    assert done.returncode == 2, done.stderr
    said = "OTEL_TRACES_SAMPLER_ARG='abc' is not a sampling ratio: give a number from 0 to 1 (the share of traces kept)"
    assert [line for line in done.stderr.splitlines() if line.strip()] == [f'error: {said}']


@pytest.mark.parametrize('variable', ['OTEL_TRACES_SAMPLER_ARG', 'LOGFIRE_TRACE_SAMPLE_RATE'])
@pytest.mark.parametrize('command', [('serve', '--port', '18941'), ('worker', '--burst'), ('db', 'status')])
async def test_every_command_names_the_sampling_ratio_logfire_cannot_read(
    variable: str, command: tuple[str, ...]
) -> None:
    # `agentrt serve` imported logfire (which reads the ratio as it is imported) before its tracing's check: "logfire
    # refused a LOGFIRE_* variable: Expected trace_sample_rate to be a number, got 'abc'" (qa191). A new process, as
    # logfire reads it once.
    env = {variable: 'abc', 'DATABASE_URL': 'postgresql://u:p@127.0.0.1:1/db', 'DB_CONNECT_TIMEOUT': '2'}
    done = await asyncio.to_thread(run_cli, *command, env=env)
    assert done.returncode == 2, done.stderr
    said = f"{variable}='abc' is not a sampling ratio: give a number from 0 to 1 (the share of traces kept)"
    assert [line for line in done.stderr.splitlines() if line.strip()] == [f'error: {said}']


@pytest.mark.parametrize(
    ('variable', 'value', 'takes'),
    [
        ('AGENTRT_DEBUG', 'abc', 'set true, yes, on, 1, t or y to turn it on; false, off, no, 0, f or n'),
        ('AGENTRT_DEBUG', 'enabled', 'set true, yes, on, 1, t or y to turn it on'),
        # logfire reads LOGFIRE_CONSOLE too, and takes fewer words than the runtime's own variables.
        ('LOGFIRE_CONSOLE', 'abc', 'set true, 1 or t to turn it on; false, 0 or f'),
        ('LOGFIRE_CONSOLE', 'on', 'set true, 1 or t to turn it on'),
    ],
)
async def test_an_on_off_variable_set_to_anything_else_ends_the_command_with_one_line(
    variable: str, value: str, takes: str
) -> None:
    # Both are read outside the settings, and both quietly meant off (no traceback, no spans on stderr).
    env = {variable: value, 'DATABASE_URL': 'postgresql://u:p@127.0.0.1:1/db', 'DB_CONNECT_TIMEOUT': '2'}
    done = await asyncio.to_thread(run_cli, 'costs', env=env)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f'error: {variable}={value!r} is not an on/off value: {takes}'), (
        lines
    )


@pytest.mark.parametrize('value', ['', ' TRUE ', 'Yes', 'on', '1', 'off', 'No', '0', 'false', 'n'])
def test_an_on_off_variable_takes_the_usual_words_in_any_case(value: str) -> None:
    assert env_flag('AGENTRT_DEBUG', {'AGENTRT_DEBUG': value}) is (value.strip().lower() in {'true', 'yes', 'on', '1'})
    assert env_flag('AGENTRT_DEBUG', {}) is False
