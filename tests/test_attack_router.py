"""Attacks on the router's request lifecycle (issue #8, items 1, 3, 4, 5, 18), over real TCP.

Each test names the attack it stops: an error too big for a frame, partial
bodies a provider keeps forever, a response that starts and never ends,
error texts that bloat the stats, a refused response whose rest still flows.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from pulsyflux import Broker, Consumer, Provider, RemoteError, RequestTimeout, ServerOverloaded
from pulsyflux.testing import start_server
from pulsyflux.wire import codec, messages
from pulsyflux.wire.errors import ProtocolError

from .helpers import eventually
from .wire import RawClient, connect_raw, register_frames, request_frames

ensure = pytest_twisted.ensureDeferred

KiB = 1 << 10
MiB = 1 << 20
WAIT = 5.0  # seconds any awaited frame may take before the test fails (instead of hanging)


def bounded(d: Deferred) -> Deferred:
    return d.addTimeout(WAIT, reactor)


def frame(ftype: int, request_id: bytes, payload: bytes = b"") -> bytes:
    return codec.encode_frame(ftype, request_id, payload)


def start_frame(request_id: bytes, client_id: bytes, channel: uuid.UUID, timeout_ms: int = 0) -> bytes:
    """A request's START; timeout 0: no deadline, only what the test does ends it."""
    return frame(
        codec.START, request_id, codec.pack_metadata(codec.ROLE_CONSUMER, timeout_ms, client_id, channel.bytes)
    )


def whole_answer(request_id: bytes, routing: bytes) -> bytes:
    return (
        frame(codec.RESPONSE_START, request_id, routing)
        + frame(codec.RESPONSE_CHUNK, request_id, b"done")
        + frame(codec.RESPONSE_END, request_id)
    )


class RawProvider(RawClient):
    """A provider speaking frames by hand: answers each request with ``answer(request id, routing)``."""

    def __init__(self) -> None:
        super().__init__()
        self.routing: dict[bytes, bytes] = {}
        self.answer = whole_answer

    def dataReceived(self, data: bytes) -> None:
        seen = len(self.frames)
        super().dataReceived(data)
        for received in self.frames[seen:]:
            if received.type == codec.START:
                self.routing[received.request_id] = received.payload
            elif received.type == codec.END and received.request_id in self.routing:
                self.send(self.answer(received.request_id, self.routing.pop(received.request_id)))

    def errors(self) -> list[tuple[bytes, str]]:
        return [(f.request_id, codec.error_message(f.payload)) for f in self.frames if f.type == codec.ERROR]


async def raw_provider(server, channel: uuid.UUID) -> RawProvider:
    """A registered RawProvider: the probe's answer says the server has its registration."""
    port = server.port
    provider = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawProvider())
    registration = os.urandom(16)
    provider.send(
        register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel.bytes, registration),
        frame(codec.PROBE, registration),
    )
    await bounded(provider.wait_frames(1))
    return provider


# -- 1. an error of any size never costs a provider its connection ---------------------


@ensure
async def test_attack_huge_handler_error_does_not_cost_the_provider_its_connection(server, channel):
    def handler(data: bytes) -> bytes:
        if data == b"boom":
            raise ValueError("é" + "x" * (2 * MiB))  # over the 1 MiB frame limit, as one text
        return b"re:" + data

    provider = await Provider.connect(server.address, channel, handler=handler)
    consumer = await Consumer.connect(server.address, channel)
    with pytest.raises(RemoteError) as info:
        await consumer.send(b"boom")
    text = info.value.message
    assert len(text.encode("utf-8")) <= codec.MAX_ERROR_TEXT
    assert text.startswith("éxxx") and text.endswith(f"... [truncated, {2 * MiB + 2} bytes]")
    # The provider kept its connection, and answers the next request.
    assert await consumer.send(b"next") == b"re:next"
    assert provider.connected and server.factory.stats.protocol_errors == 0
    await consumer.close()
    await provider.close()


