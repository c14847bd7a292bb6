"""The frames the router flushes to an in-process client go to it as they are (``deliver_frames``).

The mirror of tests/test_inproc_requests.py: the broker's forwards are
answered by subscribers over their sockets, and the router hands each
answer's frames to the broker's Consumer (:mod:`pulsyflux.server.inproc`)
as values instead of bytes the client would decode again. What the consumer
is told, in which order, and every counter must be what the frames give;
the bytes path stays wherever bytes already wait before it.
Driven under a ``task.Clock``, then once through a broker over real TCP.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import gatherResults
from twisted.internet.protocol import Factory

from pulsyflux import BrokerService, Consumer
from pulsyflux.client.connection import _ClientProtocol
from pulsyflux.server import ServerFactory
from pulsyflux.server.inproc import InProcessEndpoint
from pulsyflux.wire import codec

from .test_inproc_requests import Raw, numbers
from .wire import register_frames

ensure = pytest_twisted.ensureDeferred


def setup(direct: bool, **limits: Any):
    """A server under a clock, a raw provider and a Consumer on one channel, both in-process."""
    clock = task.Clock()
    factory = ServerFactory(clock, **limits)
    endpoint = InProcessEndpoint(factory, clock)
    channel = uuid.uuid4().bytes
    provider = Raw()
    endpoint.connect(Factory.forProtocol(lambda: provider))
    provider.transport.write(register_frames(codec.ROLE_PROVIDER, uuid.uuid4().bytes, channel))
    consumer = Consumer.connect(endpoint, channel, reactor=clock).result
    clock.advance(0)
    (peer,) = [p for p in factory.router.peers if p.key and p.key[0] == codec.ROLE_CONSUMER]
    assert peer.deliver is not None
    if not direct:
        peer.deliver = None  # as a TCP consumer: bytes
    return clock, factory.router, provider, consumer, peer


@pytest.fixture
def taken(monkeypatch):
    """The frames the client took as values."""
    seen: list[int] = []
    original = _ClientProtocol.frames
    monkeypatch.setattr(
        _ClientProtocol,
        "frames",
        lambda self, frames: seen.extend(frame[1] for frame in frames) or original(self, frames),
    )
    return seen


def answer(provider: Raw, consumer: Consumer, request_id: bytes, payload: bytes) -> None:
    codec.write_response(provider.transport.write, request_id, consumer._client + consumer._channel, payload)


@pytest.mark.parametrize("payload", [b"", b"ok", b"x" * 1000, b"y" * (codec.JOIN_LIMIT + 1)])
def test_an_answer_as_values_is_the_answer_of_its_frames_with_the_same_counters(payload, taken):
    outcomes = []
    for direct in (True, False):
        del taken[:]
        clock, router, provider, consumer, _ = setup(direct)
        before = numbers(router)
        answers: list[Any] = []
        consumer.send(b"q", timeout=0).addBoth(answers.append)
        clock.advance(0)
        (request_id,) = consumer._pending
        answer(provider, consumer, request_id, payload)
        clock.advance(0)
        assert answers == [payload] and not router.requests
        # All as values; past the link's high-water mark (a large body) flow control has the rest go as bytes.
        assert (taken[:1] == [codec.RESPONSE_START]) if direct else not taken
        if direct and len(payload) < 1000:
            assert taken == [codec.RESPONSE_START] + [codec.RESPONSE_CHUNK] * bool(payload) + [codec.RESPONSE_END]
        outcomes.append([[a - b for a, b in zip(x, y)] for x, y in zip(numbers(router), before)])
    assert outcomes[0] == outcomes[1]


def test_a_providers_error_and_a_timeout_reach_the_consumer_as_with_frames():
    outcomes = []
    for direct in (True, False):
        clock, router, provider, consumer, _ = setup(direct)
        told: list[Any] = []
        consumer.send(b"q", timeout=0).addErrback(told.append)
        clock.advance(0)
        (request_id,) = consumer._pending
        routing = consumer._client + consumer._channel
        provider.transport.write(
            codec.encode_frame(codec.ERROR, request_id, codec.error_payload("no such thing", routing))
        )
        consumer.send(b"late", timeout=0.5).addErrback(told.append)
        clock.advance(0)
        clock.advance(1)
        for _ in range(3):
            clock.advance(0)
        assert len(told) == 2 and not router.requests, direct
        outcomes.append(([str(failure.value) for failure in told], numbers(router)))
    assert outcomes[0] == outcomes[1]


def test_values_keep_their_order_with_bytes_queued_before_and_after_them(taken):
    clock, router, provider, consumer, peer = setup(True)
    server_end = peer.transport
    got: list[Any] = []
    for n in range(3):
        consumer.send(b"%d" % n, timeout=0).addBoth(got.append)
    clock.advance(0)
    first, second, third = consumer._pending
    routing = consumer._client + consumer._channel
    frame = codec.encode_frame(codec.RESPONSE, first, routing + b"one")
    assert server_end.deliver_frames([frame], len(frame))  # nothing waits: as values
    server_end.write(codec.encode_frame(codec.ERROR, second, codec.error_payload("two", routing)))
    later = codec.encode_frame(codec.RESPONSE, third, routing + b"three")
    assert not server_end.deliver_frames([later], len(later))  # bytes wait before it: it follows as bytes
    server_end.write(later)
    assert got == []  # nothing inside a write: delivered by the pump
    clock.advance(0)
    assert got[0] == b"one" and "two" in str(got[1].value) and got[2] == b"three"
    assert taken == [codec.RESPONSE]


def test_a_paused_consumer_gets_its_answers_once_it_reads_again(taken):
    clock, router, provider, consumer, peer = setup(True)
    got: list[Any] = []
    for n in range(2):
        consumer.send(b"%d" % n, timeout=0).addBoth(got.append)
    clock.advance(0)
    consumer._protocol.transport.pauseProducing()
    for n, request_id in enumerate(list(consumer._pending)):
        answer(provider, consumer, request_id, b"a%d" % n)
    for _ in range(3):
        clock.advance(0)
    assert got == []
    consumer._protocol.transport.resumeProducing()
    clock.advance(0)
    assert got == [b"a0", b"a1"] and len(taken) == 6


def test_an_error_in_the_consumers_handling_ends_that_link_not_the_providers(monkeypatch, taken):
    clock, router, provider, consumer, peer = setup(True)

    def broken(*args: Any) -> None:
        raise ValueError("bad answer")

    failed: list[Any] = []
    consumer.send(b"q", timeout=0).addErrback(failed.append)
    clock.advance(0)
    (request_id,) = consumer._pending
    monkeypatch.setattr(consumer, "_frame_received", broken)
    answer(provider, consumer, request_id, b"ok")
    for _ in range(4):
        clock.advance(0)
    assert taken and failed and not consumer.connected
    assert provider.transport.connected  # the provider's line is untouched


@ensure
async def test_the_subscribers_answers_reach_the_broker_as_values_over_real_tcp(taken):
    """A subscriber over TCP gets every message in order; its answers reach the broker's Consumer as values."""
    from pulsyflux import BrokerClient

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
            assert codec.RESPONSE_END in taken or codec.RESPONSE in taken
        finally:
            await publisher.close()
            await subscriber.close()
    finally:
        await svc.stopService()
