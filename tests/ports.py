"""Free loopback TCP ports for what the tests start (`agentrt serve`, private PostgreSQL servers, PgBouncer) or need
closed (a connection refused).

The kernel's answer to `bind(('127.0.0.1', 0))` is free only until the probe closes: another xdist worker's probe can
be handed the same port before either server binds it, and one worker's test then talked to the other's server (CI:
a chat answered 401, "the API key is invalid or revoked", by an `agentrt serve` on the other worker's database). So
each worker takes ports from a slice of its own, below the kernel's ephemeral ports (which outgoing connections and
port-0 probes use), starting at a random place (two suites on one machine rarely meet) and skipping any port in use.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

_RANGE = (20000, 30000)


def free_port() -> int:
    """A loopback port nothing listens on or holds, that no other worker of this test run is handed."""
    for port in itertools.islice(_candidates, len(_PORTS)):
        with socket.socket() as probe:  # no SO_REUSEADDR: a port some connection still holds is skipped too
            try:
                probe.bind(('127.0.0.1', port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # this worker's slice all in use, or no room below the ephemeral ports
        probe.bind(('127.0.0.1', 0))
        return int(probe.getsockname()[1])


def _slice() -> range:
    """This worker's ports: its share of `_RANGE` (all of it outside xdist), empty when the range would overlap the
    kernel's ephemeral ports."""
    try:
        ephemeral_low = int(Path('/proc/sys/net/ipv4/ip_local_port_range').read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    if ephemeral_low < _RANGE[1]:
        return range(0)
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    worker = int(os.environ.get('PYTEST_XDIST_WORKER', 'gw0').removeprefix('gw') or 0)
    width = (_RANGE[1] - _RANGE[0]) // max(workers, 1)
    start = _RANGE[0] + worker * width
    return range(start, start + width)


def _cycle(ports: range) -> Iterator[int]:
    if not ports:
        return iter(())
    first = random.randrange(len(ports))
    return itertools.cycle([*ports[first:], *ports[:first]])


_PORTS = _slice()
_candidates = _cycle(_PORTS)
