"""Attacks on flow control (issue #8, items 2 and 9), over real TCP on 127.0.0.1.

A client that never reads what the server sends it must stall nobody but
itself, and a closed connection must be freed at once, not by the cycle
collector.
"""

from __future__ import annotations

import gc
import os
import socket
import weakref
from functools import partial

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory, Protocol

from pulsyflux import BrokerClient, Consumer, Provider
from pulsyflux._twisted_compat import unsent_bytes
from pulsyflux.server import ServerFactory
from pulsyflux.testing import start_server
from pulsyflux.wire import codec, messages

from .helpers import collect_unless_refcounted, eventually, later
from .test_reliability import other_channel_round_trips
from .wire import connect_raw, register_frames, request_frames

ensure = pytest_twisted.ensureDeferred

KiB = 1 << 10


class Deaf(Protocol):
    """A client that writes and never reads a byte."""

    def __init__(self) -> None:
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # never read: what the server sends piles up

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


def connect_deaf(port: int) -> Deaf:
    """A deaf client with a small receive buffer (see :func:`server_side` for the server's end)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))  # completes in the kernel's listen backlog
    sock.setblocking(False)
    deaf = Deaf()
    factory = Factory.forProtocol(lambda: deaf)
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_INET, factory)
    sock.close()  # the reactor holds its own duplicate
    return deaf


async def server_side(router, role: int, channel: bytes, client_id: bytes):
    """The server's end of a client's connection, once registered, with a small kernel send buffer:
    a slow network in effect, so its transport's own buffer fills after a few KiB, not megabytes."""
    key = (role, channel, client_id)
    await eventually(lambda: key in router.registry)
    conn = router.registry[key].conn  # the router's Peer -> its ServerProtocol
    conn.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return conn


async def deaf_consumer(router, port: int, channel: bytes):
    """A registered deaf consumer on both ends of a slow link: (client, client id, server's end)."""
    deaf = connect_deaf(port)
    deaf_id = os.urandom(16)
    deaf.transport.write(register_frames(codec.ROLE_CONSUMER, deaf_id, channel))
    return deaf, deaf_id, await server_side(router, codec.ROLE_CONSUMER, channel, deaf_id)


def buffered(conn) -> int:
    """Bytes the server's transport holds for ``conn`` (its unsent output)."""
    return unsent_bytes(conn.transport)


@ensure
async def test_attack_deaf_publisher_does_not_freeze_other_publishers():
    server = await start_server()
    try:
        router = server.factory.router
        channel = server.broker_channel.bytes
        deaf, deaf_id, deaf_conn = await deaf_consumer(router, server.port, channel)
        body = messages.encode_batch([messages.encode_text("news", b"x", None)])
        sent = 0
        for _ in range(40):  # publish until the server cannot send the deaf one its acks
            deaf.transport.write(b"".join(request_frames(os.urandom(16), deaf_id, channel, body) for _ in range(500)))
            sent += 500
            # Until the broker has them all, or the server stopped writing to the deaf one.
            await eventually(lambda sent=sent: deaf_conn.flow.paused or server.broker.published >= sent)
            if deaf_conn.flow.paused:
                break
        assert deaf_conn.flow.paused

        honest = await BrokerClient.connect(server.address, heartbeat=None)
        for n in range(50):
            await honest.publish("news", b"honest %d" % n, timeout=2.0)  # each one accepted in time
        assert server.broker.published >= 50

        # The push-back fell on the deaf publisher alone: it is not read any more, and
        # what the server holds for it stays bounded (or it was closed as a slow consumer).
        assert deaf_conn.flow.reading_paused or deaf_conn.flow.cut
        assert buffered(deaf_conn) < router.flow_control.max_unsent + 128 * KiB
        await honest.close()
    finally:
        await server.stop()


