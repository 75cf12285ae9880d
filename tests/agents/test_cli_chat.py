"""`agentrt chat` end to end in a subprocess against the test database."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.agents.cli_helpers import run_cli

QUESTION = 'Find me cardiologists in Seattle who accept Medicare'


def test_chat_streams_a_grounded_answer_with_tool_calls_and_summary(demo_data: None, database_url: str) -> None:
    result = run_cli('chat', QUESTION, '--delay', '0', '--session', 'cli-1', env={'DATABASE_URL': database_url})
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

    again = run_cli(
        'chat', 'and dermatologists?', '--delay', '0', '--session', 'cli-1', env={'DATABASE_URL': database_url}
    )
    assert again.returncode == 0, again.stderr
    assert 'session cli-1' in again.stdout


def test_interactive_loop_reads_stdin_until_exit(demo_data: None, database_url: str) -> None:
    proc = subprocess.run(
        [sys.executable, '-m', 'agentrt.agents.cli', 'chat', '--delay', '0'],
        input='organic berries in Fresno\nexit\n',
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, 'DATABASE_URL': database_url, 'COLUMNS': '200'},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert 'conversation cli-' in proc.stderr
    assert 'model demo' in proc.stdout


def test_unknown_account_is_a_clear_error(demo_data: None, database_url: str) -> None:
    result = run_cli('chat', QUESTION, '--account', 'nope', env={'DATABASE_URL': database_url})
    assert result.returncode == 1
    assert "unknown account 'nope'" in result.stderr and 'acme-health' in result.stderr


def test_unknown_model_is_a_usage_error(demo_data: None, database_url: str) -> None:
    result = run_cli('chat', QUESTION, '--model', 'nosuch:model', env={'DATABASE_URL': database_url})
    assert result.returncode == 2
    assert "model 'nosuch:model'" in result.stderr


def test_bad_flag_value_is_rejected(database_url: str) -> None:
    result = run_cli('chat', QUESTION, '--delay', 'fast', env={'DATABASE_URL': database_url})
    assert result.returncode == 2
    assert '--delay' in result.stderr
