"""Request/response behaviours: on the in-memory harness (MemoryServer), and over real TCP where the socket matters."""

from __future__ import annotations

import os
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from pulsyflux import (
    ConnectionLostError,
    Consumer,
    NoProviderError,
    Provider,
    RemoteError,
    RequestTimeout,
)
from pulsyflux.wire import codec

from .helpers import clocked, later
from .wire import connect_raw, register_frames, request_frames

ensure = pytest_twisted.ensureDeferred


@clocked
async def test_round_trip(memory, channel):
    provider = await memory.connect(Provider, channel, handler=lambda data: b"echo:" + data)
    consumer = await memory.connect(Consumer, channel)
    assert await consumer.send(b"hello") == b"echo:hello"
    assert await consumer.send(b"") == b"echo:"
    await consumer.close()
    await provider.close()


@clocked
async def test_pull_style_provider_and_empty_bodies(memory, channel):
    provider = await memory.connect(Provider, channel)
    consumer = await memory.connect(Consumer, channel)
    reply = consumer.send(b"")
    request = await provider.receive()
    assert request.payload == b"" and isinstance(request.id, uuid.UUID)
    provider.respond(request.id)
    assert await reply == b""
    await consumer.close()
    await provider.close()


@clocked
async def test_several_consumers_share_one_provider(memory, channel):
    provider = await memory.connect(Provider, channel, handler=lambda data: data[::-1])
    consumers = [await memory.connect(Consumer, channel) for _ in range(5)]
    replies = await defer.gatherResults([c.send(f"consumer-{i}".encode()) for i, c in enumerate(consumers)])
    assert replies == [f"consumer-{i}".encode()[::-1] for i in range(5)]
    for c in consumers:
        await c.close()
    await provider.close()


@clocked
async def test_no_provider_fails_fast_with_typed_error(memory, channel):
    consumer = await memory.connect(Consumer, channel)
    with pytest.raises(NoProviderError, match="peer disappeared"):
        await consumer.send(b"anyone?", timeout=5.0)
    assert memory.now() == 0  # at once, not when the timeout runs out
    # Exactly one ERROR per failed request: the next send is not confused.
    provider = await memory.connect(Provider, channel, handler=lambda data: b"ok")
    assert await consumer.send(b"now") == b"ok"
    await consumer.close()
    await provider.close()


@ensure
async def test_exactly_one_error_frame_per_request_without_provider(server, channel):
    raw = await connect_raw(server)
    client_id, request_id = os.urandom(16), os.urandom(16)
    raw.send(register_frames(codec.ROLE_CONSUMER, client_id, channel.bytes))
    raw.send(request_frames(request_id, client_id, channel.bytes, b"x" * 3000))
    [error] = await raw.wait_frames(1)
    assert error.type == codec.ERROR and error.request_id == request_id
    assert error.payload == client_id + channel.bytes + b"peer disappeared"
    # A second request's error proves nothing else was queued behind the first.
    second = os.urandom(16)
    raw.send(request_frames(second, client_id, channel.bytes, b""))
    frames = await raw.wait_frames(2)
    assert frames[1].request_id == second
    raw.transport.loseConnection()
    await raw.lost


@ensure
async def test_five_megabytes_both_ways(server, channel):
    provider = await Provider.connect(server.address, channel, handler=lambda data: data[::-1] + b"!")
    consumer = await Consumer.connect(server.address, channel)
    body = os.urandom(5 * 1000 * 1000)
    reply = await consumer.send(body, timeout=30)
    assert reply == body[::-1] + b"!"
    await consumer.close()
    await provider.close()


@clocked
async def test_channels_are_isolated(memory):
    a, b = uuid.uuid4(), uuid.uuid4()
    pa = await memory.connect(Provider, a, handler=lambda data: b"A:" + data)
    pb = await memory.connect(Provider, b, handler=lambda data: b"B:" + data)
    ca = await memory.connect(Consumer, a)
    cb = await memory.connect(Consumer, b)
    results = await defer.gatherResults([ca.send(b"1"), cb.send(b"2"), ca.send(b"3"), cb.send(b"4")])
    assert results == [b"A:1", b"B:2", b"A:3", b"B:4"]
    for client in (ca, cb, pa, pb):
        await client.close()


