"""An in-process link to a :class:`~pulsyflux.server.ServerFactory`: no socket at all.

The broker that runs beside the server (:class:`~pulsyflux.service.BrokerService`)
used to dial the server's own port, which fails as soon as that port speaks
TLS (``ssl:``, ``mtls:``) and costs two kernel crossings per hop on every
other kind. :class:`InProcessEndpoint` is a client endpoint whose
``connect`` joins the client protocol to a server protocol of the factory
through a pair of :class:`InProcessTransport` objects:

    endpoint = InProcessEndpoint(factory, reactor)
    broker = await Broker.connect(endpoint)      # any Address takes an endpoint

The transports behave like TCP's where the router relies on it: writes are
buffered and reach the peer from a call the reactor makes (never inside
``write``; one call per turn delivers every in-process connection's bytes,
those written meanwhile included), everything buffered in one ``dataReceived``; a registered
streaming producer is paused while more than :attr:`~InProcessTransport.bufferSize`
bytes wait and resumed once they have been read (the server's flow control,
:mod:`pulsyflux.server.backpressure`); ``pauseProducing`` stops delivering the
peer's bytes; ``loseConnection`` closes once the buffer has drained,
``abortConnection`` drops it. One shortcut: a Consumer's whole request
may go to the server end as values (:meth:`InProcessTransport.route_request`,
routed there and then as its frames would be) when nothing written before it
waits and the server reads; the broker's forwards take it, so a forward's
frames are written once, for the subscriber's socket, not framed here,
decoded by the server and framed again; and the mirror for the answers
(:meth:`InProcessTransport.deliver_frames`): the frames the router flushes to
the client end go to its protocol as they are, not joined and decoded again,
when no bytes written before them wait. Server protocols built here are *trusted*
(``ServerProtocol.trusted``): the server's own broker, exempt from limits
meant for strangers and allowed on the channels the router reserves.

Nothing here is Twisted's test machinery (``twisted.test.iosim`` is
test-only, and ``twisted.protocols.loopback`` has neither flow control
nor asynchronous delivery).
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from ..auth.gate import BrokerLink
    from .protocol import ServerFactory

__all__ = ["InProcessAddress", "InProcessTransport", "InProcessEndpoint", "connect_in_process"]


@implementer(IAddress)
class InProcessAddress:
    """Where an in-process connection comes from: ``inproc:<label>``."""

    __slots__ = ("label",)

    def __init__(self, label: str) -> None:
        self.label = label

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InProcessAddress) and other.label == self.label

    def __hash__(self) -> int:
        return hash(("inproc", self.label))

    def __str__(self) -> str:
        return f"inproc:{self.label}"

    def __repr__(self) -> str:
        return f"InProcessAddress({self.label!r})"


class _Pump:
    """Delivers the buffers of every in-process transport of one reactor, in the order they were written.

    One ``callLater(0)`` per reactor turn for all of them, instead of one per
    transport: what a delivery writes (the broker's forward of a publish it
    was just handed, the router's routing of that forward) is queued here and
    delivered in the same run, after the delivery that wrote it returns. So a
    chain of in-process hops costs one reactor turn, not one per hop, and a
    protocol is still never re-entered from inside a ``write``. A run stops
    after :attr:`budget` deliveries and goes on at the next turn, so sockets
    are read between long chains.
    """

    budget = 256

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self.waiting: deque[InProcessTransport] = deque()
        self.call: Optional[IDelayedCall] = None

    def add(self, transport: "InProcessTransport") -> None:
        self.waiting.append(transport)
        if self.call is None:
            self.call = self.reactor.callLater(0, self.run)

    def run(self) -> None:
        self.call = None
        waiting = self.waiting
        popleft = waiting.popleft
        for _ in range(self.budget):
            if not waiting:
                return
            transport = popleft()
            if transport._due:  # still due (not ended, not delivered since)
                transport._deliver()
        if waiting and self.call is None:
            self.call = self.reactor.callLater(0, self.run)


_PUMPS: "weakref.WeakKeyDictionary[IReactorTime, _Pump]" = weakref.WeakKeyDictionary()


def _pump(reactor: IReactorTime) -> _Pump:
    pump = _PUMPS.get(reactor)
    if pump is None:
        pump = _PUMPS[reactor] = _Pump(reactor)
    return pump


@implementer(ITransport, IConsumer, IPushProducer)
class InProcessTransport:
    """One end of an in-memory connection; :func:`connect_in_process` makes the pair.

    What this end writes waits in its own buffer until the reactor's pump
    (:class:`_Pump`) delivers it to the peer's protocol, so a protocol is never re-entered
    from inside the peer's ``write`` (the router queues writes while it
    routes a read and would otherwise see its own frames arrive mid-loop).
    """

    bufferSize = 64 * 1024  # the high-water mark, as for TCP transports
    log = Logger()

    def __init__(self, reactor: IReactorTime, host: InProcessAddress, peer_address: InProcessAddress) -> None:
        self.reactor = reactor
        self.host = host
        self.peer_address = peer_address
        self.peer: Optional[InProcessTransport] = None
        self.protocol: Optional[IProtocol] = None
        self.connected = True
        self.disconnecting = False  # loseConnection() was called: close once drained
        self.disconnected = False
        self.producer: Optional[IPushProducer] = None
        self.streamingProducer = False
        self.producerPaused = False
        self._buffer: list[bytes] = []  # written here (frames queued as values first), not yet delivered
        self._values = 0  # how many of the buffer's first items are frames queued as values
        self._buffered = 0
        self._due = False  # queued on the reactor's pump to deliver the buffer
        self._pump = _pump(reactor)
        self._reading_paused = False  # pauseProducing(): the peer's bytes wait in its buffer
        self._closing: Optional[IDelayedCall] = None  # the pending callLater that ends the connection

    # -- ITransport -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise TypeError(f"can only write bytes to a transport, not {type(data).__name__}")
        if self.disconnected or not data:
            return  # as TCP: writes to a closed connection are dropped
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > self.bufferSize:
            self._past_the_mark()
        self._schedule_delivery()

    def _past_the_mark(self) -> None:
        """Like a TCP transport: every write past the mark pauses the producer (again)."""
        producer = self.producer
        if producer is not None and self.streamingProducer:
            self.producerPaused = True
            producer.pauseProducing()

    def route_request(
        self, request_id: bytes, timeout_ms: int, client_id: bytes, channel: bytes, parts: Sequence[bytes], size: int
    ) -> bool:
        """Hand the peer a consumer's whole request as values, when it can go now: True if it went.

        ``parts`` joined are its payload (bytes objects, ``size`` bytes in all, at most one frame's).

        The server end routes it at once, as it would route the request's
        frames (``ServerProtocol.request``), so the frames are never made
        into bytes, buffered and decoded; the broker's forwards go this way
        (:class:`~pulsyflux.client.Consumer` asks first). Only when nothing
        written here still waits (order), the peer reads (flow control has
        not paused it) and its protocol takes requests so; otherwise False,
        and the caller writes the frames.
        """
        if self._buffer or self.disconnected or self.disconnecting:
            return False
        peer = self.peer
        if peer is None or peer._reading_paused:
            return False
        take = getattr(peer.protocol, "request", None)
        if take is None:
            return False
        try:
            return bool(take(request_id, timeout_ms, client_id, channel, parts, size))
        except Exception:  # as _deliver: the connection ends with the error (the request fails with it)
            self._reader_failed("unhandled error routing an in-process request; closing the in-process connection")
            return True

    def deliver_frames(self, frames: list[bytes], size: int) -> bool:
        """Queue whole frames (``size`` bytes in all) for the peer as they are, when order allows: True if taken.

        The mirror of :meth:`route_request` for the server end: the router's
        flush hands a client end's frames (the broker's forwards' answers)
        this way, so the pump gives them to the client protocol one by one
        (``_ClientProtocol.frames``) instead of joining them into bytes it
        decodes again. Counted against the high-water mark as bytes are, and
        delivered in order: only while nothing but such frames waits here;
        otherwise False, and the caller writes bytes.
        """
        buffer = self._buffer
        if len(buffer) != self._values or self.disconnected or self.disconnecting:
            return False  # bytes wait here: these follow them as bytes
        if not buffer:
            peer = self.peer
            if peer is None or getattr(peer.protocol, "frames", None) is None:
                return False
        buffer += frames
        self._values += len(frames)
        self._buffered += size
        if self._buffered > self.bufferSize:
            self._past_the_mark()
        self._schedule_delivery()
        return True

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close after everything written so far has reached the peer."""
        if self.disconnected or self.disconnecting:
            return
        self.disconnecting = True
        if not self._buffer:
            self._close_when_drained()
        # else: _deliver closes once the buffer is empty

    def abortConnection(self) -> None:
        """Close now: unsent bytes are dropped both ways; the peer sees ConnectionLost."""
        if self.disconnected:
            return
        self._end(Failure(ConnectionAborted()), Failure(ConnectionLost("connection aborted by the peer")))

    def getPeer(self) -> InProcessAddress:
        return self.peer_address

    def getHost(self) -> InProcessAddress:
        return self.host

    # -- IConsumer ----------------------------------------------------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"cannot register producer {producer!r}: {self.producer!r} is registered already")
        if self.disconnected:
            producer.stopProducing()
            return
        # A pull producer (not streaming) is only ever resumed, which IPushProducer says too.
        self.producer = pushing = cast(IPushProducer, producer)
        self.streamingProducer = bool(streaming)
        self.producerPaused = False
        if not streaming:
            pushing.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producerPaused = False
        if self.disconnecting and not self._buffer:
            self._close_when_drained()

    # -- IPushProducer: reading from the peer ----------------------------------------

    def pauseProducing(self) -> None:
        """Stop handing the peer's bytes to our protocol (they wait in the peer's buffer)."""
        self._reading_paused = True

    def resumeProducing(self) -> None:
        self._reading_paused = False
        peer = self.peer
        if peer is not None and peer._buffer:
            peer._schedule_delivery()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- delivery ---------------------------------------------------------------------

    def _schedule_delivery(self) -> None:
        if not self._due and not self.disconnected:
            peer = self.peer
            if peer is not None and not peer._reading_paused:
                self._due = True
                self._pump.add(self)

    def _deliver(self) -> None:
        """Hand the peer everything buffered: the frames queued as values one by one, the bytes in one ``dataReceived``."""
        self._due = False
        peer = self.peer
        if self.disconnected or peer is None or peer._reading_paused or not self._buffer:
            return
        protocol = peer.protocol
        if protocol is None:
            return  # not connected yet, or gone (disconnected says so first)
        buffer, self._buffer = self._buffer, []
        self._buffered = 0
        values, self._values = self._values, 0
        try:
            if values:
                frames = buffer[:values] if values < len(buffer) else buffer
                if not protocol.frames(frames):  # type: ignore[attr-defined]  # deliver_frames checked it has it
                    protocol.dataReceived(b"".join(frames))
                buffer = buffer[values:] if values < len(buffer) else []
            if buffer and not self.disconnected:
                protocol.dataReceived(buffer[0] if len(buffer) == 1 else b"".join(buffer))
        except Exception:  # as a TCP transport does: the reader's connection ends with the error
            self._reader_failed("unhandled error in dataReceived; closing the in-process connection")
            return
        self._drained()

    def _reader_failed(self, what: str) -> None:
        """The peer's protocol raised while reading (called in its ``except``): log it once, end both ends."""
        failure = Failure()
        self.log.failure(what, failure)
        self._end(Failure(ConnectionLost("the peer failed while reading")), failure)

    def _drained(self) -> None:
        """The peer has read what was buffered: resume our producer, or finish closing."""
        if self._buffer or self.disconnected:
            return
        producer = self.producer
        if producer is not None and self.producerPaused:
            self.producerPaused = False
            producer.resumeProducing()
        if self.disconnecting and not self._buffer and not self.producerPaused:
            self._close_when_drained()

    def _close_when_drained(self) -> None:
        if self._closing is None and not self.disconnected:
            self._closing = self.reactor.callLater(0, self._close_cleanly)

    def _close_cleanly(self) -> None:
        self._closing = None
        if self.disconnected or self._buffer:
            return  # written to meanwhile: _deliver comes back here once drained
        self._end(Failure(ConnectionDone()), Failure(ConnectionDone()))

    def _end(self, ours: Failure, theirs: Failure) -> None:
        """Disconnect both ends at once; each protocol hears of it on the next turn."""
        peer = self.peer
        for end in (self, peer):
            if end is None or end.disconnected:
                continue
            end.disconnected = True
            end.connected = False
            end._buffer = []
            end._buffered = 0
            end._values = 0
            closing = end._closing
            if closing is not None and closing.active():
                closing.cancel()
            end._due = False  # the pump skips an end no longer due
            end._closing = None
        self.reactor.callLater(0, self._connection_lost, ours)
        if peer is not None:
            self.reactor.callLater(0, peer._connection_lost, theirs)

    def _connection_lost(self, reason: Failure) -> None:
        self.peer = None  # no cycle left: a closed pair is freed without the garbage collector
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()  # as TCP: a registered producer is told first
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)


