"""Shared fixtures: a real pulsyflux server on 127.0.0.1 with an ephemeral port, or one in memory."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList

from pulsyflux.server import ServerFactory
from pulsyflux.testing import MemoryServer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# A copy of shared/wire-vectors.txt (frames captured from the Go implementation),
# kept in the repo so golden tests run wherever the suite does.
WIRE_VECTORS = Path(__file__).resolve().parent / "data" / "wire-vectors.txt"


class RunningServer:
    """A listening server plus what tests need to reach and inspect it."""

    def __init__(self) -> None:
        self.factory = ServerFactory(reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.address = f"127.0.0.1:{self.port.getHost().port}"
        self.port_number = self.port.getHost().port

    @property
    def registry(self):
        return self.factory.registry

    def all_closed(self):
        """Deferred firing once every server-side connection is gone."""
        return DeferredList([conn.closed() for conn in list(self.factory.router.connections)])

    def stop(self):
        for conn in list(self.factory.router.connections):
            conn.transport.abortConnection()
        return DeferredList([self.all_closed(), self.port.stopListening()])


@pytest.fixture
def server():
    running = RunningServer()
    yield running
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
