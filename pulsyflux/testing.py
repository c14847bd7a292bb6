"""Run a real pulsyflux server inside your own tests: over TCP, or in memory.

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

:class:`MemoryServer` is the same server with no socket and no real time:
clients reach it through in-memory transports (:mod:`pulsyflux.server.inproc`)
and every timer runs on a :class:`~twisted.internet.testing.MemoryReactorClock`,
so a test of a timeout, a heartbeat or a reconnect runs in microseconds
and never flakes on a loaded machine (as treq's ``StubTreq`` does for
HTTP):

    server = MemoryServer()
    consumer = server.run(Consumer.connect(server.address, channel, reactor=server.clock))
    server.advance(30)          # thirty seconds pass, at once
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Optional, TypeVar, Union

from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from ._reactor import default_reactor
from .client.connection import Client
from .endpoints import client_address, port_number
from .server.inproc import InProcessEndpoint
from .server.protocol import ServerFactory, ServerProtocol
from .server.router import ServerStats

if TYPE_CHECKING:
    from ._types import IReactor, IStreamTransport
    from .auth.tokens import Authority
    from .broker import Broker, BrokerClient, Subscription
    from .http.site import PulsyfluxSite

__all__ = ["MemoryServer", "RunningServer", "hang", "reset", "start_server"]

T = TypeVar("T")

# What hang, reset and drop take: a client connection, or a broker object with the connections it holds.
Connected = Union[Client, "Broker", "BrokerClient", "Subscription"]


def _server_side(factory: ServerFactory, connection: Union[ServerProtocol, Client]) -> ServerProtocol:
    """The server's end of ``connection``: a ServerProtocol, or a client's (Consumer, Provider).

    The server's end is the one whose peer is the client's own address
    (a TCP port or an in-memory label), whatever the transport.
    """
    if isinstance(connection, ServerProtocol):
        return connection
    protocol = getattr(connection, "_protocol", connection)  # a Consumer or Provider: its current protocol
    transport = getattr(protocol, "transport", None)
    if transport is None:
        raise ValueError(f"{connection!r} is not connected")
    here = transport.getHost()
    for conn in factory.router.connections:
        if conn.transport is not None and conn.transport.getPeer() == here:
            return conn
    raise ValueError(f"{connection!r} has no connection to this server")


def _clients(thing: Union[ServerProtocol, Connected]) -> list[Union[ServerProtocol, Client]]:
    """The connections (Consumers, Providers) behind ``thing``, for :func:`hang`, :func:`reset` and ``drop``.

    The one place that knows how the broker's objects hold theirs, so
    tests never reach into them: a Subscription has the Provider the
    broker forwards to; a BrokerClient, its publishing Consumer
    and each subscription's; a Broker, its forwarding Consumers (first: cut
    first, they send no closing notice), its publishing Consumer and the
    Provider that answers publishes. Anything else is taken as a connection.
    """
    from .broker import Broker, BrokerClient, Subscription

    if isinstance(thing, (Broker, BrokerClient, Subscription)):
        return list(thing.connections())  # a Broker lists its forwarding Consumers first
    return [thing]


def _transport(client: Union[ServerProtocol, Client]) -> IStreamTransport:
    protocol = getattr(client, "_protocol", None)  # the one place tests reach into a client's connection
    if protocol is None or protocol.transport is None or not getattr(client, "connected", True):
        raise ValueError(f"{client!r} is not connected")
    return protocol.transport


def _transports(thing: Connected) -> list[IStreamTransport]:
    """The transports of ``thing``'s open connections: at least one, or ValueError."""
    clients = _clients(thing)
    if len(clients) == 1:
        return [_transport(clients[0])]
    found = []
    for client in clients:  # some may be down already (a subscription reset on its own)
        try:
            found.append(_transport(client))
        except ValueError:
            pass
    if not found:
        raise ValueError(f"{thing!r} is not connected")
    return found


def hang(client: Connected) -> Callable[[], None]:
    """``client`` stops reading its connections until the returned call.

    It stays connected and answers nothing, as a hung process does; the
    server's flow control and the peers' timeouts see what they would.
    A Consumer or Provider, or one of the broker's objects (a Broker, a
    BrokerClient, a Subscription: every connection it holds).
    Over TCP or in memory.
    """
    transports = _transports(client)
    for transport in transports:
        transport.pauseProducing()

    def resume() -> None:
        for transport in transports:
            transport.resumeProducing()

    return resume


def reset(client: Connected) -> None:
    """``client``'s connections are reset from its own end, as when its process dies.

    A Consumer or Provider, or one of the broker's objects as for :func:`hang`.
    """
    for transport in _transports(client):  # all found before any is cut
        transport.abortConnection()