@ensure
async def test_attack_reserved_topic_with_a_huge_text_does_not_end_pub_sub(server):
    broker = await Broker.connect(server.address, uuid.uuid4())  # as the built-in broker runs
    sub = await broker.subscribe("t")
    publisher = await Consumer.connect(server.address, broker.channel)
    with pytest.raises(RemoteError):  # the broker's refusal repeats the topic: over 1 MiB of text
        await publisher.send(messages.encode("$pulsyflux/" + "x" * (MiB + 100 * KiB)), timeout=10)
    await broker.publish("t", b"still here")  # its Provider kept its connection
    assert (await bounded(sub.get())).payload == b"still here"
    assert server.factory.stats.protocol_errors == 0
    await publisher.close()
    await broker.close()


def test_attack_error_texts_are_cut_on_a_character_and_marked():
    text = codec.bound_error_text("€" * 3000)  # 9,000 bytes of 3-byte characters
    assert len(text) <= codec.MAX_ERROR_TEXT
    assert text.decode("utf-8").endswith("€... [truncated, 9000 bytes]")  # no half character
    assert codec.bound_error_text("short") == b"short"
    assert codec.error_payload("y" * MiB, bytes(32))[32:] == codec.bound_error_text("y" * MiB)


# -- 3. a provider is told when a request is abandoned, and frees it ------------------


@ensure
async def test_attack_consumer_leaving_mid_body_frees_the_providers_partial_body(server, channel):
    provider = await Provider.connect(server.address, channel)
    consumer = await connect_raw(server)
    request_id = os.urandom(16)
    consumer.send(start_frame(request_id, os.urandom(16), channel), frame(codec.CHUNK, request_id, b"p" * 64 * KiB))
    await eventually(lambda: provider.incomplete_bytes == 64 * KiB)
    consumer.transport.loseConnection()  # the END never comes
    await consumer.lost
    await eventually(lambda: provider.incomplete_bytes == 0)
    assert provider.incomplete == 0 and provider.incomplete_dropped == 0  # told, not its backstop
    await provider.close()


@ensure
async def test_attack_body_slower_than_its_deadline_is_freed_by_the_provider(server, channel):
    provider = await Provider.connect(server.address, channel)
    consumer = await connect_raw(server)
    request_id = os.urandom(16)
    consumer.send(
        start_frame(request_id, os.urandom(16), channel, timeout_ms=20),
        frame(codec.CHUNK, request_id, b"p" * 64 * KiB),
    )  # and its END never in time
    [error] = await bounded(consumer.wait_frames(1))
    assert codec.error_message(error.payload) == "request timed out"
    await eventually(lambda: provider.incomplete_bytes == 0)
    consumer.transport.loseConnection()
    await consumer.lost
    await provider.close()


@ensure
async def test_attack_abandoned_request_is_not_answered_into_the_void(server, channel):
    provider = await Provider.connect(server.address, channel)
    leaver = await connect_raw(server)
    gone = os.urandom(16)
    leaver.send(request_frames(gone, os.urandom(16), channel.bytes, b"first", timeout_ms=0))
    abandoned = await bounded(provider.receive())
    leaver.transport.loseConnection()
    await leaver.lost
    await eventually(lambda: server.factory.router.requests == {})  # the server saw it go
    # The server tells the provider before it routes the next request to it.
    consumer = await Consumer.connect(server.address, channel)
    reply = consumer.send(b"second")
    request = await bounded(provider.receive())
    provider.respond(abandoned, b"late")  # a no-op, not a KeyError, and nothing is sent
    provider.respond(request, b"answer")
    assert await reply == b"answer"
    assert server.factory.stats.frames_dropped == 0  # no late frame reached the server
    await consumer.close()
    await provider.close()


@ensure
async def test_attack_incomplete_requests_past_the_providers_byte_limit_are_refused(server, channel):
    provider = await Provider.connect(server.address, channel, max_incomplete=100 * KiB)
    consumer = await connect_raw(server)
    client_id, kept, refused = os.urandom(16), os.urandom(16), os.urandom(16)
    consumer.send(start_frame(kept, client_id, channel), frame(codec.CHUNK, kept, b"k" * 64 * KiB))
    await eventually(lambda: provider.incomplete_bytes == 64 * KiB)
    consumer.send(start_frame(refused, client_id, channel), frame(codec.CHUNK, refused, b"r" * 64 * KiB))
    [error] = await bounded(consumer.wait_frames(1))
    assert error.request_id == refused
    assert codec.error_message(error.payload).startswith("request too large")
    assert (provider.incomplete_bytes, provider.incomplete_dropped) == (64 * KiB, 1)
    consumer.send(frame(codec.END, kept))
    request = await bounded(provider.receive())
    assert request.payload == b"k" * 64 * KiB and provider.incomplete_bytes == 0
    consumer.transport.loseConnection()
    await consumer.lost
    await provider.close()


