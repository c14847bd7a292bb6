"""ServerService and HTTPService share one way to listen and to say so (pulsyflux.server.listening)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory

from pulsyflux.http import HTTPService, make_site
from pulsyflux.server import ServerFactory
from pulsyflux.service import ServerService

ensure = pytest_twisted.ensureDeferred


def _services(listen: str) -> list:
    return [ServerService(listen, reactor=reactor), HTTPService(listen, make_site(ServerFactory(reactor)), reactor)]


@ensure
async def test_when_listening_before_start_is_an_error():
    for svc in _services("tcp:0:interface=127.0.0.1"):
        with pytest.raises(RuntimeError, match="is not started"):
            await svc.whenListening()


@ensure
async def test_a_port_in_use_is_told_to_whoever_waits():
    taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    try:
        for svc in _services(f"tcp:{taken.getHost().port}:interface=127.0.0.1"):
            # A TCP endpoint fails at once: the server's startService says so
            # (twistd exits), the HTTP API's only logs it; both tell every waiter.
            failures: list = []
            svc.startService().addErrback(failures.append)
            assert len(failures) == (1 if isinstance(svc, ServerService) else 0)
            for _ in range(2):
                with pytest.raises(CannotListenError):
                    await svc.whenListening()
            svc.running = False
    finally:
        await taken.stopListening()


@ensure
async def test_both_services_listen_and_give_their_port():
    for svc in _services("tcp:0:interface=127.0.0.1"):
        port = await svc.startService()
        assert await svc.whenListening() is port
        await svc.stopService()
