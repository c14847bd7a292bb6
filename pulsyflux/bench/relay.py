"""A bare Twisted byte relay: the baseline the router is measured against.

No framing, no routing table, no request ids: a relay process copies bytes
from each client to its own upstream connection to an echo process and back.
The topology is the router's (client -> relay -> echo -> relay -> client), so
the relay's round trips per second are what the same hops cost in Twisted
before pulsyflux adds anything.

The benchmark starts the two processes itself::

    python -m pulsyflux.bench.relay echo               # prints its port
    python -m pulsyflux.bench.relay relay ECHO_PORT    # prints its port

Add ``immediate`` to either to send the way pulsyflux does
(:mod:`pulsyflux.writer`) instead of with a bare ``transport.write``.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Optional, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory

from pulsyflux.writer import immediate_writer

from .common import run_as_child

if TYPE_CHECKING:
    from .._types import IReactor


__all__ = ["EchoProtocol", "RelayProtocol", "RelayFactory", "RoundTripClient", "serve"]


def _low_latency(transport: Any) -> None:
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        setter(True)  # the router sets TCP_NODELAY too: same rules for both


def _writer(transport: Any, immediate: bool) -> Any:
    return immediate_writer(transport) if immediate else transport.write


class EchoProtocol(Protocol):
    """Sends back every byte it receives."""

    def __init__(self, immediate: bool = False) -> None:
        self.immediate = immediate

    def connectionMade(self) -> None:
        _low_latency(self.transport)
        # The bare relay's baseline: bytes go straight to the writer, no method in between.
        self.dataReceived = _writer(self.transport, self.immediate)  # type: ignore[method-assign]  # for speed


class _Upstream(Protocol):
    """The relay's connection to the echo process, paired with one client."""

    def __init__(self, downstream: "RelayProtocol") -> None:
        self.downstream = downstream

    def connectionMade(self) -> None:
        _low_latency(self.transport)
        self.downstream.upstream_ready(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.downstream.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.downstream.transport.loseConnection()


class RelayProtocol(Protocol):
    """One client connection; its bytes go to a dedicated upstream and back."""

    transport: ITransport  # set before connectionMade

    def __init__(self, reactor: IReactor, upstream_port: int, immediate: bool = False) -> None:
        self.reactor = reactor
        self.upstream_port = upstream_port
        self.immediate = immediate
        self.upstream: Any = None  # the write to the echo process
        self.upstream_transport: Any = None
        self.write: Any = None
        self.waiting: list[bytes] = []

    def connectionMade(self) -> None:
        _low_latency(self.transport)
        self.write = _writer(self.transport, self.immediate)
        factory = ClientFactory.forProtocol(lambda: _Upstream(self))
        self.reactor.connectTCP("127.0.0.1", self.upstream_port, factory)  # type: ignore[arg-type]  # a ClientFactory (Twisted types forProtocol as Factory)

    def upstream_ready(self, transport: Any) -> None:
        self.upstream_transport = transport
        self.upstream = _writer(transport, self.immediate)
        if self.waiting:
            self.upstream(b"".join(self.waiting))
            self.waiting = []

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is None:
            self.waiting.append(data)
        else:
            self.upstream(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.upstream_transport is not None:
            self.upstream_transport.loseConnection()


class RelayFactory(ServerFactory):
    def __init__(self, reactor: IReactor, upstream_port: int, immediate: bool = False) -> None:
        self.reactor = reactor
        self.upstream_port = upstream_port
        self.immediate = immediate

    def buildProtocol(self, addr: Any) -> RelayProtocol:
        return RelayProtocol(self.reactor, self.upstream_port, self.immediate)


class RoundTripClient(Protocol):
    """Sends ``size`` bytes, waits for all of them back, repeats until a deadline.

    ``run`` fires with the round-trip times in seconds. This is the relay's
    counterpart of a Consumer awaiting one ``send`` after another.
    """

    def __init__(self, immediate: bool = False) -> None:
        self.immediate = immediate
        self.write: Any = None
        self.connected_d: Deferred[RoundTripClient] = Deferred()
        self._done: Optional[Deferred[list[float]]] = None
        self._message = b""
        self._missing = 0
        self._started = 0.0
        self._deadline = 0.0
        self.samples: list[float] = []

    def connectionMade(self) -> None:
        _low_latency(self.transport)
        self.write = _writer(self.transport, self.immediate)
        self.connected_d.callback(self)

    def run(self, size: int, duration: float) -> "Deferred[list[float]]":
        self._done = Deferred()
        self._message = b"x" * size
        self.samples = []
        self._deadline = time.perf_counter() + duration
        self._send()
        return self._done

    def _send(self) -> None:
        self._missing = len(self._message)
        self._started = time.perf_counter()
        self.write(self._message)

    def dataReceived(self, data: bytes) -> None:
        self._missing -= len(data)
        if self._missing > 0:
            return
        now = time.perf_counter()
        self.samples.append(now - self._started)
        if now < self._deadline:
            self._send()
        else:
            done, self._done = self._done, None
            if done is not None:
                done.callback(self.samples)

    def connectionLost(self, reason: Any = None) -> None:
        done, self._done = self._done, None
        if done is not None:
            done.errback(reason)


def serve(argv: list[str]) -> None:
    """Child-process entry: ``echo`` or ``relay ECHO_PORT``, then optionally ``immediate``."""
    from twisted.internet import reactor

    immediate = argv[-1:] == ["immediate"]
    if immediate:
        argv = argv[:-1]
    if argv == ["echo"]:
        factory: ServerFactory = ServerFactory()
        factory.protocol = lambda: EchoProtocol(immediate)  # what Factory.forProtocol does
    elif len(argv) == 2 and argv[0] == "relay":
        factory = RelayFactory(reactor, int(argv[1]), immediate)
    else:
        sys.exit("usage: python -m pulsyflux.bench.relay echo | relay ECHO_PORT  [immediate]")
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(cast(IPv4Address, port.getHost()).port, flush=True)
    run_as_child(reactor)


if __name__ == "__main__":
    serve(sys.argv[1:])
