"""Attacks on the broker (issue #8: items 1, 6, 11, 12, 15), each over real TCP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, task

from pulsyflux import Broker, BrokerClient, Consumer, Provider, RemoteError, SubscriptionClosed
from pulsyflux.broker import DEFAULT_BROKER_CHANNEL
from pulsyflux.testing import MemoryServer, start_server
from pulsyflux.wire import codec, messages

from .helpers import clocked, eventually
from .wire import connect_raw, register_frames

ensure = pytest_twisted.ensureDeferred

KiB = 1 << 10


async def _broker(server, **options) -> Broker:
    """A broker on its own channel: over TCP, or on a MemoryServer (and its clock)."""
    if isinstance(server, MemoryServer):
        return await server.connect(Broker, uuid.uuid4(), **options)
    return await Broker.connect(server.address, uuid.uuid4(), **options)


def _announce(topic: str, channel: uuid.UUID, kind: str = messages.SUBSCRIBE) -> bytes:
    return messages.encode(kind, None, {"topic": topic, "channel": str(channel)})


def _consumers_on(server, channel: uuid.UUID) -> list:
    return [key for key in server.registry if key[0] == codec.ROLE_CONSUMER and key[1] == channel.bytes]


async def _first_request(raw):
    """The START of the first request ``raw`` (a provider on the wire) receives."""
    count = 1
    while True:
        frames = await raw.wait_frames(count)
        if frames[-1].type == codec.START and not frames[-1].flags & codec.FLAG_REGISTRATION:
            return frames[-1]
        count += 1


async def _still_works(address, broker_channel=DEFAULT_BROKER_CHANNEL, reactor=None) -> None:
    client = await BrokerClient.connect(address, broker_channel, heartbeat=None, reactor=reactor)
    try:
        sub = await client.subscribe("alive")
        await client.publish("alive", b"yes")
        assert (await sub.get()).payload == b"yes"
    finally:
        await client.close()


# -- item 1: errors that repeat the sender's megabyte ---------------------------------


@pytest.mark.parametrize(
    "body",
    [
        messages.encode("$pulsyflux/" + "x" * 1_100_000, None, None),  # an unknown control message
        b'{"Topic":"t","Payload":null,"Headers":{"' + b"k" * 1_100_000 + b'":5}}',  # a header that is not a string
    ],
    ids=["reserved-topic", "header-key"],
)
@ensure
async def test_attack_huge_refused_publish_gets_a_short_error_and_the_broker_lives(body):
    running = await start_server()
    try:
        attacker = await Consumer.connect(running.address, DEFAULT_BROKER_CHANNEL)
        with pytest.raises(RemoteError) as refused:
            await attacker.send(body, timeout=10)
        text = str(refused.value)
        assert len(text) < 300 and "... (1100" in text  # an excerpt, and how long the original was
        await attacker.close()
        assert not running.broker.closed
        await _still_works(running.address)
    finally:
        await running.stop()


@ensure
async def test_attack_probe_answered_with_a_huge_error_does_not_kill_the_broker():
    running = await start_server()
    try:
        channel = uuid.uuid4()
        # A provider on the wire (Provider.respond cuts error texts to 4 KiB).
        liar = await connect_raw(running)
        liar.send(register_frames(codec.ROLE_PROVIDER, os.urandom(16), channel.bytes))
        attacker = await Consumer.connect(running.address, DEFAULT_BROKER_CHANNEL)
        announced = attacker.send(_announce("t", channel), timeout=10)
        probe = await _first_request(liar)
        # An ERROR that fits a frame alone; "subscribe failed: " + it did not.
        routing = probe.payload  # a START's payload routes the answer back
        liar.send(codec.encode_frame(codec.ERROR, probe.request_id, routing + b"E" * ((1 << 20) - 40)))
        with pytest.raises(RemoteError, match=r"^subscribe failed: 'E+'\.\.\. \(1048536 chars\)$"):
            await announced
        assert not running.broker.closed
        await _still_works(running.address)
        await attacker.close()
        liar.transport.loseConnection()
        await liar.lost
    finally:
        await running.stop()


# -- item 6: backlogs bounded in bytes --------------------------------------------------


@ensure
async def test_attack_never_reading_subscriber_holds_at_most_backlog_bytes(server):
    bound = 64 * KiB
    broker = await _broker(server, backlog_bytes=bound, batch=1, window=1)
    client = await BrokerClient.connect(server.address, broker.channel, heartbeat=None)
    sub = await client.subscribe("big", buffer=1)  # never read until the end
    payload = b"p" * (2 * KiB)
    peak = 0
    for i in range(200):  # about 400 KiB of records (540 KiB of JSON); 10,000 messages would be allowed
        await broker.publish("big", payload + b"%d" % i)
        peak = max(peak, broker.stats()["backlog_bytes"])
    stats = broker.stats()
    [mine] = stats["subscriptions"]
    assert peak <= bound and mine["backlog_bytes"] <= bound
    # Each message takes over 2 KiB in either encoding (binary records here: the subscriber offered them).
    assert mine["backlog"] <= bound // len(payload) and broker.dropped == mine["dropped"] > 150
    # Every message is read or counted as dropped, and the subscriber's count is the broker's.
    got = []
    while len(got) + sub.dropped < 200:
        got.append(int((await sub.get()).payload[len(payload) :]))
    assert got == sorted(got) and got[-1] == 199
    assert sub.dropped == broker.dropped and sub.rejected == 0
    await client.close()
    await broker.close()


@ensure
async def test_attack_big_messages_to_a_never_reading_subscriber_stop_at_8_mib_by_default(server):
    broker = await _broker(server, batch=1, window=1)  # only the byte bound is the default one
    client = await BrokerClient.connect(server.address, broker.channel, heartbeat=None)
    sub = await client.subscribe("big", buffer=1)
    payload = b"p" * (256 * KiB)
    size = len(messages.encode_record("big", payload, None))  # what waits: the subscriber reads binary records
    for _ in range(48):  # 12 MiB of records (16 MiB of JSON); the 10,000-message bound alone kept it all
        await broker.publish("big", payload)
    [mine] = broker.stats()["subscriptions"]
    assert mine["backlog"] * size <= 8 << 20 and mine["dropped"] > 0
    received = 0
    while received + sub.dropped < 48:
        await sub.get()
        received += 1
    assert sub.dropped == mine["dropped"]
    await client.close()
    await broker.close()


@ensure
async def test_attack_many_never_reading_subscribers_hold_at_most_the_total(server):
    total = 96 * KiB
    broker = await _broker(server, backlog_bytes=1 << 20, total_backlog_bytes=total, batch=1, window=1)
    client = await BrokerClient.connect(server.address, broker.channel, heartbeat=None)
    subs = [await client.subscribe("big", buffer=1) for _ in range(3)]
    payload = b"p" * (2 * KiB)
    peak = 0
    for i in range(100):
        await broker.publish("big", payload + b"%d" % i)
        peak = max(peak, broker.stats()["backlog_bytes"])
    stats = broker.stats()
    assert peak <= total  # each alone would keep all 100 (about 270 KiB)
    assert stats["dropped"] == sum(s["dropped"] for s in stats["subscriptions"]) > 0
    for sub, entry in zip(subs, stats["subscriptions"]):
        got = []
        while len(got) + sub.dropped < 100:
            got.append(int((await sub.get()).payload[len(payload) :]))
        assert got == sorted(got) and got[-1] == 99
        assert sub.dropped == entry["dropped"]
    await client.close()
    await broker.close()


# -- item 11: announcements for channels nobody serves -----------------------------------


@clocked
async def test_attack_subscribes_to_dead_channels_are_refused_and_open_few_connections(memory):
    # In memory: each dead channel costs the broker a second of retries, on the clock.
    server = memory
    broker = await _broker(server, max_setups=4)
    attacker = await memory.connect(Consumer, broker.channel)
    baseline = len(server.factory.router.connections)
    peak = [baseline]
    sampler = task.LoopingCall(lambda: peak.append(len(server.factory.router.connections)))
    sampler.clock = memory.clock
    sampler.start(0.005)
    try:
        results = await defer.DeferredList(
            [attacker.send(_announce("t", uuid.uuid4()), timeout=10) for _ in range(200)], consumeErrors=True
        )
    finally:
        sampler.stop()
    errors = [str(failure.value) for ok, failure in results if not ok]
    assert len(errors) == 200
    refused = [e for e in errors if e.startswith("subscribe refused: too many subscriptions being set up")]
    assert len(refused) >= 190  # at most 4 at a time were tried
    assert all(e.startswith("subscribe failed: no subscriber answers") for e in errors if e not in refused)
    assert max(peak) <= baseline + 4
    assert broker.stats()["refused"] == len(refused)
    await _still_works(server.address, broker.channel, reactor=memory.clock)
    await attacker.close()
    await broker.close()


@ensure
async def test_attack_subscriptions_past_the_cap_are_refused(server):
    broker = await _broker(server, max_subscriptions=2)
    client = await BrokerClient.connect(server.address, broker.channel, heartbeat=None)
    await client.subscribe("a")
    await client.subscribe("b")
    with pytest.raises(RemoteError, match="^subscribe refused: the broker has its maximum of 2 subscriptions"):
        await client.subscribe("c")
    # A topic longer than the limit cannot be subscribed to, even on a live channel.
    channel = uuid.uuid4()
    provider = await Provider.connect(server.address, channel, handler=lambda body: b"ok")
    announcer = await Consumer.connect(server.address, broker.channel)  # as any client can
    with pytest.raises(RemoteError, match="at most 1024 characters, not 5000"):
        await announcer.send(_announce("t" * 5000, channel))
    await announcer.close()
    await client.unsubscribe("a")
    await client.subscribe("c")  # room again
    await provider.close()
    await client.close()
    await broker.close()


# -- item 12: concurrent announcements of one channel ------------------------------------


@ensure
async def test_attack_concurrent_announcements_of_one_channel_deliver_once(server):
    broker = await _broker(server)
    channel = uuid.uuid4()
    received: list[messages.Message] = []

    def subscriber(body: bytes) -> bytes:
        received.extend(m for m in messages.decode_body(body) if not messages.is_control(m.topic))
        return b"ok"

    provider = await Provider.connect(server.address, channel, handler=subscriber)
    announcer = await Consumer.connect(server.address, broker.channel)
    answers = await defer.gatherResults([announcer.send(_announce("t", channel)) for _ in range(5)])
    assert sorted(answers) == [b"ok", b"resumed", b"resumed", b"resumed", b"resumed"]
    assert len(_consumers_on(server, channel)) == 1 and broker.stats()["topics"] == {"t": 1}
    for i in range(3):
        await broker.publish("t", b"%d" % i)
    await eventually(lambda: len(received) >= 3)
    await broker.publish("t", b"end")
    await eventually(lambda: received[-1].payload == b"end")
    assert [m.payload for m in received] == [b"0", b"1", b"2", b"end"]
    await announcer.send(_announce("t", channel, messages.UNSUBSCRIBE))
    await eventually(lambda: not _consumers_on(server, channel))  # no forwarding connection left behind
    assert broker.stats()["topics"] == {}
    await announcer.close()
    await provider.close()
    await broker.close()


# -- item 15: forged deliveries, and channel ids in stats ---------------------------------


@ensure
async def test_attack_forged_delivery_of_another_topic_is_not_yielded(server):
    broker = await _broker(server)
    client = await BrokerClient.connect(server.address, broker.channel, heartbeat=None)
    sub = await client.subscribe("orders")
    forger = await Consumer.connect(server.address, sub.channel)  # someone who learnt the channel
    forged = [
        messages.encode("payroll", b"forged"),  # another topic
        messages.encode_batch([messages.control(messages.DROPPED, dropped="1000000")]),  # a count with no gap after it
        messages.encode_batch(
            [messages.control(messages.DROPPED, dropped="5"), messages.encode_text("x", b"forged", None)]
        ),  # a count that comes with another topic
    ]
    for body in forged:
        await forger.send(body)
    await broker.publish("orders", b"real")
    msg = await sub.get()
    assert (msg.topic, msg.payload) == ("orders", b"real")
    assert sub.pending == 0 and sub.dropped == 0 and sub.rejected == 4
    await forger.close()
    await client.close()
    await broker.close()


@ensure
async def test_attack_stats_reveal_no_subscriber_channel(server):
    broker = await _broker(server)
    client = await BrokerClient.connect(server.address, broker.channel, heartbeat=None)
    remote = await client.subscribe("orders")
    local = await broker.subscribe("orders")
    await broker.publish("orders", b"x")
    await remote.get()
    await local.get()
    stats = broker.stats()
    text = json.dumps(stats)
    for sub in (remote, local):
        assert str(sub.channel) not in text and sub.channel.hex not in text
    assert [s["id"] for s in stats["subscriptions"]] == ["sub-1", "sub-2"]
    await client.close()
    await broker.close()


# -- item 11, per client: one client's dead-channel flood does not starve the others ------


@clocked
async def test_attack_one_client_flooding_dead_subscribes_does_not_starve_honest_subscribers(memory):
    server = memory  # in memory: each dead channel costs the broker a second of retries, on the clock
    broker = await _broker(server)  # the defaults: 64 setups at once, 8 per client
    attacker = await memory.connect(Consumer, broker.channel)
    flooding = [True]
    refused_attacker = [0]

    async def slot() -> None:
        # Keeps one dead-channel announcement in flight; 80 slots: more than the total cap.
        while flooding[0]:
            try:
                await attacker.send(_announce("dead", uuid.uuid4()), timeout=10)
            except RemoteError as error:
                refused_attacker[0] += str(error).startswith("subscribe refused: too many subscriptions being set up")
            await task.deferLater(memory.clock, 0.005, lambda: None)

    slots = [defer.ensureDeferred(slot()) for _ in range(80)]
    honest = await memory.connect(BrokerClient, broker.channel, heartbeat=None)
    try:
        await memory.until(lambda: len(broker.fanout.opening) >= 8)  # the flood is on
        subscribed = 0
        for i in range(20):
            await honest.subscribe(f"honest-{i}")  # on main: "too many subscriptions being set up"
            subscribed += 1
        assert subscribed == 20
        assert refused_attacker[0] > 0  # the attacker was refused meanwhile, by its own cap
    finally:
        flooding[0] = False
        await defer.DeferredList(slots, consumeErrors=True)
    assert broker.fanout.setups_by_client == {}  # every count went back to nothing
    await honest.close()
    await attacker.close()
    await broker.close()


@ensure
async def test_attack_request_with_another_client_id_than_registered_is_refused(server):
    from .wire import connect_raw, register_frames, request_frames

    channel = uuid.uuid4()
    handled: list[bytes] = []
    provider = await Provider.connect(server.address, channel, handler=lambda body: handled.append(body) or b"ok")
    raw = await connect_raw(server)
    mine, other = uuid.uuid4().bytes, uuid.uuid4().bytes
    raw.send(register_frames(codec.ROLE_CONSUMER, mine, channel.bytes))
    forged = uuid.uuid4().bytes
    raw.send(request_frames(forged, other, channel.bytes, b"forged"))
    [error] = await raw.wait_frames(1).addTimeout(5, _reactor())
    assert error.type == codec.ERROR and error.request_id == forged
    message = codec.error_message(error.payload)
    assert message == "client id does not match the connection's registration"
    from pulsyflux.wire.errors import ProtocolError, error_from_message

    assert isinstance(error_from_message(message), ProtocolError)
    # Its own id still works on that connection, and the forged request never reached the provider.
    honest = uuid.uuid4().bytes
    raw.send(request_frames(honest, mine, channel.bytes, b"mine"))
    frames = await raw.wait_frames(4).addTimeout(5, _reactor())
    assert [f.request_id for f in frames[1:]] == [honest] * 3  # RESPONSE_START, CHUNK, END
    assert handled == [b"mine"]
    raw.transport.loseConnection()
    await raw.lost
    await provider.close()


def _reactor():
    from twisted.internet import reactor

    return reactor


# -- item 15: a stranger who learnt a subscriber's channel cannot end it ------------------


@ensure
async def test_attack_stranger_cannot_unsubscribe_someone_elses_subscription():
    running = await start_server()
    victim = await BrokerClient.connect(running.address, heartbeat=None)
    stranger = await Consumer.connect(running.address, DEFAULT_BROKER_CHANNEL)
    try:
        sub = await victim.subscribe("orders")
        # The stranger knows the channel (leaked somehow) and asks the broker to end it.
        assert await stranger.send(_announce("orders", sub.channel, messages.UNSUBSCRIBE)) == b"ok"
        await victim.publish("orders", b"still mine")
        assert (await sub.get().addTimeout(5, running.reactor)).payload == b"still mine"
        assert not sub.closed
        assert len(running.broker.stats()["subscriptions"]) == 1
        # The subscriber's own client still can.
        await victim.unsubscribe("orders")
        await eventually(lambda: not running.broker.stats()["subscriptions"])
    finally:
        await stranger.close()
        await victim.close()
        await running.stop()


@clocked
async def test_a_closing_notice_from_the_broker_is_kept_as_one_bounded_line(memory):
    # A broker that is not ours (or anyone who learnt the channel) ends a subscription with
    # a megabyte of terminal escapes as its reason: the subscriber keeps, raises and logs
    # at most CLOSED_REASON_CHARS of it, escaped.
    from pulsyflux.broker.subscription import CLOSED_REASON_CHARS

    broker_channel = uuid.uuid4()
    fake_broker = await memory.connect(Provider, broker_channel, handler=lambda body: b"ok")
    client = await memory.connect(BrokerClient, broker_channel, heartbeat=None)
    sub = await client.subscribe("news")
    forger = await memory.connect(Consumer, sub.channel)
    reason = "\x1b[2J\u202e" + "x" * 1_000_000
    await forger.send(messages.control(messages.CLOSED, reason=reason).encode("utf-8"))

    with pytest.raises(SubscriptionClosed) as closed:
        await sub.get()
    assert sub.closed_reason is not None
    assert sub.closed_reason.startswith("\\x1b[2J\\u202e" + "x" * 100)
    assert sub.closed_reason.endswith(f"... ({len(reason) - CLOSED_REASON_CHARS} chars more)")
    assert len(str(closed.value)) < CLOSED_REASON_CHARS + 100
    await forger.close()
    await client.close()
    await fake_broker.close()
