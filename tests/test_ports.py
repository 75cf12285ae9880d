"""The suite's port allocator (`tests/ports.py`): workers never share a port, and none is an ephemeral one."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests import ports


def test_each_worker_takes_ports_of_its_own_outside_the_ephemeral_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    low, high = (int(bound) for bound in Path('/proc/sys/net/ipv4/ip_local_port_range').read_text().split()[:2])
    monkeypatch.setenv('PYTEST_XDIST_WORKER_COUNT', '3')
    slices = []
    for worker in range(3):
        monkeypatch.setenv('PYTEST_XDIST_WORKER', f'gw{worker}')
        slices.append(set(ports._slice()))
    assert all(slices), slices
    assert not (slices[0] & slices[1]) and not (slices[1] & slices[2]) and not (slices[0] & slices[2])
    assert not any(low <= port <= high for ports in slices for port in ports)


def test_a_port_is_this_workers_and_free_and_a_port_in_use_is_skipped() -> None:
    if not ports._PORTS:
        pytest.skip('no room beside the ephemeral ports on this host: the kernel picks ports')
    first = ports.free_port()
    assert first in ports._PORTS
    with socket.socket() as listener:
        listener.bind(('127.0.0.1', first))
        listener.listen()
        taken = {ports.free_port() for _ in range(len(ports._PORTS) + 5)}  # the whole slice, around again
    assert first not in taken and taken <= set(ports._PORTS)