@ensure
async def test_attack_stalled_incomplete_request_is_dropped_by_the_provider_after_its_timeout(server, channel):
    provider = await Provider.connect(server.address, channel, incomplete_timeout=0.1)
    consumer = await connect_raw(server)
    request_id = os.urandom(16)
    consumer.send(start_frame(request_id, os.urandom(16), channel), frame(codec.CHUNK, request_id, b"s" * KiB))
    [error] = await bounded(consumer.wait_frames(1))  # no server deadline: the provider's backstop answers
    assert (error.request_id, codec.error_message(error.payload)) == (request_id, "request timed out")
    assert (provider.incomplete_bytes, provider.incomplete_dropped) == (0, 1)
    assert provider._sweeper is None  # nothing incomplete: no timer
    consumer.transport.loseConnection()
    await consumer.lost
    await provider.close()


# -- 4. the deadline holds until the response is complete ---------------------------------


@ensure
async def test_attack_response_that_starts_and_never_ends_does_not_poison_the_consumer(limited, channel):  # noqa: F811
    server = limited(max_in_flight=2)
    provider = await raw_provider(server, channel)
    provider.answer = lambda request_id, routing: frame(codec.RESPONSE_START, request_id, routing)  # and no more
    consumer = await Consumer.connect(server.address, channel)
    for outcome in await gatherResults(
        [consumer.send(b"hang", timeout=0.1).addErrback(lambda failure: failure.value) for _ in range(2)]
    ):
        assert isinstance(outcome, RequestTimeout)
    # The provider is told each request is over, so it stops sending.
    await eventually(lambda: [m for _, m in provider.errors()].count("request timed out") == 2)
    assert server.factory.router.requests == {}
    provider.answer = whole_answer  # from now on it answers whole responses
    for _ in range(3):  # max_in_flight + 1, one after another: none refused
        assert await consumer.send(b"ok") == b"done"
    await consumer.close()
    provider.transport.loseConnection()
    await provider.lost


@ensure
async def test_attack_response_expiring_mid_body_fails_and_drops_the_late_frames(server, channel):
    provider = await raw_provider(server, channel)
    provider.answer = lambda request_id, routing: (
        frame(codec.RESPONSE_START, request_id, routing) + frame(codec.RESPONSE_CHUNK, request_id, b"partial")
    )
    consumer = await connect_raw(server)
    request_id, client_id = os.urandom(16), os.urandom(16)
    consumer.send(request_frames(request_id, client_id, channel.bytes, b"x", timeout_ms=50))
    frames = await bounded(consumer.wait_frames(3))
    assert [f.type for f in frames] == [codec.RESPONSE_START, codec.RESPONSE_CHUNK, codec.ERROR]
    assert codec.error_message(frames[2].payload) == "request timed out"
    await eventually(lambda: provider.errors() and provider.errors()[-1] == (request_id, "request timed out"))
    marker = os.urandom(16)
    provider.send(
        frame(codec.RESPONSE_CHUNK, request_id, b"late"),
        frame(codec.RESPONSE_END, request_id),
        frame(0x42, marker),  # answered once the late frames are routed (or dropped)
    )
    await eventually(lambda: provider.errors()[-1][0] == marker)
    sentinel = os.urandom(16)
    consumer.send(frame(0x42, sentinel))  # answered after anything already sent to the consumer
    frames = await bounded(consumer.wait_frames(4))
    assert frames[3].request_id == sentinel
    assert server.factory.stats.frames_dropped == 2
    consumer.transport.loseConnection()
    provider.transport.loseConnection()
    await consumer.lost
    await provider.lost


# -- 18. a refused response start stops the whole response ------------------------------