def _drop(factory: ServerFactory, connections: tuple[Union[ServerProtocol, Connected], ...]) -> "Deferred[Any]":
    clients = [client for connection in connections for client in _clients(connection)]
    ends = [_server_side(factory, client) for client in clients]  # all found before any is cut
    gone = DeferredList([conn.closed() for conn in ends])
    for conn in ends:
        conn.transport.abortConnection()
    return gone


class _ServerView:
    """What both test servers show of their :class:`ServerFactory` (``self.factory``)."""

    factory: ServerFactory

    @property
    def stats(self) -> ServerStats:
        """The server's counters (requests routed, bytes, errors...)."""
        return self.factory.stats

    @property
    def registry(self) -> dict:
        """(role, channel id, client id) -> connection, for every registered client."""
        return self.factory.registry

    @property
    def connections(self) -> list[ServerProtocol]:
        """The server's end of every open connection (the broker's link included)."""
        return list(self.factory.router.connections)

    def all_closed(self) -> "Deferred[Any]":
        """Fires once every connection open now is gone."""
        return DeferredList([conn.closed() for conn in self.connections])


class RunningServer(_ServerView):
    """A pulsyflux server listening on 127.0.0.1 for the length of a test.

    ``address`` is what clients connect to (``"127.0.0.1:PORT"``);
    ``factory`` is the :class:`~pulsyflux.server.ServerFactory`, for tests
    that inspect the registry or the counters.
    """

    def __init__(self, reactor: IReactor, factory: ServerFactory, port: IListeningPort) -> None:
        self.reactor = reactor
        self.factory = factory
        self._port = port
        self.port: int = port_number(port)
        self.address = client_address(port.getHost())
        self.broker: Optional[Broker] = None  # unless started with broker=False
        self.broker_channel: Optional[uuid.UUID] = None
        self.http_port: Optional[int] = None
        self.http_url: Optional[str] = None
        self._http_listener: Optional[IListeningPort] = None
        self.site: Optional[PulsyfluxSite] = None
        self._stopped: Optional[Deferred[None]] = None

    def drop(self, *connections: Union[ServerProtocol, Connected]) -> "Deferred[Any]":
        """Cut each connection as a TCP reset would, all at once; fires once the server has let go.

        A connection is the server's end (from :attr:`connections`) or a
        client (``Consumer``, ``Provider``, or a Broker, BrokerClient or
        Subscription: every connection it holds); the client sees its connection lost.
        """
        return _drop(self.factory, connections)

    def stop(self) -> "Deferred[None]":
        """Stop listening, close every connection, and let the peers notice.

        Safe to call twice; the second call waits for the first.
        """
        if self._stopped is None:
            self._stopped = Deferred.fromCoroutine(self._stop())
        d: Deferred[None] = Deferred()

        def stopped(result: object) -> object:
            d.callback(None)
            return result

        self._stopped.addBoth(stopped)
        return d

    async def _stop(self) -> None:
        had_connections = bool(self.factory.router.connections)
        waits: list[Deferred[Any]] = []
        site = self.site
        if self._http_listener is not None and site is not None:
            had_connections = had_connections or bool(site.open_connections)
            waits.append(maybeDeferred(self._http_listener.stopListening))
            waits.append(site.close_connections())
        if self.broker is not None:
            waits.append(maybeDeferred(self.broker.close))
        waits.append(maybeDeferred(self._port.stopListening))
        await DeferredList(waits, consumeErrors=True)
        connections = bool(self.factory.router.connections)
        await self.factory.router.close_all()
        if had_connections or connections:
            # The client ends of those connections live in this reactor too:
            # give them a few turns to read the close, so a test that forgot
            # to close its own clients still leaves the reactor clean.
            for _ in range(3):
                await task.deferLater(self.reactor, 0, lambda: None)


def start_server(
    reactor: Optional[IReactor] = None,
    *,
    broker: bool = True,
    http: bool = False,
    cleanup: Optional[Callable[..., Any]] = None,
    auth: Optional[Authority] = None,
    history: int = 0,
    **options: Any,
) -> "Deferred[RunningServer]":
    """Start a server on 127.0.0.1 with an ephemeral port, and its broker.

    The broker answers on the default broker channel, so
    ``BrokerClient.connect(server.address)`` finds it; ``server.broker`` is
    the :class:`~pulsyflux.broker.Broker` itself (``broker=False`` runs the
    router alone). ``http=True`` also serves the HTTP API
    (:mod:`pulsyflux.http`) at ``server.http_url``. ``cleanup`` (a trial
    ``TestCase.addCleanup``, or anything that takes a function returning a
    Deferred) is given :meth:`RunningServer.stop`. ``options`` go to
    :class:`~pulsyflux.server.ServerFactory` (``max_body=...`` and the other limits).
    ``auth`` (a :class:`~pulsyflux.auth.tokens.Authority`) makes it check
    tokens and grants, as ``twistd pulsyflux --auth FILE`` does.
    ``history``: messages the broker retains per topic (``--history``).

        server = await start_server(http=True)
    """
    reactor = default_reactor(reactor)
    return Deferred.fromCoroutine(_start(reactor, broker, http, cleanup, options, auth, history))


