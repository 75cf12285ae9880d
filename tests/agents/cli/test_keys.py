"""`agentrt keys create|list|revoke` in-process, and `agentrt serve` without the http extra."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.api_keys import authenticate_api_key, forget_cached_api_keys
from tests.agents.cli.helpers import ROOT, invoke, run_cli


async def test_create_list_revoke(demo_data: None, database_url: str) -> None:
    env = {'DATABASE_URL': database_url}
    created = await invoke('keys', 'create', '--account', 'acme-health', '--name', 'ci', '--scope', 'read', env=env)
    assert created.exit_code == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith('art_') and len(created.stdout.splitlines()) == 1  # only the key on stdout, for scripts
    assert 'not shown again' in created.stderr and "'acme-health'" in created.stderr
    forget_cached_api_keys()
    caller = await authenticate_api_key(token)
    assert caller is not None and caller.scopes == {'read'}

    as_json = await invoke('keys', 'create', '--account', 'green-grocer', '--json', env=env)
    made = json.loads(as_json.stdout)
    assert made['key'].startswith(made['public_id'] + '_') and made['scopes'] == ['chat', 'read']

    listed = await invoke('keys', 'list', env=env)
    assert listed.exit_code == 0 and token[:16] in listed.stdout and 'green-grocer' in listed.stdout
    assert token not in listed.stdout  # never the secret

    revoked = await invoke('keys', 'revoke', token[:16], env=env)
    assert revoked.exit_code == 0 and revoked.stdout.startswith(f'revoked {token[:16]}'), revoked.stdout
    # Again: harmless (exit 0), and it says the key was revoked before rather than "revoked" as if it had just been.
    again = await invoke('keys', 'revoke', token[:16], env=env)
    assert again.exit_code == 0, again.stderr
    assert again.stdout.startswith(f"{token[:16]} (account 'acme-health') was already revoked, at "), again.stdout
    again_json = json.loads((await invoke('keys', 'revoke', token, '--json', env=env)).stdout)
    first_json = json.loads((await invoke('keys', 'list', '--all', '--json', env=env)).stdout)
    assert again_json['already_revoked'] is True and again_json['public_id'] == token[:16]
    assert again_json['revoked_at'] in [key['revoked_at'] for key in first_json]  # the first revoke's time, kept
    forget_cached_api_keys()
    assert await authenticate_api_key(token) is None
    remaining = json.loads((await invoke('keys', 'list', '--json', env=env)).stdout)
    assert [key['name'] for key in remaining] == ['']
    everything = json.loads((await invoke('keys', 'list', '--all', '--json', env=env)).stdout)
    assert [key['revoked_at'] is not None for key in everything] == [True, False]


async def test_a_key_name_with_markup_is_listed_as_text(demo_data: None, database_url: str) -> None:
    env = {'DATABASE_URL': database_url}
    # rich markup: '[/b]' was a MarkupError (an internal error instead of the table), '[red]' styled the cell
    assert (await invoke('keys', 'create', '--account', 'acme-health', '--name', '[/b][red]x', env=env)).exit_code == 0
    for args in (('keys', 'list'), ('keys', 'list', '--account', 'acme-health')):
        listed = await invoke(*args, env=env, columns=200)
        assert listed.exit_code == 0, listed.stderr
        assert '[/b][red]x' in listed.stdout and '\x1b' not in listed.stdout


@pytest.mark.parametrize(
    ('name', 'position', 'shown'),
    [
        ('a\tb', 1, 'U+0009'),
        ('ci\nprod', 2, 'U+000A'),
        ('x\x1b[2J', 1, 'U+001B'),
        ('\u202eevil', 0, 'U+202E'),  # a right-to-left override: the row printed reversed
        ('a\u2028b', 1, 'U+2028'),
        # Invisible: `ad\u200bmin` listed as `admin` (qa140); Python's `isprintable` is False for each.
        ('ad\u200bmin', 2, 'U+200B'),
        ('\ufeffadmin', 0, 'U+FEFF'),
        ('admin\U000e0041', 5, 'U+E0041'),  # a tag character
    ],
)
async def test_a_key_name_with_a_control_character_is_refused(
    demo_data: None, database_url: str, name: str, position: int, shown: str
) -> None:
    # A tab or a newline in a name was stored and broke `keys list`'s table (the row split into lines that read as
    # other rows); an escape sequence was written out, but into a name no one can type back.
    env = {'DATABASE_URL': database_url}
    created = await invoke('keys', 'create', '--account', 'acme-health', '--name', name, env=env)
    assert created.exit_code == 2, created.stderr
    assert f'at position {position} ({shown}' in created.stderr and 'one line of printable text' in created.stderr
    assert created.stdout == ''
    listed = await invoke('keys', 'list', '--json', env=env)
    assert json.loads(listed.stdout) == []


async def test_a_stored_name_with_control_characters_is_listed_on_one_line(demo_data: None, database_url: str) -> None:
    # Made before names were checked: the row stays one line, each control character written out.
    env = {'DATABASE_URL': database_url}
    assert (await invoke('keys', 'create', '--account', 'acme-health', '--name', 'old', env=env)).exit_code == 0
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await session.execute(text("UPDATE api_keys SET name = E'a\\tb\\nc\\x1b[2J'"))
    listed = await invoke('keys', 'list', env=env, columns=200)
    assert listed.exit_code == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if 'art_' in line]
    assert 'a\\tb\\nc\\x1b[2J' in row and '\x1b' not in listed.stdout


async def test_bad_input_fails_with_a_message(demo_data: None, database_url: str) -> None:
    env = {'DATABASE_URL': database_url}
    for args, message in [
        (('create', '--account', 'nobody'), "unknown account 'nobody'"),
        (('create', '--account', 'acme-health', '--scope', 'admin'), "unknown scope 'admin'"),
        (('revoke', 'art_000000000000'), 'no API key art_000000000000'),
        (('revoke', 'not-an-id'), 'not an API key id'),
    ]:
        result = await invoke('keys', *args, env=env)
        assert result.exit_code != 0 and message in result.stderr, (args, result.stderr)
        assert 'Traceback' not in result.stderr


async def test_serve_without_the_http_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    serve_module = importlib.import_module('agentrt.agents.cli.serve')  # the package's `serve` is the command
    monkeypatch.setattr(serve_module, 'missing_http_packages', lambda: ['fastapi', 'uvicorn'])
    result = await invoke('serve')
    assert result.exit_code == 2
    assert (
        "pip install -e '.[http]' in a clone of agentrt" in result.stderr
        and 'fastapi, uvicorn not installed' in result.stderr
    )


async def test_revoking_a_malformed_key_id_is_a_usage_error(database_url: str) -> None:
    # It exited 1 ("the command could not do it", as for a key that does not exist), where `audit show nope` exits 2.
    for malformed in ('nope', 'art_12345', 'art_' + 'g' * 12, 'a\x00b'):
        result = await invoke('keys', 'revoke', malformed, env={'DATABASE_URL': database_url})
        assert result.exit_code == 2, (malformed, result.stderr)
        assert result.stderr.startswith('error: not an API key id') and len(result.stderr.strip().splitlines()) == 1
    unknown = await invoke('keys', 'revoke', 'art_' + '0' * 12, env={'DATABASE_URL': database_url})
    assert unknown.exit_code == 1 and 'no API key art_000000000000' in unknown.stderr


async def test_messages_are_not_wrapped_when_the_output_is_a_pipe(demo_data: None, database_url: str) -> None:
    # Not a terminal and no COLUMNS (a script's `agentrt keys create ... | cat`, `agentrt db seed > out.txt`): rich
    # wrapped at 80 columns, so a message, and a key id in it, was broken across lines.
    env = {'DATABASE_URL': database_url}
    created = await asyncio.to_thread(
        run_cli, 'keys', 'create', '--account', 'acme-health', '--name', 'nightly-export', env=env, columns=None
    )
    assert created.returncode == 0, created.stderr
    public_id = created.stdout.strip()[:16]
    [message] = [line for line in created.stderr.splitlines() if line.startswith('API key')]
    assert len(message) > 80 and public_id in message and message.endswith('it is not shown again.'), message
    seeded = await asyncio.to_thread(run_cli, 'db', 'seed', env=env, columns=None)
    assert seeded.returncode == 0, seeded.stderr
    [line] = seeded.stdout.splitlines()
    assert len(line) > 80 and line.startswith('seeded: ') and line.endswith('directory entries'), seeded.stdout


async def test_a_mistyped_whole_key_given_to_revoke_shows_none_of_its_secret(database_url: str) -> None:
    # `revoke` takes the whole key too; one with a character too many or too few, or a space before it, was quoted to
    # 40 characters: art_, its 12 hex digits, _ and 23 characters of the secret (too short for the key's redaction).
    key = 'art_0123456789ab_' + 'Zq8Xw7Vu6Ts5Rq4Po3Nm2Lk1Jh0Gf9Ed8Cb7Aa6Yy5X'
    for pasted in (key + 'x', key[:-1], f' {key}!'):
        result = await invoke('keys', 'revoke', pasted, env={'DATABASE_URL': database_url})
        assert result.exit_code == 2 and result.stderr.startswith('error: not an API key id'), result.stderr
        assert 'Zq8Xw7' not in result.stderr and 'art_0123456789ab' in result.stderr, result.stderr


async def _keys_create_redirected(name: str, redirect: str, database_url: str) -> subprocess.CompletedProcess[str]:
    """`agentrt keys create` for acme-health named `name`, run by bash with its output redirected as `redirect` says."""
    command = (
        f'{shlex.quote(sys.executable)} -m agentrt.agents.cli keys create --account acme-health --name {name} '
        f'{redirect}'
    )
    env = {**os.environ, 'DATABASE_URL': database_url}
    return await asyncio.to_thread(
        subprocess.run, ['bash', '-c', command], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


async def test_a_key_whose_only_showing_went_nowhere_is_revoked(demo_data: None, database_url: str) -> None:
    # With standard output closed (`>&-`) the key was made, never shown, left active, and the command said "Store it
    # now" with exit 0: a credential nobody could use, and nobody revoked (QA).
    # And to a full disk (`> key.txt`): an internal error, the key left active (QA).
    for name, redirect in (('lost', '>&-'), ('full', '> /dev/full')):
        done = await _keys_create_redirected(name, redirect, database_url)
        assert done.returncode == 1 and 'could not be printed' in done.stderr, (name, done.stderr)
        assert 'was revoked' in done.stderr, (name, done.stderr)
        async with get_db_session(account=Unscoped.ADMIN) as session:
            query = text('SELECT revoked_at IS NOT NULL FROM api_keys WHERE name = :name')
            assert (await session.execute(query, {'name': name})).scalar_one() is True, name


async def test_a_key_printed_while_stderr_is_full_is_kept_and_the_command_succeeds(
    demo_data: None, database_url: str, tmp_path: Path
) -> None:
    # The key reached standard output, the "Store it now" note could not be written: exit 1 sent a script to create
    # another key, leaving this one active and unstored (QA).
    kept = tmp_path / 'key.txt'
    done = await _keys_create_redirected('errfull', f'2>/dev/full > {shlex.quote(str(kept))}', database_url)
    assert done.returncode == 0, done
    key = kept.read_text().strip()
    assert key.startswith('art_')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        query = text("SELECT revoked_at IS NULL FROM api_keys WHERE name = 'errfull'")
        assert (await session.execute(query)).scalar_one() is True
