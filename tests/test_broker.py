"""Broker behaviours, on the in-memory harness (MemoryServer) and, where the socket matters, over TCP."""

from __future__ import annotations

import json
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer

from pulsyflux import (
    Broker,
    BrokerClient,
    BrokerService,
    ConnectionLostError,
    Consumer,
    Message,
    NoProviderError,
    Provider,
    RemoteError,
    RequestTimeout,
    SubscriptionClosed,
)
from pulsyflux.testing import hang, reset
from pulsyflux.wire import codec, messages

from .helpers import clocked
from .test_messages import FULL

ensure = pytest_twisted.ensureDeferred


async def _broker(server, **options) -> Broker:
    return await server.connect(Broker, uuid.uuid4(), **options)


def _server_side(server, channel: uuid.UUID) -> list:
    """The server's connections registered on ``channel``."""
    return [conn for (role, chan, _), conn in server.registry.items() if chan == channel.bytes]


async def _read(sub, count: int) -> list[Message]:
    return [await sub.get() for _ in range(count)]


@clocked
async def test_publish_and_subscribe_with_headers(memory):
    server = memory
    broker = await _broker(server)
    sub = await broker.subscribe("orders")
    assert await broker.publish("orders", b"New order", {"priority": "high"}) is None
    msg = await sub.get()
    assert msg == Message("orders", b"New order", {"priority": "high"})
    await broker.publish("orders", b"")
    assert (await sub.get()).payload == b""
    await broker.close()


@clocked
async def test_two_subscribers_both_receive_and_topics_stay_isolated(memory):
    server = memory
    broker = await _broker(server)
    a1 = await broker.subscribe("a")
    a2 = await broker.subscribe("a")
    b = await broker.subscribe("b")
    await broker.publish("a", b"for a")
    await broker.publish("b", b"for b")
    await broker.publish("nobody", b"lost in space")
    assert (await a1.get()).payload == b"for a"
    assert (await a2.get()).payload == b"for a"
    assert (await b.get()).payload == b"for b"
    assert a1.pending == a2.pending == b.pending == 0
    assert broker.stats()["topics"] == {"a": 2, "b": 1}
    assert broker.published == 3 and broker.delivered == 3
    await broker.close()


@clocked
async def test_unsubscribe_ends_the_stream(memory):
    server = memory
    broker = await _broker(server)
    sub = await broker.subscribe("news")
    other = await broker.subscribe("other")
    await broker.publish("news", b"1")
    waiting = sub.get()
    assert (await waiting).payload == b"1"
    pending_get = sub.get()
    await broker.unsubscribe("news")
    with pytest.raises(SubscriptionClosed, match="unsubscribed"):
        await pending_get
    assert sub.closed and sub.closed_reason == "unsubscribed"
    received = [msg async for msg in sub]
    assert received == []
    await broker.publish("news", b"2")  # nobody listens now; fine
    await broker.publish("other", b"still here")
    assert (await other.get()).payload == b"still here"
    assert broker.stats()["topics"] == {"other": 1}
    await broker.close()
    assert other.closed


@clocked
async def test_async_iteration_drains_then_stops(memory):
    server = memory
    broker = await _broker(server)
    sub = await broker.subscribe("t")
    await defer.gatherResults([broker.publish("t", str(i).encode()) for i in range(5)])
    got = []
    async for msg in sub:
        got.append(msg.payload)
        if len(got) == 3:
            already_here = sub.pending
            await broker.unsubscribe("t")
    # Messages received before the unsubscribe are still read, then it ends.
    assert got == [str(i).encode() for i in range(3 + already_here)]
    await broker.close()


@clocked
async def test_order_of_10000_messages_is_preserved(memory):
    server = memory
    broker = await _broker(server)
    sub = await broker.subscribe("seq", buffer=100)
    publishes = [broker.publish("seq", b"%d" % i) for i in range(10_000)]
    received = [int((await sub.get()).payload) for _ in range(10_000)]
    await defer.gatherResults(publishes)
    assert received == list(range(10_000))
    assert sub.dropped == 0 and broker.dropped == 0
    await broker.close()


