"""`agentrt db ...` end to end in subprocesses: embedded server, seed, status, bad input."""

from __future__ import annotations

from pathlib import Path

from tests.agents.cli_helpers import run_cli


def test_seed_then_status_on_a_fresh_embedded_server(tmp_path: Path) -> None:
    env = {'AGENTRT_DATA_DIR': str(tmp_path / 'pgdata'), 'DATABASE_URL': ''}
    seeded = run_cli('db', 'seed', env=env)
    assert seeded.returncode == 0, seeded.stderr
    assert 'embedded PostgreSQL: data in' in seeded.stderr
    assert 'upgrading to' in seeded.stderr
    assert '4,500 new directory entries' in seeded.stdout

    status = run_cli('db', 'status', env=env)
    assert status.returncode == 0, status.stderr
    assert f'embedded (data in {tmp_path / "pgdata"})' in status.stdout
    assert 'rows: directory_entries' in status.stdout and '4,500' in status.stdout
    assert 'behind' not in status.stdout

    again = run_cli('db', 'seed', env=env)
    assert again.returncode == 0 and '0 new directory entries' in again.stdout
    assert 'upgrading' not in again.stderr


def test_status_against_database_url_masks_password(database_url: str) -> None:
    result = run_cli('db', 'status', env={'DATABASE_URL': database_url})
    assert result.returncode == 0, result.stderr
    assert 'external (DATABASE_URL)' in result.stdout


def test_malformed_database_url_is_a_usage_error() -> None:
    result = run_cli('db', 'status', env={'DATABASE_URL': 'mysql://root:hunter2@db/app'})
    assert result.returncode == 2
    assert 'DATABASE_URL' in result.stderr
    assert 'hunter2' not in result.stderr + result.stdout


def test_unreachable_server_exits_non_zero_quickly() -> None:
    result = run_cli(
        'db', 'status', env={'DATABASE_URL': 'postgresql://u:p@127.0.0.1:1/db', 'DB_CONNECT_TIMEOUT': '2'}, timeout=30
    )
    assert result.returncode == 1
    assert '127.0.0.1:1' in result.stderr


def test_unknown_option_is_rejected() -> None:
    result = run_cli('db', 'status', '--bogus')
    assert result.returncode == 2
    assert 'No such option' in result.stderr