@clocked
async def test_consumer_timeout_while_provider_is_slow(memory, channel):
    provider = await memory.connect(Provider, channel, handler=lambda data: later(1.0, b"too late", memory.clock))
    consumer = await memory.connect(Consumer, channel)
    with pytest.raises(RequestTimeout):
        await consumer.send(b"slow", timeout=0.2)
    assert memory.now() == 0.2
    # The late answer is dropped by the server; the connection stays usable.
    fast = await memory.connect(Provider, channel, handler=lambda data: b"fast")
    replies = set()
    for _ in range(4):  # round-robin reaches the fast provider
        try:
            replies.add(await consumer.send(b"again", timeout=2.0))
        except RequestTimeout:
            replies.add("timeout")
    assert b"fast" in replies
    for client in (consumer, provider, fast):
        await client.close()


@ensure
async def test_server_enforces_request_timeout_for_clients_without_one(server, channel):
    provider = await Provider.connect(server.address, channel)  # never answers
    raw = await connect_raw(server)
    client_id, request_id = os.urandom(16), os.urandom(16)
    raw.send(request_frames(request_id, client_id, channel.bytes, b"hi", timeout_ms=100))
    [error] = await raw.wait_frames(1)
    assert codec.error_message(error.payload) == "request timed out"
    assert error.payload[:32] == client_id + channel.bytes
    # The provider's late answer is dropped, not forwarded to a caller who gave up.
    request = await provider.receive()
    provider.respond(request.id, b"late")
    sentinel = os.urandom(16)
    raw.send(request_frames(sentinel, client_id, uuid.uuid4().bytes, b""))
    frames = await raw.wait_frames(2)
    assert frames[1].request_id == sentinel  # nothing of the late response came first
    raw.transport.loseConnection()
    await raw.lost
    await provider.close()


@clocked
async def test_hundred_consumers_twenty_in_flight_each(memory, channel):
    providers = [await memory.connect(Provider, channel, handler=lambda data: b"re:" + data) for _ in range(3)]
    consumers = [await memory.connect(Consumer, channel) for _ in range(100)]
    sends = []
    expected = []
    for i, consumer in enumerate(consumers):
        for j in range(20):
            body = f"{i}/{j}/{consumer.client_id}".encode()
            sends.append(consumer.send(body, timeout=30))
            expected.append(b"re:" + body)
    assert await defer.gatherResults(sends) == expected
    for client in consumers + providers:
        await client.close()


@clocked
async def test_responses_out_of_order_on_one_connection(memory, channel):
    provider = await memory.connect(Provider, channel)
    consumer = await memory.connect(Consumer, channel)
    sends = [consumer.send(str(i).encode()) for i in range(10)]
    requests = [await provider.receive() for _ in range(10)]
    for request in reversed(requests):
        provider.respond(request.id, b"r" + request.payload)
    assert await defer.gatherResults(sends) == [b"r" + str(i).encode() for i in range(10)]
    await consumer.close()
    await provider.close()


@clocked
async def test_provider_error_reaches_consumer_with_its_message(memory, channel):
    def handler(data):
        raise ValueError("no such order: " + data.decode())

    provider = await memory.connect(Provider, channel, handler=handler)
    consumer = await memory.connect(Consumer, channel)
    with pytest.raises(RemoteError) as info:
        await consumer.send(b"42")
    assert info.value.message == "no such order: 42"
    await consumer.close()
    await provider.close()


@clocked
async def test_async_handlers(memory, channel):
    async def handler(data):
        await later(0.01, clock=memory.clock)
        return b"async:" + data

    provider = await memory.connect(Provider, channel, handler=handler)
    consumer = await memory.connect(Consumer, channel)
    assert await consumer.send(b"x") == b"async:x"
    await consumer.close()
    await provider.close()


