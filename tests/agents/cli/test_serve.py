"""`agentrt serve --workers N`: what it gives uvicorn's supervisor of several worker processes."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import uvicorn
from uvicorn.importer import import_from_string

from agentrt.api.header_limit import HeaderLimitedProtocol
from tests.agents.cli.helpers import invoke
from tests.ports import free_port


async def test_workers_that_start_slowly_on_a_busy_host_are_not_killed_as_hung(
    database: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvicorn's supervisor kills a worker that does not answer its ping within timeout_worker_healthcheck (5 s by
    # default), counted from the worker's spawn; a new interpreter configuring the logging took longer than that on a
    # busy 2-core host, so `serve --workers 3` killed two of its workers as they started, and kept doing so while the
    # load lasted ("Child process [...] died").
    given: dict[str, Any] = {}

    def run(app: str, **options: Any) -> None:
        given.update(options, app=app)

    monkeypatch.setattr(uvicorn, 'run', run)
    port = free_port()
    result = await invoke('serve', '--workers', '3', '--port', str(port))
    assert result.exit_code == 0, result.stderr
    assert given['workers'] == 3 and given['timeout_worker_healthcheck'] >= 30
    # Each worker reads headers with the bounded protocol (httptools alone has no limit on them), imported by name.
    assert import_from_string(given['http']) is HeaderLimitedProtocol
    given.pop('app')
    # Every option is one uvicorn knows (not by building a Config: that would configure this process's logging).
    assert set(given) <= set(inspect.signature(uvicorn.Config).parameters)


@pytest.mark.parametrize(('host', 'warned'), [('0.0.0.0', True), ('127.0.0.1', False), ('localhost', False)])
async def test_serving_beyond_loopback_warns_that_it_is_plain_http(
    database: Any, monkeypatch: pytest.MonkeyPatch, host: str, warned: bool
) -> None:
    # `agentrt serve` has no TLS: on an address other machines reach, every request's key crosses the network readable.
    monkeypatch.setattr(uvicorn, 'run', lambda app, **options: None)
    result = await invoke('serve', '--workers', '2', '--host', host, '--port', str(free_port()))
    assert result.exit_code == 0, result.stderr
    warning = f'warning: serving plain HTTP on {host}: API keys cross the network in clear text'
    assert (warning in result.stderr) is warned, result.stderr
    if warned:
        assert 'reverse proxy that terminates TLS' in result.stderr