@pytest.mark.parametrize("bound", ["max_unsent", "max_unsent_total"])
@ensure
async def test_attack_deaf_consumer_does_not_freeze_a_shared_provider(channel, bound):
    max_unsent = 256 * KiB  # the per-connection bound, or the one over all connections
    factory = ServerFactory(reactor, **{bound: max_unsent})
    factory.router.flow_control.linger = 0.05  # a deaf peer never reads its ERROR: don't wait long
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    address = f"127.0.0.1:{port.getHost().port}"
    router = factory.router
    provider = await Provider.connect(address, channel, handler=lambda data: data)  # an echo service
    honest = await Consumer.connect(address, channel)
    peak = 0

    def sample() -> None:
        nonlocal peak
        peak = max([peak] + [buffered(conn) for conn in router.connections])

    sampler = task.LoopingCall(sample)
    sampler.start(0.001)
    try:
        deaf, deaf_id, deaf_conn = await deaf_consumer(router, port.getHost().port, channel.bytes)
        big = os.urandom(128 * KiB)
        for _ in range(48):  # 6 MiB of echoes it will never read
            deaf.transport.write(request_frames(os.urandom(16), deaf_id, channel.bytes, big, timeout_ms=30000))
        await eventually(lambda: deaf_conn.flow.paused)

        for n in range(20):
            assert await honest.send(b"ping %d" % n, timeout=2.0) == b"ping %d" % n

        # The deaf consumer was closed once the server held max_unsent bytes for it...
        await eventually(lambda: factory.stats.slow_consumers == 1)
        await deaf.lost
        assert factory.stats.errors["server overloaded"] >= 1  # counted by kind; the text is among the recent ones
        assert [text for text in factory.stats.recent_errors if text.startswith("server overloaded: slow consumer:")]
        sample()
        # ...and never more than that (plus the high-water mark and one response frame) was held.
        assert peak < max_unsent + 64 * KiB + 256 * KiB
        assert router.flow_control.unsent_total == 0
        assert await honest.send(b"still here", timeout=2.0) == b"still here"
    finally:
        sampler.stop()
        router.close_all()  # first: a stalled provider must not delay closing
        await honest.close()
        await provider.close()
        await maybeDeferred(port.stopListening)


@ensure
async def test_attack_slow_consumer_alone_still_pauses_its_provider(server, channel):
    """The old good behaviour stays: a provider that serves only the slow consumer is paused, not buffered."""
    body = os.urandom(64 * KiB) * 64  # 4 MiB
    provider = await Provider.connect(server.address, channel, handler=lambda data: body)
    router = server.factory.router
    deaf, deaf_id, _ = await deaf_consumer(router, server.port, channel.bytes)
    deaf.transport.write(request_frames(os.urandom(16), deaf_id, channel.bytes, b"big please", timeout_ms=30000))
    provider_conn = router.registry[(codec.ROLE_PROVIDER, channel.bytes, provider.client_id.bytes)]
    await eventually(lambda: provider_conn.flow.reading_paused)
    # Its 4 MiB answer is written out on the provider's side: these round trips are the time
    # it would take the server to read it all, were the provider not held.
    await other_channel_round_trips(server)
    assert provider_conn.flow.reading_paused
    assert server.factory.stats.slow_consumers == 0
    assert router.flow_control.unsent_total < router.flow_control.max_unsent
    deaf.transport.abortConnection()
    await deaf.lost
    await eventually(lambda: not provider_conn.flow.reading_paused)  # freed when the slow one left
    await provider.close()


def _holds_partial_request(conn, requests, request_id) -> bool:
    return bool(conn.decoder.buffered) and request_id in requests


def _paused_holding(flow) -> bool:
    return flow.paused and bool(flow.held)


async def _closed_while_gc_is_off(server, conn_ref, decoder_ref, close) -> None:
    closed = conn_ref().closed()
    gc.disable()
    try:
        close()
        await closed
        await later(0)  # let the reactor finish the call that lost the connection
        collect_unless_refcounted()
        assert conn_ref() is None, "the closed connection waits for the cycle collector"
        assert decoder_ref() is None, "its partial-frame buffer waits for the cycle collector"
    finally:
        gc.enable()


