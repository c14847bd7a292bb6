"""Immediate sends keep Twisted's guarantees: order, no loss, TLS untouched."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol

from pulsyflux.writer import JOIN_LIMIT, ImmediateWriter, immediate_writer

from .helpers import eventually


class Collect(Protocol):
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.size += len(data)
        if self.size >= self.expected and not self.done.called:
            self.done.callback(b"".join(self.received))


@pytest_twisted.ensureDeferred
async def test_mixed_writes_arrive_whole_and_in_order_even_when_the_reader_stalls():
    pieces = [bytes([n % 251]) * size for n, size in enumerate([5, JOIN_LIMIT + 1, 7, 3_000_000, 1, 64, 9])]
    pieces += [b"tail%d" % n for n in range(200)]
    expected = b"".join(pieces)
    receiver = Collect(len(expected))
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(lambda: receiver))
    try:
        sender = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol())
        writer = ImmediateWriter(sender.transport)
        await eventually(lambda: receiver.transport is not None)  # the accept side may not have run yet
        receiver.transport.pauseProducing()  # the kernel buffers fill: later writes must queue behind
        for n, piece in enumerate(pieces):
            if n == 100:
                writer.hold()
            writer.write(piece)
            if n == 150:
                writer.release()
        writer.release()
        receiver.transport.resumeProducing()
        assert await receiver.done == expected
        sender.transport.loseConnection()
    finally:
        await port.stopListening()


def test_tls_and_test_transports_keep_their_own_write():
    wrapper = TLSMemoryBIOProtocol(None, Protocol())
    wrapper.transport = StringTransport()  # attribute lookups would reach this transport
    assert immediate_writer(wrapper) == wrapper.write
    plain = StringTransport()
    assert immediate_writer(plain) == plain.write