async def _start(
    reactor: IReactor,
    broker: bool,
    http: bool,
    cleanup: Optional[Callable[..., Any]],
    options: dict[str, Any],
    auth: Optional[Authority] = None,
    history: int = 0,
) -> RunningServer:
    factory = ServerFactory(reactor, **options)
    if auth is not None:
        factory.router.enable_auth(auth)  # before the first connection
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    server = RunningServer(reactor, factory, port)
    if cleanup is not None:
        cleanup(server.stop)
    try:
        if broker:
            from .broker.link import DEFAULT_BROKER_CHANNEL
            from .service import connect_own_broker

            # As BrokerService does: the broker's channel is the server's own, linked in-process.
            server.broker = await connect_own_broker(factory, reactor, history=history)
            server.broker_channel = DEFAULT_BROKER_CHANNEL
        if http:
            from .http.site import make_site

            site = server.site = make_site(factory, broker=server.broker)
            # A Site is a ServerFactory; Twisted's generic type of listenTCP's factory does not see it.
            listener = server._http_listener = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
            server.http_port = port_number(listener)
            server.http_url = f"http://{client_address(listener.getHost())}"
    except BaseException:
        if cleanup is None:
            await server.stop()
        raise
    return server


@implementer(IStreamClientEndpoint)
class _StrangerEndpoint:
    """An in-memory endpoint that is not the server's own: a Broker over it is an outside broker.

    (:class:`~pulsyflux.server.inproc.InProcessEndpoint` offers ``guard_channel``,
    which makes a Broker act as the server's own and guard its subscribers'
    channels for trusted connections only.)
    """

    def __init__(self, endpoint: InProcessEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        return self._endpoint.connect(protocolFactory)

    def __str__(self) -> str:
        return str(self._endpoint)

    def __repr__(self) -> str:
        return f"<MemoryServer endpoint {self._endpoint.label}>"


class MemoryServer(_ServerView):
    """A pulsyflux server and its clients in memory, on a clock that moves only when told.

    ``address`` is what clients connect to (an endpoint; every client takes
    it wherever it takes an address); give them ``reactor=server.clock``
    too, so their timers run on the same clock. Nothing happens until the
    clock is pumped: :meth:`run` drives a Deferred or coroutine to its end,
    jumping the clock from timer to timer while nothing else is due;
    :meth:`flush` delivers everything due now; :meth:`advance` lets time
    pass. Connections behave like TCP's where the server relies on it
    (asynchronous delivery, flow control, resets), see :mod:`pulsyflux.server.inproc`.

        server = MemoryServer()
        provider = server.run(Provider.connect(server.address, channel, handler=bytes.upper, reactor=server.clock))
        consumer = server.run(server.connect(Consumer, channel))  # the same, shorter
        assert server.run(consumer.send(b"hi")) == b"HI"

    ``broker=True`` (the default) runs the broker on its default channel,
    as :func:`start_server` does; ``options`` go to
    :class:`~pulsyflux.server.ServerFactory` (``max_body=...`` etc.).
    """

    def __init__(self, *, broker: bool = True, clock: Optional[MemoryReactorClock] = None, **options: Any) -> None:
        self.clock = clock if clock is not None else MemoryReactorClock()
        self._options = options
        self.factory = ServerFactory(self.clock, **options)
        # Clients are strangers (not trusted): every limit of the server applies to them.
        self._endpoint = InProcessEndpoint(self.factory, self.clock, trusted=False, label="memory")
        self.address = _StrangerEndpoint(self._endpoint)
        self.broker: Optional[Broker] = None
        self.broker_channel: Optional[uuid.UUID] = None
        self._with_broker = broker
        self._quiet: list[Deferred[None]] = []
        self._until: list[tuple[Callable[[], Any], Deferred[None]]] = []
        self._start_broker()

    def _start_broker(self) -> None:
        if self._with_broker:
            from .broker.link import DEFAULT_BROKER_CHANNEL
            from .service import connect_own_broker

            self.broker = self.run(connect_own_broker(self.factory, self.clock))
            self.broker_channel = DEFAULT_BROKER_CHANNEL

    def restart(self) -> None:
        """The server's process dies and a new one starts at the same address, at once.

        Every connection is reset (what a crash looks like to the clients)
        and the new server knows none of them; clients with ``reconnect``
        come back on their own timers (drive them with :meth:`run` or
        :meth:`advance`). With a broker, a new one starts beside the new
        server: the old one died with its process.
        """
        self.factory.router.close_all()
        self.flush()
        self.factory = ServerFactory(self.clock, **self._options)
        self._endpoint.factory = self.factory
        self._start_broker()

    @property
    def reactor(self) -> MemoryReactorClock:
        """The clock, under the name constructors take it by (``reactor=server.reactor``)."""
        return self.clock

    def connect(self, client: Any, *args: Any, **options: Any) -> "Deferred[Any]":
        """``client.connect(server.address, *args, reactor=server.clock, **options)``.

        For ``Consumer``, ``Provider``, ``BrokerClient`` or ``Broker``:
        ``server.run(server.connect(Consumer, channel))``.
        """
        return client.connect(self.address, *args, reactor=self.clock, **options)

    def now(self) -> float:
        """Seconds on the clock (it starts at 0)."""
        return self.clock.seconds()

    def flush(self) -> None:
        """Run everything due now, and whatever that makes due now, until nothing is."""
        self.clock.advance(0)
        while self._quiet or self._settle():
            waiters, self._quiet = self._quiet, []
            for d in waiters:
                d.callback(None)
            self.clock.advance(0)

    def until(self, condition: Callable[[], Any]) -> "Deferred[None]":
        """Fires once ``condition()`` is true, checked each time the clock has run what was due.

        For a state no Deferred announces (a counter in the stats, a
        registry entry): waits in clock time, as long as timers keep coming,
        without polling real time; under :meth:`run`, a condition that can no
        longer come true fails as a deadlock instead of hanging.

            await server.until(lambda: server.stats.requests_routed >= 6)
        """
        d: Deferred[None] = Deferred()
        if condition():
            d.callback(None)
        else:
            self._until.append((condition, d))
        return d

    def _settle(self) -> bool:
        """Fire the ``until`` waiters whose condition now holds; whether any did."""
        if not self._until:
            return False
        met = [(condition, d) for condition, d in self._until if condition()]
        if not met:
            return False
        self._until = [entry for entry in self._until if entry not in met]
        for _, d in met:
            d.callback(None)
        return True

    def quiet(self) -> "Deferred[None]":
        """Fires once everything due now has run (every byte delivered), before the clock moves.

        For a coroutine under :meth:`run` that checks state no Deferred
        announces: ``await server.quiet()`` instead of polling.
        """
        d: Deferred[None] = Deferred()
        self._quiet.append(d)
        return d

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: each timer runs at its own time, with what it starts."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        target = self.clock.seconds() + seconds
        self.flush()
        while True:
            due = self._next_call()
            if due is None or due > target:
                break
            self._jump(due)
        self._jump(target)

    def run(self, awaitable: Union["Deferred[T]", Coroutine[Any, Any, T]], *, timeout: float = 3600.0) -> T:
        """Drive ``awaitable`` to its end and return its result (or raise its error).

        While it waits and nothing is due, the clock jumps to the next timer,
        so waiting for a 10-second timeout costs nothing. Fails if nothing is
        left that could make it fire (a deadlock: typically a client created
        without ``reactor=server.clock``), or after ``timeout`` seconds on
        the clock.
        """
        d: Deferred[T] = ensureDeferred(awaitable)
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        deadline = self.clock.seconds() + timeout
        self.flush()
        while not outcome:
            due = self._next_call()
            if due is None:
                d.cancel()
                raise AssertionError(f"{awaitable!r} waits for something that never comes: no timer is left")
            if due > deadline:
                d.cancel()
                raise AssertionError(f"{awaitable!r} still waiting after {timeout} seconds on the clock")
            self._jump(due)
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def drop(self, *connections: Union[ServerProtocol, Connected]) -> "Deferred[Any]":
        """Cut each connection as a TCP reset would, all at once, and let both ends notice.

        A connection is the server's end (from :attr:`connections`) or a
        client (``Consumer``, ``Provider``, or a Broker, BrokerClient or
        Subscription: every connection it holds, as when its process dies).
        The Deferred has fired on return.
        """
        gone = _drop(self.factory, connections)
        self.flush()
        return gone

    def close(self) -> None:
        """Close the broker, then every connection (the clients see theirs lost)."""
        if self.broker is not None:
            self.run(maybeDeferred(self.broker.close))
        self.run(self.factory.shutdown(grace=0, linger=0))

    def _next_call(self) -> Optional[float]:
        calls = [call.getTime() for call in self.clock.getDelayedCalls() if call.active()]
        return min(calls) if calls else None

    def _jump(self, when: float) -> None:
        now = self.clock.seconds()
        if when > now:
            self.clock.advance(when - now)
            if self.clock.seconds() < when:  # rounding: land exactly on the timer's time
                self.clock.rightNow = when
        self.flush()