def connect_in_process(
    reactor: IReactorTime,
    client: IProtocol,
    server: IProtocol,
    client_address: InProcessAddress,
    server_address: InProcessAddress,
) -> tuple[InProcessTransport, InProcessTransport]:
    """Join two protocols; the server's ``makeConnection`` runs first (it may refuse)."""
    client_end = InProcessTransport(reactor, client_address, server_address)
    server_end = InProcessTransport(reactor, server_address, client_address)
    client_end.peer, server_end.peer = server_end, client_end
    client_end.protocol, server_end.protocol = client, server
    server.makeConnection(server_end)
    client.makeConnection(client_end)
    return client_end, server_end


@implementer(IStreamClientEndpoint)
class InProcessEndpoint:
    """Connects to ``factory`` (a :class:`~pulsyflux.server.ServerFactory`) in this process.

    Every :class:`~pulsyflux.client.Consumer`, ``Provider``, ``Broker`` or
    ``BrokerClient`` takes it wherever it takes an address. Connections are
    refused once the server drains (``ServerFactory.shutdown``). With
    ``trusted`` (the default) the server side is marked as the server's own
    (``ServerProtocol.trusted``); :meth:`guard_channel` is how the broker
    tells the router which subscriber channels only it may deliver on.
    """

    def __init__(
        self,
        factory: ServerFactory,
        reactor: Optional[IReactorTime] = None,
        *,
        trusted: bool = True,
        label: str = "pulsyflux",
    ) -> None:
        if reactor is None:
            reactor = factory.reactor
        self.factory = factory
        self.reactor = reactor
        self.trusted = trusted
        self.label = label
        self._count = 0

    def __repr__(self) -> str:
        return f"<InProcessEndpoint {self.label}>"

    def __str__(self) -> str:
        return f"inproc:{self.label}"

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        router = getattr(self.factory, "router", None)
        if router is not None and router.draining:
            return fail(ConnectionRefusedError("the server is shutting down"))
        self._count += 1
        client_address = InProcessAddress(f"{self.label}#{self._count}")
        server_address = InProcessAddress(self.label)
        try:
            client = protocolFactory.buildProtocol(server_address)
            if client is None:
                return fail(ConnectionRefusedError("the client factory built no protocol"))
            server = self.factory.buildProtocol(client_address)
            if server is None:
                return fail(ConnectionRefusedError("the server factory refused the connection"))
            if self.trusted:
                server.trusted = True  # before connectionMade: limits for strangers do not apply
            connect_in_process(self.reactor, client, server, client_address, server_address)
        except BaseException:
            return fail()
        return succeed(client)

    def guard_channel(self, channel: bytes) -> Callable[[], None]:
        """Only trusted connections may send requests on ``channel`` until the returned call."""
        return self.factory.router.guard(channel)

    def auth_link(self) -> Optional[BrokerLink]:
        """How the broker beside the server learns who sent a publish or subscribe; None without ``--auth``.

        (:class:`pulsyflux.auth.gate.BrokerLink`: the router's identity of each request's sender.)
        """
        gate = getattr(getattr(self.factory, "router", None), "gate", None)
        if gate is None or not self.trusted:
            return None
        from ..auth.gate import BrokerLink

        return BrokerLink(gate)