@clocked
async def test_connection_count_is_two_plus_two_per_subscription(memory):
    server = memory
    broker = await _broker(server)
    assert len(server.registry) == 2
    subs = [await broker.subscribe(topic) for topic in ("a", "a", "b")]
    assert len(server.registry) == 2 + 2 * 3
    for sub in subs:
        assert len(_server_side(server, sub.channel)) == 2
    gone = [conn.closed() for sub in subs[:2] for conn in _server_side(server, sub.channel)]
    await broker.unsubscribe("a")
    await defer.gatherResults(gone)
    assert len(server.registry) == 2 + 2
    gone = [conn.closed() for conn in _server_side(server, subs[2].channel)]
    await broker.unsubscribe("b")
    await defer.gatherResults(gone)
    assert len(server.registry) == 2
    await broker.close()
    await server.all_closed()
    assert len(server.registry) == 0 and not server.factory.router.connections


@clocked
async def test_a_subscriber_that_never_reads_does_not_stop_another(memory):
    server = memory
    broker = await _broker(server, backlog=1000)
    stuck = await broker.subscribe("firehose", buffer=100)
    reader = await broker.subscribe("firehose")
    # The reader paces the publisher (at most 200 ahead), so it never falls
    # behind; the stuck one falls behind by everything.
    publishes, received = [], []
    for i in range(10_000):
        if i >= 200:
            received.append(int((await reader.get()).payload))
        publishes.append(broker.publish("firehose", b"%d" % i))
    received += [int((await reader.get()).payload) for _ in range(200)]
    await defer.gatherResults(publishes)
    assert received == list(range(10_000)) and reader.dropped == 0
    # The stuck one lost its oldest waiting messages, counted in both places.
    stuck_stats, reader_stats = broker.stats()["subscriptions"]  # in subscribe order
    assert reader_stats["dropped"] == 0
    assert stuck.dropped == stuck_stats["dropped"] == broker.dropped > 0
    assert stuck_stats["backlog"] == 1000
    # What it did get is in order, and nothing is missing without a count.
    got = [int((await stuck.get()).payload) for _ in range(10_000 - stuck.dropped)]
    assert got == sorted(got) and got[-1] == 9999
    assert stuck.pending == 0
    await broker.close()


@clocked
async def test_remote_subscriber_through_broker_client(memory):
    server = memory
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    client = await memory.connect(BrokerClient, channel)
    assert len(server.registry) == 3  # broker's 2 + the client's publishing Consumer
    remote = await client.subscribe("jobs")
    local = await broker.subscribe("jobs")
    assert len(server.registry) == 3 + 2 + 2
    await client.publish("jobs", b"from the client", {"from": "client"})
    await broker.publish("jobs", b"from the broker")
    for sub in (remote, local):
        assert await _read(sub, 2) == [
            Message("jobs", b"from the client", {"from": "client"}),
            Message("jobs", b"from the broker"),
        ]
    gone = [conn.closed() for conn in _server_side(server, remote.channel)]
    await client.unsubscribe("jobs")
    await defer.gatherResults(gone)
    assert remote.closed and len(server.registry) == 3 + 2
    await broker.publish("jobs", b"only local")
    assert (await local.get()).payload == b"only local"
    await client.close()
    await broker.close()
    await server.all_closed()


