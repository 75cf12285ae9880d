"""Free loopback TCP ports for what the tests start (`agentrt serve`, private PostgreSQL servers, PgBouncer) or need
closed (a connection refused).

The kernel's answer to `bind(('127.0.0.1', 0))` is free only until the probe closes: another xdist worker's probe can
be handed the same port before either server binds it, and one worker's test then talked to the other's server (CI:
a chat answered 401, "the API key is invalid or revoked", by an `agentrt serve` on the other worker's database). So
each worker takes ports from a slice of its own, beside the kernel's ephemeral ports (which outgoing connections and
port-0 probes use), starting at a random place (two suites on one machine rarely meet) and skipping any port in use.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

_WIDTH = 10_000
"""How many ports the workers share: next to the kernel's ephemeral ports, below them or above."""


def free_port() -> int:
    """A loopback port nothing listens on or holds, that no other worker of this test run is handed."""
    for port in itertools.islice(_candidates, len(_PORTS)):
        with socket.socket() as probe:  # no SO_REUSEADDR: a port some connection still holds is skipped too
            try:
                probe.bind(('127.0.0.1', port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # this worker's slice all in use, or no room beside the ephemeral ports
        probe.bind(('127.0.0.1', 0))
        return int(probe.getsockname()[1])


def _slice() -> range:
    """This worker's ports: its share of up to `_WIDTH` ports below the kernel's ephemeral ones (or above them, where
    there is more room), all of them outside xdist; empty when neither side has room."""
    try:
        low, high = (int(bound) for bound in Path('/proc/sys/net/ipv4/ip_local_port_range').read_text().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    below = range(max(1024, low - _WIDTH), low)
    above = range(high + 1, min(65536, high + 1 + _WIDTH))
    ports = below if len(below) >= len(above) else above
    workers = max(int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')), 1)
    worker = int(os.environ.get('PYTEST_XDIST_WORKER', 'gw0').removeprefix('gw') or 0)
    width = len(ports) // workers
    if width < 100:  # too few to be worth it: the kernel's choice, racy as it is
        return range(0)
    return ports[worker * width : (worker + 1) * width]


def _cycle(ports: range) -> Iterator[int]:
    if not ports:
        return iter(())
    first = random.randrange(len(ports))
    return itertools.cycle([*ports[first:], *ports[:first]])


_PORTS = _slice()
_candidates = _cycle(_PORTS)
