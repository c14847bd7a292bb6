"""Router behaviour in memory: StringTransport connections and a task.Clock,
so deadlines are tested without waiting."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from pulsyflux.http import server_stats
from pulsyflux.server import Router, ServerFactory
from pulsyflux.wire import codec
from pulsyflux.wire.codec import FrameDecoder

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


def test_the_router_takes_its_limits_in_its_constructor():
    router = Router(
        FakeReactor(),
        max_body=1000,
        max_in_flight=3,
        max_connections=4,
        max_unsent=5000,
        max_unsent_total=6000,
        frame_timeout=7.0,
        register_timeout=8.0,
        max_partial_bytes=9000,
    )
    assert (router.max_body, router.max_in_flight, router.max_connections) == (1000, 3, 4)
    assert (router.flow_control.max_unsent, router.flow_control.max_unsent_total) == (5000, 6000)
    guard = router.connection_guard
    assert (guard.frame_timeout, guard.register_timeout, guard.max_partial_bytes) == (7.0, 8.0, 9000)


def test_draining_refuses_requests_without_touching_the_in_flight_limit():
    clock = FakeReactor()
    factory = ServerFactory(clock, max_in_flight=2)
    router = factory.router
    channel, client_id = os.urandom(16), os.urandom(16)
    provider, _ = connect(factory)
    provider.dataReceived(register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel))
    consumer, consumer_wire = connect(factory)
    factory.shutdown(grace=60)
    assert router.draining and router.max_in_flight == 2  # shutting down is its own state
    consumer.dataReceived(request_frames(os.urandom(16), client_id, channel, b"x"))
    [refused] = frames_written(consumer_wire)
    assert codec.error_message(refused.payload) == "server overloaded: shutting down"
    router.draining = False  # back to the limit it was built with
    for _ in range(3):
        consumer.dataReceived(request_frames(os.urandom(16), client_id, channel, b"x"))
    [overloaded] = frames_written(consumer_wire)
    assert codec.error_message(overloaded.payload).startswith("server overloaded: more than 2 requests in flight")


def test_census_counts_connections_by_role_and_channels_without_naming_them():
    clock = FakeReactor()
    factory = ServerFactory(clock)
    router = factory.router
    served, unserved = os.urandom(16), os.urandom(16)
    provider, _ = connect(factory)
    provider.dataReceived(register_frames(codec.ROLE_PROVIDER, os.urandom(16), served))
    for channel in (served, unserved):
        consumer, _ = connect(factory)
        consumer.dataReceived(register_frames(codec.ROLE_CONSUMER, os.urandom(16), channel))
    consumer.dataReceived(request_frames(os.urandom(16), os.urandom(16), served, b"x"))
    connect(factory)  # says nothing yet
    census = router.census()
    assert census == (4, {"consumer": 2, "provider": 1, "unregistered": 1, "broker": 0, "cluster relay": 0}, 2, 1, 1, 0)
    assert census.by_role == server_stats(factory)["connections"]["by_role"]


def test_fail_all_and_close_all_end_every_request_and_connection():
    clock = FakeReactor()
    factory = ServerFactory(clock)
    router = factory.router
    channel, client_id = os.urandom(16), os.urandom(16)
    provider, provider_wire = connect(factory)
    provider.dataReceived(register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel))
    consumer, consumer_wire = connect(factory)
    request_id = os.urandom(16)
    consumer.dataReceived(request_frames(request_id, client_id, channel, b"x", timeout_ms=1000))
    frames_written(consumer_wire)
    router.fail_all("server overloaded: shutting down")
    [failed] = frames_written(consumer_wire)
    assert (failed.request_id, codec.error_message(failed.payload)) == (request_id, "server overloaded: shutting down")
    assert router.requests == {} and router.census().in_flight == 0 and clock.getDelayedCalls() == []
    gone = router.close_all()
    assert not gone.called  # StringTransport only notes the abort: the connections are not lost yet
    assert provider_wire.disconnecting and consumer_wire.disconnecting
    for conn in (provider, consumer):
        conn.connectionLost(None)
    assert gone.called and router.connections == set()


class _WritesSeeTimers(StringTransport):
    """A transport that notes how many timers the server held when each write reached it."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.timers_at_write: list[int] = []

    def write(self, data: bytes) -> None:
        self.timers_at_write.append(len(self.clock.getDelayedCalls()))
        super().write(data)


def test_a_request_leaves_before_its_deadline_timer_is_made_and_its_response_before_it_is_cancelled():
    # One request at a time, the router schedules and cancels a DelayedCall per request:
    # both happen after the frames of that read have been written (off the round trip).
    clock = FakeReactor()
    factory = ServerFactory(clock)
    channel, client_id, request_id = os.urandom(16), os.urandom(16), os.urandom(16)
    provider = factory.buildProtocol(None)
    provider_wire = _WritesSeeTimers(clock)
    provider.makeConnection(provider_wire)
    provider.dataReceived(register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel))
    consumer = factory.buildProtocol(None)
    consumer_wire = _WritesSeeTimers(clock)
    consumer.makeConnection(consumer_wire)
    consumer.dataReceived(request_frames(request_id, client_id, channel, b"x", timeout_ms=1000))
    assert [f.type for f in frames_written(provider_wire)] == [codec.START, codec.CHUNK, codec.END]
    assert provider_wire.timers_at_write[-1] == 0 and len(clock.getDelayedCalls()) == 1
    routing = client_id + channel
    provider.dataReceived(
        codec.encode_frame(codec.RESPONSE_START, request_id, routing)
        + codec.encode_frame(codec.RESPONSE_END, request_id)
    )
    assert [f.type for f in frames_written(consumer_wire)] == [codec.RESPONSE_START, codec.RESPONSE_END]
    assert consumer_wire.timers_at_write == [1] and clock.getDelayedCalls() == []
    # The deadline still holds while a request is in flight, armed by the same flush.
    consumer.dataReceived(request_frames(os.urandom(16), client_id, channel, b"y", timeout_ms=1000))
    clock.advance(1.001)
    [error] = frames_written(consumer_wire)
    assert codec.error_message(error.payload) == "request timed out" and clock.getDelayedCalls() == []
