"""A Consumer's request over an in-process link goes to the router as values (``route_request``).

The broker's forwards are requests of its Consumers over in-process links
(:mod:`pulsyflux.server.inproc`); the router takes each as its START, CHUNK
and END fields (:meth:`Router.request`) instead of bytes it would decode.
What the provider receives, what each side is told and every counter must
be what the same request sent as frames gives; the frames path stays for
whatever must keep its order (bytes already waiting, a paused reader).
Driven under a ``task.Clock``, then once through a broker over real TCP.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import gatherResults
from twisted.internet.protocol import Factory, Protocol

from pulsyflux import BrokerService, Consumer, Provider
from pulsyflux.server import ServerFactory
from pulsyflux.server.inproc import InProcessAddress, InProcessEndpoint, connect_in_process
from pulsyflux.server.router import Router
from pulsyflux.wire import codec
from pulsyflux.wire.errors import ServerOverloaded

from .wire import register_frames

ensure = pytest_twisted.ensureDeferred


class Raw(Protocol):
    """A provider that records the bytes the router writes to it."""

    def __init__(self) -> None:
        self.raw = b""

    def dataReceived(self, data: bytes) -> None:
        self.raw += data


def setup(direct: bool, trusted: bool = True, **limits: Any):
    """A server under a clock, a raw provider and a Consumer on one channel, both in-process."""
    clock = task.Clock()
    factory = ServerFactory(clock, **limits)
    endpoint = InProcessEndpoint(factory, clock, trusted=trusted)
    channel = uuid.uuid4().bytes
    provider = Raw()
    endpoint.connect(Factory.forProtocol(lambda: provider))
    provider.transport.write(register_frames(codec.ROLE_PROVIDER, uuid.uuid4().bytes, channel))
    consumer = Consumer.connect(endpoint, channel, reactor=clock).result
    clock.advance(0)
    if not direct:
        consumer._route_request = None  # as a TCP client: frames
    return clock, factory.router, provider, consumer


def numbers(router: Router) -> list[tuple[int, int, int, int]]:
    stats = router.stats
    return [(stats.bytes_in, stats.bytes_out, stats.broker_requests_routed, stats.frames_dropped)] + sorted(
        (peer.bytes_in, peer.bytes_out, peer.frames_in, peer.frames_out) for peer in router.peers
    )


def request_ids(raw: bytes) -> list[bytes]:
    return [frame.request_id for frame in codec.FrameDecoder().feed(raw)]


def without_ids(raw: bytes, routing: bytes = b"") -> list[tuple[int, bytes]]:
    """The frames, each routing (the consumer's, random per run) replaced by its length."""
    return [
        (frame.type, frame.payload.replace(routing, b"<routing>") if routing else frame.payload)
        for frame in codec.FrameDecoder().feed(raw)
    ]


@pytest.mark.parametrize("payload", [b"", b"ok", b"x" * 1000, b"y" * (codec.JOIN_LIMIT + 1)])
def test_a_request_as_values_reaches_the_provider_as_its_frames_would(payload, monkeypatch):
    routed: list[bytes] = []
    original = Router.request

    def spy(self: Router, conn: Any, request_id: bytes, *rest: Any) -> None:
        routed.append(request_id)
        original(self, conn, request_id, *rest)

    monkeypatch.setattr(Router, "request", spy)
    outcomes = []
    for direct in (True, False):
        clock, router, provider, consumer = setup(direct)
        before = numbers(router)[0]
        consumer.send(payload, timeout=0)
        (request_id,) = consumer._pending
        clock.advance(0)
        assert set(request_ids(provider.raw)) == {request_id}
        assert routed == [request_id] if direct else len(routed) == 1
        routing = consumer._client + consumer._channel
        outcomes.append(
            (without_ids(provider.raw, routing), [after - b for after, b in zip(numbers(router)[0], before)])
        )
    assert outcomes[0] == outcomes[1]
    assert [frame_type for frame_type, _ in outcomes[0][0]] == [codec.START] + [codec.CHUNK] * bool(payload) + [
        codec.END
    ]


@pytest.mark.parametrize(
    "parts", [[], [b"", b""], [b"\xffPB1", b"rec-one", b"rec-two"], [b"h", b"z" * (codec.JOIN_LIMIT + 5)]]
)
def test_a_request_sent_as_parts_is_the_request_of_their_join(parts):
    outcomes = []
    for direct, as_parts in ((True, True), (False, True), (True, False)):
        clock, router, provider, consumer = setup(direct)
        before = numbers(router)
        answer = consumer.send_parts(parts, timeout=0) if as_parts else consumer.send(b"".join(parts), timeout=0)
        clock.advance(0)
        assert not answer.called
        routing = consumer._client + consumer._channel
        after = numbers(router)
        outcomes.append(
            (without_ids(provider.raw, routing), [[a - b for a, b in zip(x, y)] for x, y in zip(after, before)])
        )
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert [p for t, p in outcomes[0][0] if t == codec.CHUNK] == ([b"".join(parts)] if b"".join(parts) else [])


def test_every_counter_is_what_the_frames_would_have_counted():
    results = []
    for direct in (True, False):
        clock, router, provider, consumer = setup(direct)
        for payload in (b"a", b"", b"z" * 5000):
            consumer.send(payload, timeout=0)
        clock.advance(0)
        results.append(numbers(router))
    assert results[0] == results[1]


@pytest.mark.parametrize("trusted", [True, False])
def test_a_too_large_request_ends_as_with_frames(trusted):
    outcomes = []
    for direct in (True, False):
        clock, router, provider, consumer = setup(direct, trusted, max_body=4)
        limit = router.max_message_body if trusted else router.max_body  # the broker's link: message bodies
        answers: list[Any] = []
        consumer.send(b"m" * (limit + 1), timeout=0).addBoth(answers.append)
        for _ in range(4):
            clock.advance(0)
        assert len(answers) == 1 and isinstance(answers[0].value, ServerOverloaded), direct
        assert "too large" in str(answers[0].value) and not router.requests
        outcomes.append((str(answers[0].value), without_ids(provider.raw, consumer._client + consumer._channel)))
    assert outcomes[0] == outcomes[1]
    # The provider had the START (and the part of the body that fitted), then was told the request is over.
    assert [frame_type for frame_type, _ in outcomes[0][1]] == [codec.START] + [codec.CHUNK] * trusted + [codec.ERROR]


def test_a_request_waits_behind_bytes_written_before_it_and_for_a_paused_reader():
    clock, router, provider, consumer = setup(True)
    proto = consumer._protocol
    first = consumer.ping()  # a frame written as bytes: still in the link's buffer
    assert not proto.transport.route_request(b"i" * 16, 0, consumer._client, consumer._channel, (b"p",), 1)
    consumer.send(b"second", timeout=0)
    clock.advance(0)
    assert first.called
    # Its reader paused (flow control): requests are written as frames and wait with the bytes.
    (server_end,) = [peer.transport for peer in router.peers if peer.key and peer.key[0] == codec.ROLE_CONSUMER]
    server_end.pauseProducing()
    assert not proto.transport.route_request(b"j" * 16, 0, consumer._client, consumer._channel, (b"p",), 1)
    consumer.send(b"third", timeout=0)
    clock.advance(0)
    assert [p for t, p in without_ids(provider.raw) if t == codec.CHUNK] == [b"second"]
    server_end.resumeProducing()
    clock.advance(0)
    assert [p for t, p in without_ids(provider.raw) if t == codec.CHUNK] == [b"second", b"third"]


def test_a_request_made_while_the_client_holds_its_writes_goes_after_them(monkeypatch):
    routed: list[Any] = []
    original = Router.request
    monkeypatch.setattr(Router, "request", lambda self, *args: routed.append(args[1]) or original(self, *args))
    clock, router, provider, consumer = setup(True)
    writer = consumer._protocol.writer
    writer.hold()  # as while the client handles a read
    consumer.send(b"first", timeout=0)  # nothing held yet: it may go at once
    pinged = consumer.ping()  # held
    consumer.send(b"after the ping", timeout=0)  # must not overtake it
    writer.release()
    clock.advance(0)
    assert len(routed) == 1 and pinged.called
    assert [p for t, p in without_ids(provider.raw) if t == codec.CHUNK] == [b"first", b"after the ping"]


def test_an_unregistered_end_or_one_without_requests_takes_the_frames_path():
    clock = task.Clock()
    router_side = Raw()
    client_side = Raw()
    ta, tb = connect_in_process(clock, client_side, router_side, InProcessAddress("a"), InProcessAddress("b"))
    assert not ta.route_request(b"i" * 16, 0, b"c" * 16, b"h" * 16, (b"p",), 1)  # Raw has no request()
    factory = ServerFactory(clock)
    consumer = Consumer.connect(InProcessEndpoint(factory, clock), uuid.uuid4(), reactor=clock).result
    end = consumer._protocol.transport
    assert not end.route_request(b"i" * 16, 0, consumer._client, consumer._channel, (b"p",), 1)  # registration waits
    clock.advance(0)
    (conn,) = [peer.conn for peer in factory.router.peers]
    conn.stop_reading()  # refused: nothing more is routed
    assert not end.route_request(b"i" * 16, 0, consumer._client, consumer._channel, (b"p",), 1)


def test_a_flush_gathers_a_few_pieces_one_of_them_large_and_joins_the_rest():
    router = Router(task.Clock())
    joined: list[bytes] = []
    gathered: list[list[bytes]] = []
    peer = router.connect(joined.append, None)  # type: ignore[arg-type]  # no transport needed here
    cases = [
        [b"a" * 100, b"b" * 2048, b"c"],  # gathered
        [b"a" * 100, b"b" * 2047],  # all small: joined
        [b"p"] * 9 + [b"q" * 4096],  # too many pieces: joined
        [b"one" * 1000],  # one piece: as it is
    ]
    for direct in (False, True):
        peer.write_pieces = (lambda pieces: gathered.append(list(pieces))) if direct else None
        for pieces in cases:
            router.reading = peer
            for piece in pieces:
                router.send(peer, piece)
            router.reading = None
            router.flush()
    assert gathered == [cases[0]]
    assert joined == [b"".join(case) for case in cases] + [b"".join(case) for case in cases[1:]]
    assert peer.frames_out == 2 * sum(map(len, cases))


def test_an_error_while_routing_ends_that_link_not_the_caller(monkeypatch):
    clock, router, provider, consumer = setup(True)

    def broken(*args: Any) -> None:
        raise ValueError("bad route")

    monkeypatch.setattr(router, "request", broken)
    failed: list[Any] = []
    consumer.send(b"boom", timeout=0).addErrback(failed.append)  # does not raise here
    for _ in range(3):
        clock.advance(0)
    assert failed and not consumer.connected


@ensure
async def test_the_brokers_forwards_go_as_values_over_real_tcp(monkeypatch):
    """A subscriber over TCP gets every message in order, each forward routed by Router.request."""
    from pulsyflux import BrokerClient

    routed = []
    original = Router.request
    monkeypatch.setattr(Router, "request", lambda self, *args: routed.append(args[1]) or original(self, *args))
    svc = BrokerService("tcp:0:interface=127.0.0.1", reactor=reactor, grace=0)
    svc.startService()
    try:
        await svc.whenReady()
        address = f"127.0.0.1:{svc.server.port.getHost().port}"
        subscriber = await BrokerClient.connect(address, reactor=reactor, heartbeat=None)
        publisher = await BrokerClient.connect(address, reactor=reactor, heartbeat=None)
        try:
            sub = await subscriber.subscribe("orders")
            await gatherResults([publisher.publish("orders", b"%d" % n) for n in range(50)])
            got = [(await sub.get()).payload for _ in range(50)]
            assert got == [b"%d" % n for n in range(50)]
            assert routed  # the forwards (and the probe) went as values
        finally:
            await publisher.close()
            await subscriber.close()
    finally:
        await svc.stopService()


@ensure
async def test_a_provider_over_tcp_answers_an_in_process_consumer():
    """Not only the broker: any in-process Consumer's requests go as values, answers come back as before."""
    factory = ServerFactory(reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    channel = uuid.uuid4()
    provider = await Provider.connect(f"127.0.0.1:{port.getHost().port}", channel, handler=lambda body: body.upper())
    consumer = await Consumer.connect(InProcessEndpoint(factory, reactor), channel, reactor=reactor)
    try:
        assert consumer._route_request is not None
        assert await consumer.send(b"hello", timeout=5) == b"HELLO"
        assert await consumer.send(b"x" * 70000, timeout=5) == b"X" * 70000
        # A body of some kilobytes leaves with its frames' headers in one gather write (Peer.write_pieces).
        gathered: list[int] = []
        (peer,) = [p for p in factory.router.peers if p.key and p.key[0] == codec.ROLE_PROVIDER]
        write_pieces = peer.write_pieces
        assert write_pieces is not None
        peer.write_pieces = lambda pieces: gathered.append(len(pieces)) or write_pieces(pieces)
        body = bytes(range(256)) * 80
        assert await consumer.send_parts([body[:7], body[7:]], timeout=5) == body.upper()
        assert gathered == [5]  # START, the CHUNK's header, the two parts, END
    finally:
        await consumer.close()
        await provider.close()
        await port.stopListening()
        await factory.shutdown(grace=0)


@pytest.mark.parametrize("bad", ["text", bytearray(b"x"), memoryview(b"y"), 7])
@pytest.mark.parametrize("direct", [True, False], ids=["in-process", "frames"])
def test_a_part_that_is_not_bytes_is_refused_before_anything_is_sent(direct, bad):
    """It failed only where the parts were joined: a request left pending forever (frames), or the
    provider's connection ended by the pump's error (in-process). Refused first, nothing is left behind."""
    clock, router, provider, consumer = setup(direct)
    with pytest.raises(TypeError, match="every part must be bytes, not " + type(bad).__name__):
        consumer.send_parts([b"ok", bad], timeout=0)
    clock.advance(0)
    assert consumer.pending == 0 and provider.raw == b"" and provider.transport.connected
    answer = consumer.send_parts((part for part in [b"still", b" works"]), timeout=0)  # any iterable of bytes
    clock.advance(0)
    assert not answer.called and consumer.pending == 1
    assert [p for t, p in without_ids(provider.raw, consumer._client + consumer._channel) if t == codec.CHUNK] == [
        b"still works"
    ]


@ensure
async def test_a_part_that_is_not_bytes_leaves_nothing_pending_over_tcp():
    factory = ServerFactory(reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    channel = uuid.uuid4()
    address = f"127.0.0.1:{port.getHost().port}"
    provider = await Provider.connect(address, channel, handler=lambda body: body.upper())
    consumer = await Consumer.connect(address, channel)
    try:
        with pytest.raises(TypeError, match="every part must be bytes, not str"):
            consumer.send_parts([b"a", "b"], timeout=5)
        assert consumer.pending == 0
        assert await consumer.send_parts([b"a", b"b"], timeout=5) == b"AB"
        assert provider.connected and consumer.pending == 0
    finally:
        await consumer.close()
        await provider.close()
        await port.stopListening()
        await factory.shutdown(grace=0)
