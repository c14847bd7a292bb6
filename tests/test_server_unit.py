"""Router behaviour in memory: StringTransport connections and a task.Clock,
so deadlines are tested without waiting."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from pulsyflux import codec
from pulsyflux.codec import FrameDecoder
from pulsyflux.server import ServerFactory

from .wire import register_frames, request_frames


class FakeReactor(Clock):
    """A Clock is all the server needs from its reactor."""


def connect(factory: ServerFactory):
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def frames_written(transport: StringTransport) -> list[codec.Frame]:
    frames = list(FrameDecoder().feed(transport.value()))
    transport.clear()
    return frames


def test_deadline_uses_the_reactor_clock_and_holds_until_the_response_ends():
    clock = FakeReactor()
    factory = ServerFactory(clock)
    channel, client_id = os.urandom(16), os.urandom(16)
    provider, provider_wire = connect(factory)
    provider.dataReceived(register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel))
    consumer, consumer_wire = connect(factory)

    slow, answered = os.urandom(16), os.urandom(16)
    consumer.dataReceived(request_frames(slow, client_id, channel, b"a", timeout_ms=1000))
    consumer.dataReceived(request_frames(answered, client_id, channel, b"b", timeout_ms=1000))
    routing = client_id + channel
    provider.dataReceived(codec.encode_frame(codec.RESPONSE_START, slow, routing))  # begun, never ended
    provider.dataReceived(
        codec.encode_frame(codec.RESPONSE_START, answered, routing) + codec.encode_frame(codec.RESPONSE_END, answered)
    )
    clock.advance(0.999)
    assert [f.type for f in frames_written(consumer_wire)] == [codec.RESPONSE_START] * 2 + [codec.RESPONSE_END]
    frames_written(provider_wire)
    clock.advance(0.002)
    [error] = frames_written(consumer_wire)
    assert error.request_id == slow and codec.error_message(error.payload) == "request timed out"
    [told] = frames_written(provider_wire)  # the provider is told to stop
    assert told.request_id == slow and told.payload == routing + b"request timed out"
    # The expired one's late frames are dropped.
    provider.dataReceived(
        codec.encode_frame(codec.RESPONSE_CHUNK, slow, b"late") + codec.encode_frame(codec.RESPONSE_END, slow)
    )
    assert frames_written(consumer_wire) == []
    assert factory.router.requests == {} and clock.getDelayedCalls() == []


def test_frames_split_anywhere_and_batched_are_routed_the_same():
    clock = FakeReactor()
    factory = ServerFactory(clock)
    channel, client_id = os.urandom(16), os.urandom(16)
    provider, provider_wire = connect(factory)
    provider.dataReceived(register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel))
    consumer, _ = connect(factory)

    def requests(client: bytes) -> bytes:
        return b"".join(request_frames(os.urandom(16), client, channel, b"x" * n) for n in (0, 1, 70, 5000))

    stream = requests(client_id)
    for byte in range(len(stream)):
        consumer.dataReceived(stream[byte : byte + 1])
    one_by_one = frames_written(provider_wire)
    assert len(one_by_one) == 2 + 3 + 3 + 3  # START+END, then START+CHUNK+END three times
    assert all(f.type != codec.START or len(f.payload) == 32 for f in one_by_one)
    consumer2, _ = connect(factory)
    consumer2.dataReceived(requests(os.urandom(16)))  # the same requests again, all in one slice
    in_one = frames_written(provider_wire)
    assert [(f.type, len(f.payload)) for f in in_one] == [(f.type, len(f.payload)) for f in one_by_one]


def test_no_timeout_when_metadata_says_zero():
    clock = FakeReactor()
    factory = ServerFactory(clock)
    channel = os.urandom(16)
    provider, _ = connect(factory)
    provider.dataReceived(register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel))
    consumer, _ = connect(factory)
    consumer.dataReceived(request_frames(os.urandom(16), os.urandom(16), channel, b"", timeout_ms=0))
    assert clock.getDelayedCalls() == [] and len(factory.router.requests) == 1
    provider.connectionLost(None)
    assert factory.router.requests == {}
