"""The adapter between TCP connections and the :class:`~pulsyflux.server.router.Router`.

:class:`ServerProtocol` turns bytes into frames for the router and back;
:class:`ServerFactory` builds them around one router and shuts it down.

    factory = ServerFactory()
    port = reactor.listenTCP(9090, factory, interface="127.0.0.1")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.protocol import ServerFactory as _TwistedServerFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from .._reactor import default_reactor
from .._twisted_compat import immediate_send_pieces
from .._types import IStreamTransport
from ..wire import codec, errors
from ..wire.codec import ERROR, FrameDecoder
from ..wire.errors import ProtocolError
from ..wire.ratelimit import shorten
from ..writer import hang_up, immediate_writer
from .backpressure import Backpressure
from .router import (
    DEFAULT_GRACE,
    Limits,
    Peer,
    Refused,
    RegistryKey,
    Router,
    ServerStats,
)

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+; typing_extensions comes with Twisted
    from typing_extensions import Unpack

__all__ = ["ServerProtocol", "ServerFactory"]


# What a request's START, CHUNK header and END take on the wire, besides its payload.
_REQUEST_FRAMES_SIZE = codec.START_FRAME_SIZE + 2 * codec.HEADER_SIZE


def _ignore(data: bytes) -> None:
    pass


@implementer(IHandshakeListener)
class ServerProtocol(Protocol):
    """One client connection: bytes in, frames to the router, bytes out.

    ``trusted`` marks the server's own connections (the broker beside it,
    over :mod:`pulsyflux.server.inproc`): set before ``connectionMade``, it lets
    them provide on reserved channels and send on guarded ones. What the
    router knows of the connection is its :class:`Peer` (``peer``, set once
    by ``connectionMade``; None for a connection refused there).
    """

    trusted: bool = False
    transport: IStreamTransport  # set before connectionMade, never None after

    def __init__(self, router: Router) -> None:
        self.router = router
        self.decoder = FrameDecoder(with_header=True)  # frames are forwarded as they came
        self.peer: Optional[Peer] = None  # the router's record of this connection
        self._lost = False
        self._lost_waiters: list[Deferred[None]] = []

    @property
    def lost(self) -> bool:
        """True once this connection is gone (``connectionLost`` ran)."""
        return self._lost

    def closed(self) -> "Deferred[None]":
        """Fires once this connection is gone."""
        if self._lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    @property
    def key(self) -> Optional[RegistryKey]:
        """(role, channel id, client id) once registered, else None."""
        peer = self.peer
        return None if peer is None else peer.key

    @property
    def flow(self) -> Optional[Backpressure]:
        """Its flow-control state (None if refused)."""
        peer = self.peer
        return None if peer is None else peer.flow

    def connectionMade(self) -> None:
        transport = self.transport
        router = self.router
        for option in ("setTcpNoDelay", "setTcpKeepAlive"):
            setter = getattr(transport, option, None)
            if setter is not None:
                setter(True)  # low latency; idle connections live (docs/protocol.md)
        stats = self.router.stats
        raw_write = immediate_writer(transport)

        def write(data: bytes) -> None:
            size = len(data)
            stats.bytes_out += size
            peer.bytes_out += size
            raw_write(data)

        # A function, not a bound method: the router calls peer.write per flush with no
        # bound-method object or state check on the way, and it holds no reference to this protocol.
        try:
            peer = self.peer = router.connect(write, transport, self.trusted, self)
        except Refused:
            self.stop_reading()  # refused (max_connections): its ERROR is sent, it is never routed
            return
        raw_write_pieces = immediate_send_pieces(transport)
        if raw_write_pieces is not None:

            def write_pieces(pieces: list[bytes]) -> None:
                size = sum(map(len, pieces))
                stats.bytes_out += size
                peer.bytes_out += size
                raw_write_pieces(pieces)

            peer.write_pieces = write_pieces
        # An in-process link's server end takes whole frames as they are (pulsyflux.server.inproc).
        peer.deliver = getattr(transport, "deliver_frames", None)
        transport.registerProducer(peer.flow, True)

    def handshakeCompleted(self) -> None:
        """TLS told us who the client is (``mtls:``): grants the auth file gives its certificate apply.

        TLS calls this before it delivers the first byte the client sent, so
        the registration that follows is judged with them.
        """
        gate = self.router.gate
        peer = self.peer
        if gate is None or peer is None or not gate.authority.certificates:
            return
        x509 = self.transport.getPeerCertificate()  # type: ignore[attr-defined]  # an ISSLTransport here
        if x509 is None:
            return  # an ssl: listener asks for none
        from cryptography.x509.oid import NameOID

        subject = x509.to_cryptography().subject
        names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = names[0].value if names else None
        gate.certificate(peer, subject.rfc4514_string(), common_name if isinstance(common_name, str) else None)

    def dataReceived(self, data: bytes) -> None:
        router = self.router
        router.stats.bytes_in += len(data)
        frame_received = router.frame_received
        peer: Peer = self.peer  # type: ignore[assignment]  # a refused connection reads nothing (stop_reading)
        peer.bytes_in += len(data)
        router.reading = peer
        frames = 0
        try:
            decoder = self.decoder
            for ftype, flags, request_id, frame in decoder.frames(data):
                frames += 1
                frame_received(peer, ftype, flags, request_id, frame)
            if peer.held or decoder.partials != peer.frame_serial:  # an incomplete frame: timed and budgeted
                router.connection_guard.holding(peer, decoder.buffered, decoder.partials)
        except ProtocolError as error:
            # Bad version or oversized length: this stream cannot be resynced.
            router.stats.protocol_errors += 1
            if router.log_limiter.allow("closing"):
                router.log.info("closing {peer}: {error}", peer=self.transport.getPeer(), error=shorten(error))
            router.send(peer, codec.encode_frame(ERROR, bytes(16), codec.error_payload(str(error))))
            router.flush()
            hang_up(self.transport)
        except Refused:
            # Refused (a foreign provider on a reserved channel, a token or a right refused): its ERROR
            # leaves first, the rest of what it sent is never routed.
            self.stop_reading()
            router.flush()
            hang_up(self.transport)
        finally:
            peer.frames_in += frames  # once per read, not per frame
            router.flush()
            router.reading = None

    def request(
        self, request_id: bytes, timeout_ms: int, client_id: bytes, channel: bytes, parts: Sequence[bytes], size: int
    ) -> bool:
        """A whole request from the client end of an in-process link (:mod:`pulsyflux.server.inproc`), routed
        as :meth:`dataReceived` routes its frames, without framing it into bytes and decoding them again
        (:meth:`Router.request`); counted as those frames would be.

        False when it must come as bytes instead: while the router routes
        a read (never re-entered), before this connection has registered
        (registration has its own rules), with part of a frame held, or
        once this connection was refused.
        """
        router = self.router
        peer = self.peer
        if router.reading is not None or peer is None or peer.key is None or self.decoder.buffered:
            return False
        if "dataReceived" in self.__dict__:  # stop_reading() shadowed it: nothing more is routed
            return False
        wire = (_REQUEST_FRAMES_SIZE + size) if size else _REQUEST_FRAMES_SIZE - codec.HEADER_SIZE
        router.stats.bytes_in += wire
        peer.bytes_in += wire
        peer.frames_in += 3 if size else 2
        router.reading = peer
        try:
            router.request(peer, request_id, timeout_ms, client_id, channel, parts, size)
        finally:
            router.flush()
            router.reading = None
        return True

    def stop_reading(self) -> None:
        """Drop, unread, whatever more the peer sends (a refused connection, or one the guard closes).

        An instance attribute shadows :meth:`dataReceived` instead of a flag
        that it tests: the read path of every other connection carries no check.
        """
        self.dataReceived = _ignore  # type: ignore[method-assign]  # see the docstring: for speed

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self.peer is not None:  # None: refused by connectionMade, never routed
            self.router.disconnected(self.peer)
        # Its partial frame goes now, even while a pending deadline still refers to this connection.
        self.decoder = FrameDecoder(with_header=True)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)


class ServerFactory(_TwistedServerFactory):
    """Builds :class:`ServerProtocol` connections sharing one :class:`Router`.

    ``reactor`` is also the clock for request deadlines, so tests can pass a
    ``task.Clock``-driven reactor. The limits (docs/reliability.md):
    ``max_body`` bytes in one request or response body (64 MiB),
    ``max_in_flight`` requests per connection (10,000),
    ``max_connections`` client connections (10,000), and ``max_unsent``
    bytes queued for one connection that reads too slowly (4 MiB; all of
    them together: ``max_unsent_total``, 256 MiB). Past a limit the request
    or connection gets a ``server overloaded: ...`` / ``... too large ...`` ERROR.
    Peers that hold resources without using them are closed
    (:mod:`pulsyflux.server.guard`): ``register_timeout`` seconds to send a first
    START (10), ``frame_timeout`` seconds for a frame to arrive whole (30),
    and ``max_partial_bytes`` held in incomplete frames, all connections
    together (256 MiB). :class:`~pulsyflux.server.router.Router` owns the
    limits and their defaults; the factory passes them on.

        factory = ServerFactory(max_body=8 << 20, max_connections=500)
    """

    protocol = ServerProtocol
    noisy = False  # "pulsyflux server listening on ..." says it; not "Starting factory <... at 0x...>"

    def __init__(self, reactor: Optional[IReactorTime] = None, **limits: Unpack[Limits]) -> None:
        reactor = default_reactor(reactor)
        self.reactor = reactor
        self.router = Router(reactor, **limits)

    @property
    def registry(self) -> dict[RegistryKey, Optional[ServerProtocol]]:
        """(role, channel id, client id) -> connection (:class:`ServerProtocol`), for every registered client.

        (None only for a peer a test drove through the router with no protocol.)
        """
        return {key: peer.conn for key, peer in self.router.registry.items()}

    @property
    def stats(self) -> ServerStats:
        return self.router.stats

    def shutdown(self, grace: float = DEFAULT_GRACE, linger: float = 1.0) -> "Deferred[None]":
        """Drain, then close every connection; fires once all are gone.

        New requests are refused (``server overloaded: shutting down``), those
        in flight get up to ``grace`` seconds to finish (then fail with that
        same error), then every connection
        is closed after flushing what it has to send; one that cannot flush
        within ``linger`` seconds more is aborted. Stop listening first.

            await port.stopListening()
            await factory.shutdown(grace=5.0)
        """
        router = self.router
        clock = self.reactor
        router.draining = True
        drained = router.when_idle().addTimeout(grace, clock)
        drained.addErrback(lambda failure: failure.trap(defer.TimeoutError))  # grace is over: close anyway
        return drained.addCallback(lambda _: self._close_all(linger))

    def _close_all(self, linger: float) -> "Deferred[None]":
        router = self.router
        router.fail_all(errors.MSG_SHUTTING_DOWN)  # the grace period is over: say so
        gone = router.close_all(abort=False)
        timer = self.reactor.callLater(linger, router.close_all)  # those that could not flush in time

        def all_gone(_: object) -> None:
            if timer.active():
                timer.cancel()
            router.connection_guard.stop()
            router.log_limiter.stop()  # write pending summaries now; no timer outlives the server

        return gone.addCallback(all_gone)

    def buildProtocol(self, addr: Optional[IAddress]) -> ServerProtocol:
        proto = ServerProtocol(self.router)
        proto.factory = self
        return proto