@ensure
async def test_attack_closed_connection_with_half_a_frame_is_freed_without_gc(server, channel):
    raw = await connect_raw(server)
    raw.send(register_frames(codec.ROLE_CONSUMER, os.urandom(16), channel.bytes))
    raw.send(codec.encode_header(codec.CHUNK, os.urandom(16), 512 * KiB) + b"half" * 1000)  # half a frame
    router = server.factory.router
    await eventually(lambda: any(conn.decoder.buffered for conn in router.connections))
    (conn,) = [conn for conn in router.connections if conn.decoder.buffered]
    conn_ref, decoder_ref = weakref.ref(conn), weakref.ref(conn.decoder)
    del conn
    await _closed_while_gc_is_off(server, conn_ref, decoder_ref, raw.transport.loseConnection)


@ensure
async def test_attack_closed_connection_frees_its_partial_frame_while_a_deadline_remembers_it(server, channel):
    """A finished request's deadline may still refer to its connection: not to its partial frame."""
    provider = await Provider.connect(server.address, channel)
    other = await Consumer.connect(server.address, channel)
    pending = other.send(b"keeps the router busy", timeout=10)
    await provider.receive()
    raw = await connect_raw(server)
    client_id, request_id = os.urandom(16), os.urandom(16)
    raw.send(register_frames(codec.ROLE_CONSUMER, client_id, channel.bytes))
    meta = codec.pack_metadata(codec.ROLE_CONSUMER, 30_000, client_id, channel.bytes)
    raw.send(codec.encode_frame(codec.START, request_id, meta))  # a request with a 30 s deadline...
    raw.send(codec.encode_header(codec.CHUNK, request_id, 512 * KiB) + b"half" * 1000)  # ...and half a chunk
    router = server.factory.router
    conn = await server_side(router, codec.ROLE_CONSUMER, channel.bytes, client_id)
    await eventually(partial(_holds_partial_request, conn, router.requests, request_id))
    decoder_ref = weakref.ref(conn.decoder)
    closed = conn.closed()
    del conn
    gc.disable()
    try:
        raw.transport.loseConnection()
        await closed
        await later(0)
        collect_unless_refcounted()
        assert decoder_ref() is None, "a closed connection's partial frame outlives it"
    finally:
        gc.enable()
    other.close()
    pending.addErrback(lambda _: None)
    await provider.close()


@ensure
async def test_attack_closed_slow_connection_is_freed_without_gc(server, channel):
    """Also when it closes while flow control holds it (paused, holding its provider)."""
    body = os.urandom(64 * KiB) * 32
    provider = await Provider.connect(server.address, channel, handler=lambda data: body)
    router = server.factory.router
    deaf, deaf_id, conn = await deaf_consumer(router, server.port, channel.bytes)
    deaf.transport.write(request_frames(os.urandom(16), deaf_id, channel.bytes, b"big please", timeout_ms=30000))
    await eventually(partial(_paused_holding, conn.flow))
    conn_ref, decoder_ref = weakref.ref(conn), weakref.ref(conn.decoder)
    del conn
    await _closed_while_gc_is_off(server, conn_ref, decoder_ref, deaf.transport.abortConnection)
    await provider.close()


@ensure
async def test_attack_refused_connection_is_freed_without_gc(channel):
    factory = ServerFactory(reactor, max_connections=0)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    made: list = []
    build = factory.buildProtocol
    factory.buildProtocol = lambda addr: made.append(build(addr)) or made[-1]
    try:
        gc.disable()
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        await eventually(lambda: made)
        conn = made.pop()
        conn_ref = weakref.ref(conn)
        closed = conn.closed()
        del conn
        sock.close()
        await closed
        await later(0)
        collect_unless_refcounted()
        assert conn_ref() is None, "a refused connection waits for the cycle collector"
    finally:
        gc.enable()
        await maybeDeferred(port.stopListening)


