"""Shared fixtures: a real pulsyflux server on 127.0.0.1 with an ephemeral port, or one in memory."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import pytest_twisted

from pulsyflux.testing import MemoryServer, start_server

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# A copy of shared/wire-vectors.txt (frames captured from the Go implementation),
# kept in the repo so golden tests run wherever the suite does.
WIRE_VECTORS = Path(__file__).resolve().parent / "data" / "wire-vectors.txt"


@pytest.fixture
def server():
    """A :class:`~pulsyflux.testing.RunningServer` over TCP without its broker (tests start their own)."""
    running = pytest_twisted.blockon(start_server(broker=False))
    yield running
    pytest_twisted.blockon(running.stop())


@pytest.fixture
def limited():
    """``limited(**limits)``: a RunningServer (no broker) whose ServerFactory has those limits."""
    servers = []

    def start(**limits):
        started = []  # without a broker the server starts at once: callable inside a running test
        start_server(broker=False, **limits).addCallback(started.append)
        servers.extend(started)
        return started[0]

    yield start
    for running in servers:
        pytest_twisted.blockon(running.stop())


@pytest.fixture
def memory():
    """A :class:`~pulsyflux.testing.MemoryServer` without its broker; see ``helpers.clocked``."""
    running = MemoryServer(broker=False)
    yield running
    running.close()


@pytest.fixture
def channel():
    return uuid.uuid4()