@clocked
async def test_remote_stream_ends_when_the_broker_unsubscribes_or_closes(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    client = await memory.connect(BrokerClient, channel)
    first = await client.subscribe("a")
    second = await client.subscribe("b")
    await broker.unsubscribe("a")
    with pytest.raises(SubscriptionClosed, match="unsubscribed"):
        await first.get()
    await broker.close()
    assert [msg async for msg in second] == []
    assert second.closed_reason == "the broker closed"
    await client.close()


@clocked
async def test_vanished_remote_subscriber_is_dropped_and_its_connections_freed(memory):
    server = memory
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    client = await memory.connect(BrokerClient, channel)
    sub = await client.subscribe("t")
    keeper = await broker.subscribe("t")
    forwarding = [conn for conn in _server_side(server, sub.channel) if conn.key[0] == codec.ROLE_CONSUMER]
    reset(sub)  # the subscriber process "dies"
    await memory.quiet()  # both ends have seen it
    await broker.publish("t", b"anyone?")
    assert (await keeper.get()).payload == b"anyone?"
    await forwarding[0].closed()  # the broker let go of its forwarding connection
    assert broker.stats()["topics"] == {"t": 1}
    assert len(server.registry) == 2 + 1 + 2
    await client.close()
    await broker.close()


@clocked
async def test_go_publish_json_is_accepted_and_forwarded_unchanged(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    typed = await broker.subscribe("t")
    # A raw subscriber, speaking the documented control messages by hand.
    raw_channel = uuid.uuid4()
    raw = await memory.connect(Provider, raw_channel)
    go_publisher = await memory.connect(Consumer, channel)  # what a Go publisher does
    subscribe = messages.encode("$pulsyflux/subscribe", None, {"topic": "t", "channel": str(raw_channel)})
    answer = go_publisher.send(subscribe)
    probe = await raw.receive()
    assert messages.decode(probe.payload).topic == "$pulsyflux/probe"
    raw.respond(probe, b"ok")
    assert await answer == b"ok"
    assert await go_publisher.send(FULL) == b"ok"
    forwarded = await raw.receive()
    assert forwarded.payload == FULL  # byte for byte what the Go publisher sent
    raw.respond(forwarded, b"ok")
    assert await typed.get() == Message("t", b"hi", {"k": "v"})
    await defer.gatherResults([raw.close(), go_publisher.close()])
    await broker.close()


@clocked
async def test_bad_publishes_get_clear_errors_and_nothing_else_breaks(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    sub = await broker.subscribe("t")
    consumer = await memory.connect(Consumer, channel)
    with pytest.raises(RemoteError, match="not a JSON message"):
        await consumer.send(b"hello")
    with pytest.raises(RemoteError, match="reserved"):
        await consumer.send(messages.encode("$pulsyflux/nonsense"))
    with pytest.raises(ValueError, match="reserved"):
        broker.publish("$pulsyflux/subscribe", b"")
    with pytest.raises(TypeError):
        broker.publish("t", "not bytes")  # type: ignore[arg-type]
    await broker.publish("t", b"fine")
    assert (await sub.get()).payload == b"fine"
    assert broker.stats()["rejected"] == 2
    await consumer.close()
    await broker.close()


@clocked
async def test_broker_client_without_a_broker_fails_fast(memory):
    with pytest.raises(NoProviderError, match="no broker on channel"):
        await memory.connect(BrokerClient, uuid.uuid4())
    assert 1.0 <= memory.now() < 1.1  # on the clock: a second of patience for a broker still starting, no more
    await memory.all_closed()


@ensure
async def test_subscriptions_end_when_the_server_goes_away(server):
    broker = await Broker.connect(server.address, uuid.uuid4())
    sub = await broker.subscribe("t")
    await broker.publish("t", b"last words")
    assert (await sub.get()).payload == b"last words"
    pending = sub.get()
    await server.factory.router.close_all()  # the server goes away
    with pytest.raises(SubscriptionClosed, match="connection to the server lost"):
        await pending
    with pytest.raises(ConnectionLostError):
        await broker.publish("t", b"nobody")
    await broker.close()


@ensure
async def test_broker_service_starts_and_stops_cleanly():
    service = BrokerService("tcp:0:interface=127.0.0.1", broker_channel=uuid.uuid4())
    service.startService()
    broker = await service.whenReady()
    assert len(service.factory.registry) == 2
    sub = await service.subscribe("svc")
    await service.publish("svc", b"in process")
    assert (await sub.get()).payload == b"in process"
    assert service.stats()["topics"] == {"svc": 1}
    connections = list(service.factory.router.connections)
    await service.stopService()
    assert all(conn.lost for conn in connections) and not service.factory.router.connections
    assert sub.closed and broker.closed
    with pytest.raises(ConnectionLostError):
        await service.publish("svc", b"after stop")


@ensure
async def test_broker_service_without_broker_is_just_the_server():
    service = BrokerService("tcp:0:interface=127.0.0.1", broker_channel=None)
    service.startService()
    await service.server.whenListening()
    assert service.factory.registry == {}
    with pytest.raises(RuntimeError, match="without a broker"):
        await service.whenReady()
    await service.stopService()


@ensure
async def test_broker_service_stopped_while_the_broker_connects():
    service = BrokerService("tcp:0:interface=127.0.0.1", broker_channel=uuid.uuid4())
    service.startService()
    ready = service.whenReady()
    await service.stopService()
    assert not service.factory.router.connections and service.broker is None
    with pytest.raises(ConnectionLostError):
        await ready


@clocked
async def test_a_reader_may_unsubscribe_in_the_middle_of_a_batch(memory):
    server = memory
    broker = await _broker(server)
    sub = await broker.subscribe("t")
    got = []

    async def read():
        async for msg in sub:
            got.append(msg.payload)
            if msg.payload == b"3":
                await broker.unsubscribe("t")

    reading = defer.ensureDeferred(read())  # waiting before the batch arrives
    await defer.gatherResults([broker.publish("t", b"%d" % i) for i in range(10)])
    await reading
    assert got[:4] == [b"0", b"1", b"2", b"3"] and got == [b"%d" % i for i in range(len(got))]
    await broker.close()


@clocked
async def test_a_remote_subscriber_learns_how_many_were_dropped_for_it(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, backlog=50, batch=10, window=1)
    client = await memory.connect(BrokerClient, channel)
    slow = await client.subscribe("t", buffer=10)
    await defer.gatherResults([broker.publish("t", b"%d" % i) for i in range(1000)])
    # It holds at most buffer + window x batch; the broker keeps 50 more and drops the rest.
    [stats] = broker.stats()["subscriptions"]
    assert stats["dropped"] == broker.dropped > 0 and stats["backlog"] == 50
    got = [int((await slow.get()).payload) for _ in range(1000 - broker.dropped)]
    assert got == sorted(got) and got[-1] == 999
    assert slow.dropped == broker.dropped  # told in the stream, where the gap is
    await client.close()
    await broker.close()


@clocked
async def test_bad_control_messages_are_refused(memory):
    server = memory
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    consumer = await memory.connect(Consumer, channel)
    with pytest.raises(RemoteError, match="needs a 'topic' header"):
        await consumer.send(messages.encode("$pulsyflux/subscribe", None, {"channel": str(uuid.uuid4())}))
    with pytest.raises(RemoteError, match="'channel' header holding a UUID"):
        await consumer.send(messages.encode("$pulsyflux/subscribe", None, {"topic": "t", "channel": "nope"}))
    with pytest.raises(RemoteError, match="no subscriber answers on channel"):
        await consumer.send(messages.encode("$pulsyflux/subscribe", None, {"topic": "t", "channel": str(uuid.uuid4())}))
    with pytest.raises(RemoteError, match="cannot be sent in a batch"):
        await consumer.send(messages.encode_batch([messages.control("$pulsyflux/subscribe"), '{"Topic":"t"}']))
    assert broker.stats()["topics"] == {} and len(server.registry) == 3
    await consumer.close()
    await broker.close()


@clocked
async def test_publish_times_out_from_the_call_when_the_broker_hangs(memory):
    broker = await memory.connect(Broker, uuid.uuid4())
    client = await memory.connect(BrokerClient, broker.channel)
    resume = hang(broker)  # the broker stops reading: nothing is answered
    started = memory.now()
    outcomes = await defer.DeferredList(
        [client.publish("t", b"%d" % i, timeout=1.0) for i in range(10)], consumeErrors=True
    )
    # Publishes queued behind the first requests do not wait a second timeout.
    assert memory.now() - started == pytest.approx(1.0, abs=0.01)  # one timeout (and a tick), not two
    assert all(not ok and failure.check(RequestTimeout) for ok, failure in outcomes)
    resume()
    await client.close()
    await broker.close()


@clocked
async def test_unsubscribing_with_messages_still_queued_counts_them_as_lost(memory):
    server = memory
    broker = await _broker(server, backlog=5000)
    stuck = await broker.subscribe("queue", buffer=5)
    await defer.gatherResults([broker.publish("queue", b"%d" % i) for i in range(2000)])
    [before] = broker.stats()["subscriptions"]
    assert before["backlog"] > 0  # the subscriber's buffer is full: the rest wait at the broker
    await broker.unsubscribe("queue")
    stats = broker.stats()
    assert stats["lost"] == before["backlog"] and stats["dropped"] == 0
    readable = []
    while True:
        try:
            readable.append(int((await stuck.get()).payload))
        except SubscriptionClosed:
            break
    # What was forwarded stays readable, in order; what never left is counted.
    assert readable == list(range(len(readable)))
    assert len(readable) + stats["lost"] <= 2000
    await broker.close()


@clocked
async def test_broker_says_whether_it_is_closed(memory):
    server = memory
    broker = await _broker(server)
    assert not broker.closed
    await broker.close()
    assert broker.closed


def test_each_waiting_publish_keeps_its_own_timeout():
    """A publish queued behind others is sent with its own deadline, not an earlier one's."""
    from twisted.internet.task import Clock

    from pulsyflux.broker.publisher import Publisher

    class FakeConsumer:
        def __init__(self):
            self.reactor = Clock()
            self.sent = []  # (timeout, answer)

        def send_for(self, body, timeout, answer):
            self.sent.append((timeout, answer))

    consumer = FakeConsumer()
    publisher = Publisher(consumer, window=1, batch=1)
    first = publisher.publish("t", b"a", None, timeout=1.0)
    second = publisher.publish("t", b"b", None, timeout=10.0)
    assert [timeout for timeout, _ in consumer.sent] == [1.0]  # the second waits for its turn
    consumer.reactor.advance(0.5)
    consumer.sent[0][1].callback(b"ok")
    assert first.called
    assert consumer.sent[1][0] == pytest.approx(9.5)  # its own deadline, counted from its call
    consumer.sent[1][1].callback(b"ok")
    assert second.called


def _raw_announcement(topic: str, channel: uuid.UUID) -> bytes:
    """A ``$pulsyflux/subscribe`` as any client can write it: ASCII JSON, so any
    topic (a lone surrogate too) travels as a ``\\uXXXX`` escape."""
    headers = {"topic": topic, "channel": str(channel)}
    return json.dumps({"Topic": messages.SUBSCRIBE, "Payload": None, "Headers": headers}).encode("ascii")


@ensure
async def test_the_empty_topic_is_refused_everywhere(server):
    """One topic rule: the broker refuses the empty topic as the CLI and HTTP do."""
    channel = uuid.uuid4()
    broker = await Broker.connect(server.address, channel)
    client = await BrokerClient.connect(server.address, channel, heartbeat=None)
    consumer = await Consumer.connect(server.address, channel)
    try:
        for api in (broker, client):
            with pytest.raises(ValueError, match="^topic must not be empty$"):
                api.publish("", b"x")
            with pytest.raises(ValueError, match="^topic must not be empty$"):
                api.subscribe("")
        with pytest.raises(RemoteError, match="^topic must not be empty$"):
            await consumer.send(messages.encode("", b"x"))
        subscriber = await Provider.connect(server.address, uuid.uuid4(), handler=lambda body: b"ok")
        with pytest.raises(RemoteError, match="^subscribe refused: topic must not be empty$"):
            await consumer.send(_raw_announcement("", subscriber.channel_id))
        await subscriber.close()
        assert broker.stats()["topics"] == {}
    finally:
        await defer.gatherResults([consumer.close(), client.close()])
        await broker.close()


@ensure
@pytest.mark.parametrize(
    "bad",
    ["\x00", "\x1b", "\x1f", "\x7f", "\x85", "\x9f", "\u2028", "\u2029", "\ud800", "\udfff"]
    + ["\u061c", "\u200e", "\u200f", "\u202a", "\u202e", "\u2066", "\u2069"],  # bidi controls (Trojan Source)
)
async def test_a_topic_with_a_control_character_or_lone_surrogate_is_refused_at_subscribe(server, bad):
    """Go's JSON decoder reads a lone surrogate as U+FFFD, so Go and Python would
    disagree about such a topic; control characters would reach logs and terminals."""
    channel = uuid.uuid4()
    broker = await Broker.connect(server.address, channel)
    consumer = await Consumer.connect(server.address, channel)
    subscriber = await Provider.connect(server.address, uuid.uuid4(), handler=lambda body: b"ok")
    try:
        expected = (
            f"^subscribe refused: a topic holds no control character or lone surrogate, found U\\+{ord(bad):04X} at 3$"
        )
        with pytest.raises(RemoteError, match=expected):
            await consumer.send(_raw_announcement("bad" + bad + "topic", subscriber.channel_id))
        with pytest.raises(ValueError, match="no control character or lone surrogate"):
            broker.subscribe("bad" + bad + "topic")
        assert broker.stats()["topics"] == {}
        # A subscription with a plain topic still works on the same connections.
        sub = await broker.subscribe("good")
        await broker.publish("good", b"yes")
        assert (await sub.get()).payload == b"yes"
    finally:
        await defer.gatherResults([consumer.close(), subscriber.close()])
        await broker.close()


def _count_batch_encodes(monkeypatch, size: int) -> list[str]:
    """Every forward body of ``size`` messages the broker makes (JSON or binary), counted by name."""
    calls: list[str] = []

    def counting(name):
        encode = getattr(messages, name)

        def count(entries):
            if len(entries) == size:
                calls.append(name)
            return encode(entries)

        monkeypatch.setattr(messages, name, count)

    counting("encode_batch")
    counting("encode_records")
    return calls


@clocked
async def test_a_batch_for_one_topic_is_encoded_once_for_every_subscriber_that_keeps_up(memory, monkeypatch):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, window=4)
    quick = [await broker.subscribe("t") for _ in range(3)]
    # Takes one message, then holds its answers while full: after four its window (4) is full.
    lagging = await broker.subscribe("t", buffer=1)
    publisher = await memory.connect(Consumer, channel)
    for i in range(5):
        assert await publisher.send(messages.encode("t", b"%d" % i)) == b"ok"
    for sub in quick:
        assert [m.payload for m in await _read(sub, 5)] == [b"0", b"1", b"2", b"3", b"4"]
    batch = messages.encode_batch([messages.encode_text("t", b"%d" % i, None) for i in (5, 6, 7)])
    encodes = _count_batch_encodes(monkeypatch, 3)
    assert await publisher.send(batch) == b"ok"
    for sub in quick:
        assert [m.payload for m in await _read(sub, 3)] == [b"5", b"6", b"7"]
    assert len(encodes) == 1  # one body for every quick subscriber; the lagging one's waits in its backlog
    assert broker.stats()["subscriptions"][3]["backlog"] == 3
    assert [m.payload for m in await _read(lagging, 8)] == [b"%d" % i for i in range(8)]
    assert broker.dropped == 0 and all(sub.dropped == 0 for sub in [*quick, lagging])
    await publisher.close()
    await broker.close()


@pytest_twisted.ensureDeferred
async def test_a_published_batch_reaches_remote_subscribers_over_tcp_in_order(server):
    channel = uuid.uuid4()
    broker = await Broker.connect(server.address, channel)
    clients = [await BrokerClient.connect(server.address, channel) for _ in range(2)]
    subs = [await client.subscribe("t") for client in clients]
    publisher = await Consumer.connect(server.address, channel)
    for start in range(0, 1000, 100):
        batch = messages.encode_batch([messages.encode_text("t", b"%d" % i, None) for i in range(start, start + 100)])
        assert await publisher.send(batch) == b"ok"
    for sub in subs:
        assert [int(m.payload) for m in await _read(sub, 1000)] == list(range(1000))
    assert broker.dropped == 0
    await publisher.close()
    await defer.gatherResults([client.close() for client in clients])
    await broker.close()
