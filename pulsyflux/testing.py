"""Run a real pulsyflux server inside your own tests.

Tests of code that talks to pulsyflux want a real server, not a mock, but
without ports to pick or processes to manage. :func:`start_server` listens on
127.0.0.1 with an ephemeral port in the test's own reactor, and
:meth:`RunningServer.stop` closes everything it opened so trial's "dirty
reactor" check passes:

    server = await start_server()
    consumer = await Consumer.connect(server.address, channel)
    ...
    await server.stop()

pytest-twisted users get the ``pulsyflux_server`` fixture (registered by
:mod:`pulsyflux.pytest_plugin`); trial users pass their ``addCleanup``:

    def setUp(self):
        d = start_server(cleanup=self.addCleanup)
        return d.addCallback(lambda server: setattr(self, "server", server))
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Optional

from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred

from .server import ServerFactory, ServerStats
from .service import client_address

__all__ = ["RunningServer", "start_server"]


class RunningServer:
    """A pulsyflux server listening on 127.0.0.1 for the length of a test.

    ``address`` is what clients connect to (``"127.0.0.1:PORT"``);
    ``factory`` is the :class:`~pulsyflux.server.ServerFactory`, for tests
    that inspect the registry or the counters.
    """

    def __init__(self, reactor: Any, factory: ServerFactory, port: Any) -> None:
        self.reactor = reactor
        self.factory = factory
        self._port = port
        self.port: int = port.getHost().port
        self.address = client_address(port.getHost())
        self.broker: Any = None  # the Broker, unless started with broker=False
        self.broker_channel: Optional[uuid.UUID] = None
        self.http_port: Optional[int] = None
        self.http_url: Optional[str] = None
        self._http_listener: Any = None
        self.site: Any = None
        self._stopped: Optional[Deferred[None]] = None

    @property
    def stats(self) -> ServerStats:
        """The server's counters (requests routed, bytes, errors...)."""
        return self.factory.stats

    @property
    def registry(self) -> dict:
        """(role, channel id, client id) -> connection, for every registered client."""
        return self.factory.registry

    def stop(self) -> "Deferred[None]":
        """Stop listening, close every connection, and let the peers notice.

        Safe to call twice; the second call waits for the first.
        """
        if self._stopped is None:
            self._stopped = Deferred.fromCoroutine(self._stop())
        d: Deferred[None] = Deferred()
        self._stopped.addBoth(lambda result: (d.callback(None), result)[1])
        return d

    async def _stop(self) -> None:
        had_connections = bool(self.factory.router.connections)
        waits = []
        if self._http_listener is not None:
            had_connections = had_connections or bool(self.site.open_connections)
            waits.append(maybeDeferred(self._http_listener.stopListening))
            waits.append(self.site.close_connections())
        if self.broker is not None:
            waits.append(maybeDeferred(self.broker.close))
        waits.append(maybeDeferred(self._port.stopListening))
        await DeferredList(waits, consumeErrors=True)
        connections = list(self.factory.router.connections)
        closed = [conn.closed() for conn in connections]
        for conn in connections:
            conn.transport.abortConnection()
        await DeferredList(closed, consumeErrors=True)
        if had_connections or connections:
            # The client ends of those connections live in this reactor too:
            # give them a few turns to read the close, so a test that forgot
            # to close its own clients still leaves the reactor clean.
            for _ in range(3):
                await task.deferLater(self.reactor, 0, lambda: None)


def start_server(
    reactor: Any = None,
    *,
    broker: bool = True,
    http: bool = False,
    cleanup: Optional[Callable[..., Any]] = None,
) -> "Deferred[RunningServer]":
    """Start a server on 127.0.0.1 with an ephemeral port, and its broker.

    The broker answers on the default broker channel, so
    ``BrokerClient.connect(server.address)`` finds it; ``server.broker`` is
    the :class:`~pulsyflux.broker.Broker` itself (``broker=False`` runs the
    router alone). ``http=True`` also serves the HTTP API
    (:mod:`pulsyflux.http`) at ``server.http_url``. ``cleanup`` (a trial
    ``TestCase.addCleanup``, or anything that takes a function returning a
    Deferred) is given :meth:`RunningServer.stop`.

        server = await start_server(http=True)
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return Deferred.fromCoroutine(_start(reactor, broker, http, cleanup))


async def _start(reactor: Any, broker: bool, http: bool, cleanup: Optional[Callable[..., Any]]) -> RunningServer:
    factory = ServerFactory(reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    server = RunningServer(reactor, factory, port)
    if cleanup is not None:
        cleanup(server.stop)
    try:
        if broker:
            from .broker import DEFAULT_BROKER_CHANNEL, Broker
            from .inproc import InProcessEndpoint

            # As BrokerService does: the broker's channel is the server's own, linked in-process.
            factory.router.reserve(DEFAULT_BROKER_CHANNEL.bytes)
            link = InProcessEndpoint(factory, reactor, label="broker")
            server.broker = await Broker.connect(link, DEFAULT_BROKER_CHANNEL, reactor=reactor)
            server.broker_channel = DEFAULT_BROKER_CHANNEL
        if http:
            from .http import make_site

            server.site = make_site(factory, broker=server.broker)
            server._http_listener = reactor.listenTCP(0, server.site, interface="127.0.0.1")
            server.http_port = server._http_listener.getHost().port
            server.http_url = f"http://{client_address(server._http_listener.getHost())}"
    except BaseException:
        if cleanup is None:
            await server.stop()
        raise
    return server
