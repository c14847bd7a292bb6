"""ServerService and HTTPService share one way to listen and to say so (pulsyflux.server.listening)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import LogLevel, capturedLogs, formatEvent

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
            # A TCP endpoint fails at once: each logs one line (no traceback, nothing
            # left unhandled) and tells every waiter (twistd's check exits on it).
            failures: list = []
            with capturedLogs() as events:
                svc.startService().addErrback(failures.append)
            assert failures == []
            [line] = [formatEvent(event) for event in events if event["log_level"] == LogLevel.error]
            assert line.endswith(f"cannot listen on {svc.description}: Address already in use")
            assert not any(event.get("log_failure") for event in events)
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