@clocked
async def test_round_robin_keeps_each_request_on_one_provider(memory, channel):
    seen = {0: [], 1: []}

    def handler_for(n):
        def handler(data):
            seen[n].append(data)
            return b"%d" % n

        return handler

    providers = [await memory.connect(Provider, channel, handler=handler_for(n)) for n in range(2)]
    consumer = await memory.connect(Consumer, channel)
    big = os.urandom(3 * 1024 * 1024)  # three CHUNK frames: all must reach one provider
    replies = await defer.gatherResults([consumer.send(big, timeout=30) for _ in range(4)])
    assert sorted(replies) == [b"0", b"0", b"1", b"1"]
    assert all(data == big for datas in seen.values() for data in datas)
    for client in [consumer, *providers]:
        await client.close()


@clocked
async def test_registry_is_cleaned_on_disconnect(memory, channel):
    server = memory
    provider = await memory.connect(Provider, channel, handler=lambda data: data)
    consumer = await memory.connect(Consumer, channel)
    assert await consumer.send(b"x") == b"x"  # both registered by now
    roles = sorted(role for role, _, _ in server.registry)
    assert roles == [codec.ROLE_CONSUMER, codec.ROLE_PROVIDER]
    gone = server.all_closed()
    await provider.close()
    await consumer.close()
    await gone
    assert server.registry == {}
    assert server.factory.router.providers == {}
    assert server.factory.router.requests == {}


@clocked
async def test_provider_dying_mid_request_fails_the_consumer_promptly(memory, channel):
    provider = await memory.connect(Provider, channel)
    consumer = await memory.connect(Consumer, channel)
    reply = consumer.send(b"work", timeout=10)
    await provider.receive()
    started = memory.now()
    await provider.close(timeout=0)  # dying: no drain (close() would let it answer first)
    with pytest.raises(NoProviderError):
        await reply
    assert memory.now() == started  # not when the timeout runs out
    await consumer.close()


@clocked
async def test_consumer_dying_mid_request_frees_the_request(memory, channel):
    server = memory
    provider = await memory.connect(Provider, channel)
    consumer = await memory.connect(Consumer, channel)
    reply = consumer.send(b"work", timeout=10)
    request = await provider.receive()
    gone = server.all_closed()
    await consumer.close()
    with pytest.raises(ConnectionLostError):
        await reply
    await provider.close()
    await gone
    assert server.factory.router.requests == {}
    assert request.payload == b"work"


@clocked
async def test_close_fails_pending_sends_and_later_sends(memory, channel):
    provider = await memory.connect(Provider, channel)
    consumer = await memory.connect(Consumer, channel)
    pending = consumer.send(b"never answered")
    await provider.receive()
    await consumer.close()
    with pytest.raises(ConnectionLostError):
        await pending
    with pytest.raises(ConnectionLostError):
        await consumer.send(b"after close")
    await provider.close()


@ensure
async def test_garbage_client_does_not_disturb_others(server, channel):
    provider = await Provider.connect(server.address, channel, handler=lambda data: b"fine:" + data)
    consumer = await Consumer.connect(server.address, channel)
    bad = await connect_raw(server)
    bad.send(b"\x07" + os.urandom(200))  # wrong version: that connection alone is closed
    await bad.lost
    assert await consumer.send(b"still") == b"fine:still"
    await consumer.close()
    await provider.close()


@ensure
async def test_malformed_start_and_unknown_type_get_errors_and_connection_stays(server, channel):
    provider = await Provider.connect(server.address, channel, handler=lambda data: b"ok")
    raw = await connect_raw(server)
    rid1, rid2, rid3 = os.urandom(16), os.urandom(16), os.urandom(16)
    raw.send(codec.encode_frame(codec.START, rid1, b"short"))
    raw.send(codec.encode_frame(codec.START, rid2, codec.pack_metadata(7, 1000, os.urandom(16), channel.bytes)))
    raw.send(codec.encode_frame(0x42, rid3, b""))
    client_id, rid4 = os.urandom(16), os.urandom(16)
    raw.send(request_frames(rid4, client_id, channel.bytes, b"x"))
    frames = await raw.wait_frames(6)
    messages = [codec.error_message(f.payload) for f in frames[:3]]
    assert messages == ["invalid start frame payload length", "invalid client role", "invalid message type"]
    assert [f.request_id for f in frames[:3]] == [rid1, rid2, rid3]
    assert all(len(f.payload) >= 32 for f in frames[:3])  # Go clients read our errors whole
    assert [f.type for f in frames[3:]] == [codec.RESPONSE_START, codec.RESPONSE_CHUNK, codec.RESPONSE_END]
    assert frames[4].payload == b"ok"
    raw.transport.loseConnection()
    await raw.lost
    await provider.close()


