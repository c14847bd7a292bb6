"""pytest fixtures for testing your own code against a real pulsyflux server.

Installed with pulsyflux (entry point ``pytest11``), so any test can ask for
``pulsyflux_server``; it needs pytest-twisted, which runs the reactor:

    @pytest_twisted.ensureDeferred
    async def test_echo(pulsyflux_server):
        consumer = await Consumer.connect(pulsyflux_server.address, channel)

``pulsyflux_memory_server`` is the same server in memory, on a clock
(:class:`pulsyflux.testing.MemoryServer`), for plain ``def`` tests that
need neither pytest-twisted nor a socket.

Imports stay inside the fixtures: this module is loaded by every pytest run
where pulsyflux is installed, and must not install a reactor or need
pytest-twisted when nobody uses the fixtures.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import pytest


def _blockon() -> Any:
    try:
        import pytest_twisted
    except ImportError:  # pragma: no cover - depends on the user's environment
        pytest.fail("the pulsyflux_server fixture needs pytest-twisted (pip install pytest-twisted)")
    return pytest_twisted.blockon


@pytest.fixture
def pulsyflux_server() -> Iterator[Any]:
    """A :class:`pulsyflux.testing.RunningServer` on 127.0.0.1, stopped after the test."""
    from pulsyflux.testing import start_server

    blockon = _blockon()
    server = blockon(start_server())
    yield server
    blockon(server.stop())


@pytest.fixture
def pulsyflux_channel() -> uuid.UUID:
    """A fresh channel id, so tests never see each other's traffic."""
    return uuid.uuid4()


@pytest.fixture
def pulsyflux_memory_server() -> Iterator[Any]:
    """A :class:`pulsyflux.testing.MemoryServer`: no socket, time on a clock; for plain ``def`` tests."""
    from pulsyflux.testing import MemoryServer

    server = MemoryServer()
    yield server
    server.close()