def test_slow_consumer_is_counted_in_stats():
    from pulsyflux.http import prometheus_text, stats_document

    factory = ServerFactory(reactor)
    factory.stats.slow_consumers = 3
    document = stats_document(factory)
    assert document["server"]["slow_consumers"] == 3
    assert "pulsyflux_slow_consumers_total 3" in prometheus_text(document)


class SlowProvider(Deaf):
    """A provider that reads nothing until told to, then counts the requests it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = codec.FrameDecoder()
        self.ends = 0

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            if frame.type == codec.END:
                self.ends += 1


@ensure
async def test_attack_burst_of_requests_to_a_slow_provider_does_not_cut_the_provider(channel):
    """Many consumers writing at once to a provider that reads slowly: each consumer is paused,
    the provider is never closed as a 'slow consumer' (that would let anyone end any service,
    the built-in broker's included, with a burst from a few dozen connections)."""
    factory = ServerFactory(reactor, max_unsent=64 * KiB)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    port_number = port.getHost().port
    router = factory.router
    slow = SlowProvider()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port_number))
    sock.setblocking(False)
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_INET, Factory.forProtocol(lambda: slow))
    sock.close()
    provider_id = os.urandom(16)
    slow.transport.write(register_frames(codec.ROLE_PROVIDER, provider_id, channel.bytes))
    provider_conn = await server_side(router, codec.ROLE_PROVIDER, channel.bytes, provider_id)
    consumers = [await Consumer.connect(f"127.0.0.1:{port_number}", channel) for _ in range(24)]
    try:
        body = os.urandom(200 * KiB)
        sends = [c.send(body, timeout=30) for c in consumers]
        for d in sends:
            d.addErrback(lambda _: None)  # never answered: the provider only counts
        await eventually(lambda: provider_conn.flow.paused)  # its send buffer is full

        def pushed_all_it_can() -> bool:
            # Every consumer's request is in, and each is either paused or sent in full.
            entries = list(router.requests.values())
            return len(entries) == len(consumers) and all(
                e.request_size >= len(body) or e.consumer.flow.blocked_by for e in entries
            )

        await eventually(pushed_all_it_can)
        assert factory.stats.slow_consumers == 0
        slow.transport.resumeProducing()  # the provider reads again: every request reaches it, whole
        await eventually(lambda: slow.ends == len(consumers))
        assert factory.stats.slow_consumers == 0
        assert router.flow_control.unsent_total == 0
    finally:
        for conn in list(router.connections):
            conn.transport.abortConnection()
        for c in consumers:
            await c.close()
        await maybeDeferred(port.stopListening)


@ensure
async def test_attack_provider_that_never_reads_its_own_bounced_errors_is_bounded(channel):
    """A provider may not make the server hold without bound what answers its own frames (here the
    unroutable ERRORs it sends, which go back to it): it stops being read, like any slow reader."""
    factory = ServerFactory(reactor, max_unsent=256 * KiB)
    factory.router.flow_control.linger = 0.05
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    router = factory.router
    slow = SlowProvider()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port.getHost().port))
    sock.setblocking(False)
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_INET, Factory.forProtocol(lambda: slow))
    sock.close()
    provider_id = os.urandom(16)
    slow.transport.write(register_frames(codec.ROLE_PROVIDER, provider_id, channel.bytes))
    provider_conn = await server_side(router, codec.ROLE_PROVIDER, channel.bytes, provider_id)
    try:
        bounce = codec.encode_frame(codec.ERROR, os.urandom(16), b"x" * (512 * KiB))  # names no request of its
        for _ in range(32):  # 16 MiB it will never read back
            slow.transport.write(bounce)
        await eventually(lambda: provider_conn.flow.reading_paused or provider_conn.flow.cut)
        assert buffered(provider_conn) < 256 * KiB + 64 * KiB + 2 * 1024 * KiB
    finally:
        for conn in list(router.connections):
            conn.transport.abortConnection()
        await maybeDeferred(port.stopListening)