@ensure
async def test_oversized_length_closes_only_that_connection(server, channel):
    provider = await Provider.connect(server.address, channel, handler=lambda data: b"ok")
    consumer = await Consumer.connect(server.address, channel)
    raw = await connect_raw(server)
    raw.send(codec.HEADER.pack(1, codec.CHUNK, 0, bytes(16), (1 << 20) + 1))
    await raw.lost
    assert any("exceeds" in codec.error_message(f.payload) for f in raw.frames)
    assert await consumer.send(b"x") == b"ok"
    await consumer.close()
    await provider.close()


@ensure
async def test_forged_response_never_reaches_another_consumer(server, channel):
    """A second provider on the channel cannot answer a request routed elsewhere."""
    honest = await Provider.connect(server.address, channel)
    consumer = await Consumer.connect(server.address, channel)
    reply = consumer.send(b"secret", timeout=5)
    request = await honest.receive()
    forger = await connect_raw(server)
    forger.send(register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel.bytes))
    routing = consumer.client_id.bytes + channel.bytes
    rid = request.id.bytes
    forger.send(
        codec.encode_frame(codec.RESPONSE_START, rid, routing),
        codec.encode_frame(codec.RESPONSE_CHUNK, rid, b"forged"),
        codec.encode_frame(codec.RESPONSE_END, rid),
    )
    forger.send(codec.encode_frame(0x42, rid))  # a frame the server answers: a marker
    [marker] = await forger.wait_frames(1)  # so the forged frames were handled before it
    assert codec.error_message(marker.payload) == "invalid message type"
    assert server.factory.stats.frames_dropped == 3
    honest.respond(request.id, b"genuine")
    assert await reply == b"genuine"
    forger.transport.loseConnection()
    await forger.lost
    await consumer.close()
    await honest.close()


@ensure
async def test_go_client_frames_are_forwarded_byte_for_byte(server, channel):
    """Raw frames as a Go consumer and provider write them, checked on the wire."""
    consumer_id, provider_id, rid = os.urandom(16), os.urandom(16), os.urandom(16)
    go_provider = await connect_raw(server)
    go_provider.send(register_frames(codec.ROLE_PROVIDER, provider_id, channel.bytes))
    go_consumer = await connect_raw(server)
    go_consumer.send(register_frames(codec.ROLE_CONSUMER, consumer_id, channel.bytes))
    chunk = codec.encode_frame(codec.CHUNK, rid, b"hello")
    end = codec.encode_frame(codec.END, rid)
    go_consumer.send(request_frames(rid, consumer_id, channel.bytes, b"hello"))
    frames = await go_provider.wait_frames(3)
    routing = consumer_id + channel.bytes
    assert go_provider.raw == codec.encode_frame(codec.START, rid, routing) + chunk + end
    response = (
        codec.encode_frame(codec.RESPONSE_START, rid, routing)
        + codec.encode_frame(codec.RESPONSE_CHUNK, rid, b"echo:hello")
        + codec.encode_frame(codec.RESPONSE_END, rid)
    )
    go_provider.send(response)
    await go_consumer.wait_frames(3)
    assert go_consumer.raw == response
    assert frames[0].payload == routing
    for raw in (go_provider, go_consumer):
        raw.transport.loseConnection()
        await raw.lost


