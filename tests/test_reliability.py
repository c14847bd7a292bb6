"""Flow control, faults, reconnects and graceful shutdown over real TCP on 127.0.0.1."""

from __future__ import annotations

import os
import uuid

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from pulsyflux import Consumer, Provider, codec
from pulsyflux.codec import FrameDecoder

from .wire import register_frames, request_frames

ensure = pytest_twisted.ensureDeferred

MiB = 1 << 20


def later(seconds: float, value=None) -> Deferred:
    return task.deferLater(reactor, seconds, lambda: value)


async def eventually(condition, timeout: float = 5.0, step: float = 0.01) -> None:
    """Wait (bounded) until ``condition()`` is true; for states no Deferred announces."""
    for _ in range(int(timeout / step)):
        if condition():
            return
        await later(step)
    raise AssertionError(f"condition not met within {timeout} s")


async def registered(server, role: int, channel: uuid.UUID, client_id: uuid.UUID):
    """The server-side connection of a client, once its registration has arrived."""
    key = (role, channel.bytes, client_id.bytes)
    await eventually(lambda: key in server.registry)
    return server.registry[key]


def server_buffered(server) -> int:
    """Bytes the server process holds for its connections: unsent output and partial input frames."""
    total = 0
    for conn in server.factory.router.connections:
        t = conn.transport
        total += len(t.dataBuffer) - t.offset + t._tempDataLen + conn.decoder.buffered
    return total


class Sink(Protocol):
    """A raw consumer that collects one response without keeping the raw stream."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.chunks: list[bytes] = []
        self.types: list[int] = []
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            self.types.append(frame.type)
            if frame.type == codec.RESPONSE_CHUNK:
                self.chunks.append(frame.payload)
            elif frame.type in (codec.RESPONSE_END, codec.ERROR) and not self.done.called:
                self.done.callback(frame.type)


async def connect_sink(server) -> Sink:
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port_number), Sink())


async def other_channel_round_trips(server, count: int = 20) -> float:
    """Seconds taken by ``count`` 64 KiB round trips on a fresh channel."""
    channel = uuid.uuid4()
    provider = await Provider.connect(server.address, channel, handler=lambda data: data)
    consumer = await Consumer.connect(server.address, channel)
    started = reactor.seconds()
    payload = os.urandom(65536)
    for _ in range(count):
        assert await consumer.send(payload, timeout=5) == payload
    elapsed = reactor.seconds() - started
    await consumer.close()
    await provider.close()
    return elapsed


def assert_nothing_held(server) -> None:
    for conn in server.factory.router.connections:
        assert not conn.flow.paused and not conn.flow.held and not conn.flow.blocked_by


@ensure
async def test_consumer_that_stops_reading_pauses_its_provider_only(server, channel):
    body = os.urandom(MiB) * 24
    provider = await Provider.connect(server.address, channel, handler=lambda data: body)
    sink = await connect_sink(server)
    client_id, rid = os.urandom(16), os.urandom(16)
    sink.transport.write(register_frames(codec.ROLE_CONSUMER, client_id, channel.bytes))
    sink.transport.pauseProducing()  # this consumer stops reading
    sink.transport.write(request_frames(rid, client_id, channel.bytes, b"big please", timeout_ms=30000))

    provider_conn = await registered(server, codec.ROLE_PROVIDER, channel, provider.client_id)
    await eventually(lambda: provider_conn.flow.reading_paused)
    peak = server_buffered(server)
    elapsed = await other_channel_round_trips(server)  # another channel is not slowed
    await later(0.2)
    peak = max(peak, server_buffered(server))
    assert provider_conn.flow.reading_paused  # still held: the consumer reads nothing
    assert elapsed < 2.0
    assert peak < 4 * MiB  # the 24 MiB response waits in the provider, not in the server

    sink.transport.resumeProducing()
    assert await sink.done == codec.RESPONSE_END
    assert sink.types[0] == codec.RESPONSE_START
    assert b"".join(sink.chunks) == body  # nothing dropped, nothing reordered
    assert_nothing_held(server)
    sink.transport.loseConnection()
    await provider.close()


@ensure
async def test_provider_that_stops_reading_pauses_the_consumer_feeding_it(server, channel):
    body = os.urandom(MiB) * 24
    provider = await Provider.connect(server.address, channel)
    consumer = await Consumer.connect(server.address, channel)
    provider._protocol.transport.pauseProducing()  # this provider stops reading
    reply = consumer.send(body, timeout=30)

    consumer_conn = await registered(server, codec.ROLE_CONSUMER, channel, consumer.client_id)
    await eventually(lambda: consumer_conn.flow.reading_paused)
    peak = server_buffered(server)
    elapsed = await other_channel_round_trips(server)
    peak = max(peak, server_buffered(server))
    assert elapsed < 2.0
    assert peak < 4 * MiB

    provider._protocol.transport.resumeProducing()
    request = await provider.receive()
    assert request.payload == body
    provider.respond(request, b"got it")
    assert await reply == b"got it"
    assert_nothing_held(server)
    await consumer.close()
    await provider.close()
