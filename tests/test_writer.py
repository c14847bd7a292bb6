"""Immediate sends keep Twisted's guarantees: order, no loss, TLS untouched."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol

from pulsyflux._twisted_compat import immediate_send_pieces, unsent_bytes
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


@pytest_twisted.ensureDeferred
async def test_pieces_sent_in_one_gather_write_arrive_whole_and_in_order_even_when_the_reader_stalls():
    """immediate_send_pieces: sendmsg at once; what the kernel did not take is queued piece by piece."""
    batches = [[b"h" * 80, bytes([n % 251]) * size, b"e" * 24] for n, size in enumerate([1, 5000, 20_000_000, 16_000])]
    batches += [[b"s%d" % n, b"t" * 3000] for n in range(100)]
    expected = b"".join(piece for batch in batches for piece in batch)
    receiver = Collect(len(expected))
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(lambda: receiver))
    try:
        sender = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol())
        write = immediate_writer(sender.transport)
        write_pieces = immediate_send_pieces(sender.transport)
        assert write_pieces is not None
        await eventually(lambda: receiver.transport is not None)
        receiver.transport.pauseProducing()  # the kernel takes part of the 3 MB, Twisted queues the rest
        for n, batch in enumerate(batches):
            if n % 3:
                write_pieces(batch)
            else:
                write(b"".join(batch))  # the plain write on the same line keeps its place
        assert unsent_bytes(sender.transport) > 0  # a partial send happened: the rest waits in order
        receiver.transport.resumeProducing()
        assert await receiver.done == expected
        sender.transport.loseConnection()
    finally:
        await port.stopListening()


def test_tls_and_test_transports_keep_their_own_write():
    wrapper = TLSMemoryBIOProtocol(None, Protocol())
    wrapper.transport = StringTransport()  # attribute lookups would reach this transport
    assert immediate_send_pieces(wrapper) is None and immediate_send_pieces(StringTransport()) is None
    assert immediate_writer(wrapper) == wrapper.write
    plain = StringTransport()
    assert immediate_writer(plain) == plain.write