@ensure
async def test_address_forms(server, channel):
    provider = await Provider.connect(f"tcp:host=127.0.0.1:port={server.port}", channel, handler=lambda d: d)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    consumer = await Consumer.connect(endpoint, str(channel))
    assert await consumer.send(b"forms") == b"forms"
    await consumer.close()
    await provider.close()


@ensure
async def test_unix_socket_server(tmp_path, channel):
    from pulsyflux import ServerFactory

    path = str(tmp_path / "pf.sock")
    factory = ServerFactory()
    port = reactor.listenUNIX(path, factory)
    provider = await Provider.connect(f"unix:path={path}", channel, handler=lambda d: b"unix:" + d)
    consumer = await Consumer.connect(f"unix:path={path}", channel)
    assert await consumer.send(b"x") == b"unix:x"
    await consumer.close()
    await provider.close()
    await port.stopListening()


@ensure
async def test_connect_to_nothing_fails_cleanly(channel):
    from twisted.internet.error import ConnectionRefusedError

    with pytest.raises(ConnectionRefusedError):
        await Consumer.connect("127.0.0.1:1", channel)


@ensure
async def test_server_sets_keepalive_and_nodelay_so_idle_connections_live(server, channel):
    import socket

    consumer = await Consumer.connect(server.address, channel)
    provider = await Provider.connect(server.address, channel, handler=lambda data: data)
    assert await consumer.send(b"x") == b"x"
    for conn in server.factory.router.connections:
        sock = conn.transport.getHandle()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    await consumer.close()
    await provider.close()


@clocked
async def test_provider_connects_even_if_the_server_never_answers_its_probe(memory, channel):
    """A server that ignores unknown frame types still lets connect() finish."""
    from twisted.internet.protocol import Factory, Protocol

    from pulsyflux.server.inproc import InProcessEndpoint

    class Silent(Protocol):
        def dataReceived(self, data):
            self.factory.received.append(data)

    factory = Factory.forProtocol(Silent)
    factory.received = []

    class Patient(Provider):
        registration_wait = 0.2

    silent = InProcessEndpoint(factory, memory.clock, trusted=False, label="silent")
    provider = await Patient.connect(silent, channel, reactor=memory.clock)
    assert memory.now() == 0.2  # it waited registration_wait for the probe's answer, no longer
    frames = list(codec.FrameDecoder().feed(b"".join(factory.received)))
    assert [f.type for f in frames] == [codec.START, codec.END, codec.PROBE]
    assert frames[0].flags == codec.FLAG_REGISTRATION
    await provider.close()


@clocked
async def test_request_ids_cannot_be_guessed_from_earlier_ones(memory, channel):
    """Providers see a consumer's request ids; they must not predict the next ones."""
    provider = await memory.connect(Provider, channel)  # pulls requests: it sees their ids
    consumer = await memory.connect(Consumer, channel)
    seen = []
    for _ in range(50):
        answer = consumer.send(b"x")
        request = await provider.receive()
        seen.append(request.id.bytes)
        provider.respond(request.id, request.payload)
        assert await answer == b"x"
    assert len(set(seen)) == 50
    assert len({rid[:8] for rid in seen}) == 50  # no shared prefix, no counter
    assert len({rid[8:] for rid in seen}) == 50
    await consumer.close()
    await provider.close()


@clocked
async def test_cancelled_send_forgets_the_request_and_ignores_its_answer(memory, channel):
    provider = await memory.connect(Provider, channel)
    consumer = await memory.connect(Consumer, channel)
    others = [consumer.send(b"keep %d" % i) for i in range(3)]
    doomed = consumer.send(b"cancel me")
    requests = [await provider.receive() for _ in range(4)]
    doomed.cancel()
    with pytest.raises(defer.CancelledError):
        await doomed
    assert consumer.pending == 3  # only the cancelled one is forgotten
    for request in requests:
        provider.respond(request.id, b"re:" + request.payload)  # its late answer is ignored
    assert await defer.gatherResults(others) == [b"re:keep 0", b"re:keep 1", b"re:keep 2"]
    assert consumer.pending == 0
    await consumer.close()
    await provider.close()