@ensure
async def test_attack_refused_response_start_stops_the_rest_of_the_response(server, channel):
    provider = await raw_provider(server, channel)
    forged = os.urandom(32)
    provider.answer = lambda request_id, routing: (
        frame(codec.RESPONSE_START, request_id, forged)
        + frame(codec.RESPONSE_CHUNK, request_id, b"forged")
        + frame(codec.RESPONSE_END, request_id)
    )
    consumer = await Consumer.connect(server.address, channel)
    with pytest.raises(ProtocolError, match="^bad response: the provider's routing does not match the request$"):
        await consumer.send(b"x")
    await eventually(lambda: len(provider.errors()) == 2)  # the probe's answer, then this
    assert provider.errors()[1][1] == "bad response: the provider's routing does not match the request"
    assert server.factory.stats.frames_dropped == 3 and server.factory.router.requests == {}
    provider.answer = whole_answer
    assert await consumer.send(b"y") == b"done"  # both sides go on
    await consumer.close()
    provider.transport.loseConnection()
    await provider.lost


@ensure
async def test_attack_response_chunk_without_a_start_fails_the_request(server, channel):
    provider = await raw_provider(server, channel)
    provider.answer = lambda request_id, routing: (
        frame(codec.RESPONSE_CHUNK, request_id, b"headless") + frame(codec.RESPONSE_END, request_id)
    )
    consumer = await Consumer.connect(server.address, channel)
    with pytest.raises(ProtocolError, match="^bad response: a response chunk came before its start$"):
        await consumer.send(b"x")
    await consumer.close()
    provider.transport.loseConnection()
    await provider.lost


# -- 5. error texts do not bloat the stats --------------------------------------------------


@pytest.fixture
def served():
    running = pytest_twisted.blockon(start_server(http=True, broker=False))
    yield running
    pytest_twisted.blockon(running.stop())


@ensure
async def test_attack_unique_large_provider_errors_do_not_bloat_stats(served, channel):
    secret = str(uuid.uuid4())  # a private channel id a provider might put in its text
    provider = await raw_provider(served, channel)
    provider.answer = lambda request_id, routing: frame(
        codec.ERROR, request_id, routing + f"{request_id.hex()} {secret} \x1b[2J".encode() + b"e" * 16 * KiB
    )
    consumer = await Consumer.connect(served.address, channel)
    outcomes = await gatherResults([consumer.send(b"x").addErrback(lambda failure: failure.value) for _ in range(300)])
    assert all(isinstance(outcome, RemoteError) for outcome in outcomes)  # each consumer got its whole error
    stats = served.factory.stats
    assert stats.errors == {"provider error": 300}
    assert len(stats.recent_errors) <= 20 and all(len(text) <= 200 for text in stats.recent_errors)
    assert all(secret not in text and "\x1b" not in text for text in stats.recent_errors)
    response = await treq.get(served.http_url + "/stats", persistent=False)
    body = await response.content()
    assert len(body) < 16 * KiB and secret.encode() not in body
    assert json.loads(body)["server"]["errors"] == {"provider error": 300}
    response = await treq.get(served.http_url + "/metrics", persistent=False)
    metrics = await response.content()
    assert len(metrics) < 16 * KiB
    assert b'pulsyflux_errors_total{kind="provider error"} 300' in metrics.splitlines()
    await consumer.close()
    provider.transport.loseConnection()
    await provider.lost


@ensure
async def test_attack_server_error_details_are_counted_by_kind(limited, channel):  # noqa: F811
    server = limited(max_in_flight=0)  # every request refused: "server overloaded: more than 0 ..."
    consumer = await Consumer.connect(server.address, channel)
    with pytest.raises(ServerOverloaded):
        await consumer.send(b"x")
    assert server.factory.stats.errors == {"server overloaded": 1}
    assert list(server.factory.stats.recent_errors) == [
        "server overloaded: more than 0 requests in flight on one connection"
    ]
    await consumer.close()


def test_attack_repeated_unmatched_errors_and_dropped_requests_log_a_bounded_number_of_lines():
    """What a peer can repeat at will (ERRORs nobody waits for, requests past the provider's
    backstop) costs log2(N) lines, not N."""
    from pulsyflux.client.connection import worth_logging

    assert sum(worth_logging(n) for n in range(1, 100_001)) == 17  # 1, 2, 4, ... 65,536
