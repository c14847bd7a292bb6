"""Wildcard subscriptions and queue groups through the broker (issue 11, parts 1 and 2)."""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted

from pulsyflux import Broker, BrokerClient, Consumer, Message, Provider, RemoteError
from pulsyflux.testing import start_server
from pulsyflux.wire import messages

from .helpers import clocked, eventually, json_subscriber

ensure = pytest_twisted.ensureDeferred


@clocked
async def test_publishing_to_a_pattern_or_empty_token_is_refused_at_once(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    for topic in ("orders.*", "orders.>", "orders..eu", "orders.", "orders.*x"):
        with pytest.raises(ValueError, match="token 2"):
            broker.publish(topic, b"x")
    # A Go publisher gets an error answer, and the broker keeps working.
    go_publisher = await memory.connect(Consumer, channel)
    for topic in ("orders.*", "a..b"):
        with pytest.raises(RemoteError, match="publish refused: token 2"):
            await go_publisher.send(messages.encode(topic, b"x"))
    batch = messages.encode_batch([messages.encode_text("ok", b"", None), messages.encode_text("x.>", b"", None)])
    with pytest.raises(RemoteError, match="publish refused: token 2 is the wildcard '>'"):
        await go_publisher.send(batch)  # one bad message refuses the batch: none of it was published
    assert broker.stats()["rejected"] == 3 and broker.published == 0
    assert await go_publisher.send(messages.encode("a b.c", b"spaces were always fine")) == b"ok"
    await go_publisher.close()
    await broker.close()


async def _drain(sub) -> list[Message]:
    """Every message already queued in ``sub`` (no waiting)."""
    out = []
    while sub.pending:
        out.append(await sub.get())
    return out


@clocked
async def test_wildcards_deliver_the_concrete_topic(memory):
    broker = await memory.connect(Broker, uuid.uuid4())
    one = await broker.subscribe("orders.*")
    rest = await broker.subscribe("orders.>")
    exact = await broker.subscribe("orders.eu")
    everything = await broker.subscribe(">")
    middle = await broker.subscribe("*.eu.*")
    for topic in ("orders.eu", "orders.eu.paris", "orders", "billing.eu.x", "ordersx.eu"):
        await broker.publish(topic, topic.encode())
    await memory.quiet()
    assert everything.pending == 5
    assert [m.topic for m in await _drain(one)] == ["orders.eu"]
    assert [m.topic for m in await _drain(rest)] == ["orders.eu", "orders.eu.paris"]
    assert [m.topic for m in await _drain(exact)] == ["orders.eu"]
    assert [m.topic for m in await _drain(middle)] == ["orders.eu.paris", "billing.eu.x"]
    got = await _drain(everything)
    assert [(m.topic, m.payload) for m in got] == [(t, t.encode()) for t in
                                                    ("orders.eu", "orders.eu.paris", "orders", "billing.eu.x", "ordersx.eu")]  # fmt: skip
    assert broker.stats()["topics"] == {"orders.eu": 1, "orders.*": 1, "orders.>": 1, ">": 1, "*.eu.*": 1}
    await broker.unsubscribe("orders.*")
    assert one.closed and "orders.*" not in broker.stats()["topics"]
    assert all(s.rejected == 0 for s in (one, rest, exact, everything, middle))
    await broker.close()


@clocked
async def test_queue_group_gives_each_message_to_one_member_and_plain_subscribers_a_copy(memory):
    broker = await memory.connect(Broker, uuid.uuid4())
    workers = [await broker.subscribe("jobs.*", group="workers") for _ in range(3)]
    loggers = [await broker.subscribe("jobs.*", group="loggers") for _ in range(2)]
    other_pattern = await broker.subscribe("jobs.>", group="workers")  # another pattern: another group
    plain = await broker.subscribe("jobs.*")
    for n in range(30):
        await broker.publish(f"jobs.{n % 4}", str(n).encode())
    await memory.quiet()
    assert plain.pending == 30
    got = [[m.payload for m in await _drain(s)] for s in workers]
    assert [len(g) for g in got] == [10, 10, 10]  # round-robin
    assert sorted(int(p) for g in got for p in g) == list(range(30))  # each exactly once
    assert [len(await _drain(s)) for s in loggers] == [15, 15]
    assert len(await _drain(other_pattern)) == 30  # alone in its group
    assert len(await _drain(plain)) == 30
    stats = broker.stats()
    assert sorted((g["topic"], g["group"], g["members"]) for g in stats["groups"]) == [
        ("jobs.*", "loggers", 2),
        ("jobs.*", "workers", 3),
        ("jobs.>", "workers", 1),
    ]
    assert stats["topics"] == {"jobs.*": 6, "jobs.>": 1}
    assert sorted(s["group"] or "" for s in stats["subscriptions"]) == ["", "loggers", "loggers"] + ["workers"] * 4
    await broker.close()


@clocked
async def test_queue_group_skips_a_member_whose_backlog_is_full(memory):
    # One forward in flight of one message, two more waiting: then the member is full.
    broker = await memory.connect(Broker, uuid.uuid4(), backlog=2, window=1, batch=1)
    slow = await broker.subscribe("jobs", group="g", buffer=1)  # never read: holds its answers
    fast = await broker.subscribe("jobs", group="g")
    for n in range(40):
        await broker.publish("jobs", str(n).encode())
    got_fast: list[bytes] = []
    while len(got_fast) + slow.pending + len(broker.fanout.subscribers("jobs")[0].backlog) < 40:
        got_fast.append((await fast.get()).payload)
    assert broker.dropped == 0  # a plain round-robin would have overfilled the slow one's backlog
    slow_count = 40 - len(got_fast)
    assert slow_count < 10
    rest = [(await slow.get()).payload for _ in range(slow_count)]
    assert sorted(int(p) for p in got_fast + rest) == list(range(40))
    await broker.close()


@clocked
async def test_a_group_whose_members_are_all_full_drops_counted_not_silently(memory):
    broker = await memory.connect(Broker, uuid.uuid4(), backlog=1, window=1, batch=1)
    members = [await broker.subscribe("jobs", group="g", buffer=1) for _ in range(2)]
    for n in range(20):
        await broker.publish("jobs", str(n).encode())
    # 2 members x (1 answered + 1 held + 1 waiting) fit; the rest was dropped, and said so.
    assert broker.dropped == 20 - 6
    assert sum(s.dropped for s in members) == broker.dropped
    await broker.close()


@clocked
async def test_bad_patterns_and_groups_are_refused_at_once_and_by_the_broker(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    for pattern in ("orders.*x", "orders.>.eu", "a..*", ".".join(["*"] * 33)):
        with pytest.raises(ValueError):
            broker.subscribe(pattern)
    with pytest.raises(ValueError, match="queue group name must not be empty"):
        broker.subscribe("t", group="")
    with pytest.raises(ValueError, match="at most 256"):
        broker.subscribe("t", group="g" * 257)
    with pytest.raises(TypeError):
        broker.subscribe("t", group=b"g")  # type: ignore[arg-type]
    # A client speaking the control messages by hand gets the same rule from the broker.
    raw = await memory.connect(Consumer, channel)
    for headers, problem in (
        ({"topic": "orders.*x", "channel": str(uuid.uuid4())}, "subscribe refused: token 2"),
        ({"topic": "t", "channel": str(uuid.uuid4()), "group": ""}, "subscribe refused: a queue group name"),
        ({"topic": "t", "channel": str(uuid.uuid4()), "group": "a\x1bb"}, "subscribe refused: a queue group name"),
    ):
        with pytest.raises(RemoteError, match=problem):
            await raw.send(messages.encode(messages.SUBSCRIBE, None, headers))
    await raw.close()
    await broker.close()


def test_a_plain_announcement_is_byte_for_byte_what_go_providers_send():
    from pulsyflux.broker import Subscription
    from pulsyflux.broker.client import _announcement

    channel = uuid.UUID(int=1)
    plain = _announcement(Subscription("orders", channel))
    assert plain == (
        b'{"Topic":"$pulsyflux/subscribe","Payload":null,'
        b'"Headers":{"channel":"00000000-0000-0000-0000-000000000001","topic":"orders"}}'
    )
    grouped = _announcement(Subscription("orders.*", channel, group="workers"))
    assert grouped == (
        b'{"Topic":"$pulsyflux/subscribe","Payload":null,'
        b'"Headers":{"channel":"00000000-0000-0000-0000-000000000001","group":"workers","topic":"orders.*"}}'
    )


@clocked
async def test_a_pattern_subscriber_refuses_what_does_not_match(memory):
    """Whoever learns a subscription's channel cannot slip it another topic, nor a control notice as a message."""
    broker = await memory.connect(Broker, uuid.uuid4())
    sub = await broker.subscribe("orders.>")
    forger = await memory.connect(Consumer, sub.channel)
    batch = messages.encode_batch(
        [messages.encode_text(t, b"x", None) for t in ("billing.eu", "orders", "orders.eu.x")]
    )
    assert await forger.send(batch) == b"ok"
    assert sub.rejected == 2 and [m.topic for m in await _drain(sub)] == ["orders.eu.x"]
    await forger.send(messages.control(messages.PROBE).encode())
    assert sub.pending == 0  # a control message is never a message, though ">" matches its one token
    await forger.close()
    await broker.close()


# -- over real TCP --------------------------------------------------------------------


@ensure
async def test_remote_wildcard_and_group_subscriptions_over_tcp():
    server = await start_server()
    try:
        client = await BrokerClient.connect(server.address)
        publisher = await BrokerClient.connect(server.address)
        pattern = await client.subscribe("sensors.*.temp")
        tail = await client.subscribe("sensors.>")
        workers = [await client.subscribe("sensors.>", group="workers") for _ in range(2)]
        for n in range(10):
            await publisher.publish(f"sensors.{n}.temp", str(n).encode())
        await publisher.publish("sensors.1.humidity", b"h")
        assert [(await pattern.get()).topic for _ in range(10)] == [f"sensors.{n}.temp" for n in range(10)]
        assert [(await tail.get()).topic for _ in range(11)][-1] == "sensors.1.humidity"
        await eventually(lambda: sum(w.pending for w in workers) == 11)
        assert [w.pending for w in workers] == [6, 5]
        groups = server.broker.stats()["groups"]
        assert groups == [{"topic": "sensors.>", "group": "workers", "members": 2}]
        with pytest.raises(ValueError, match="wildcards are for subscribing"):
            publisher.publish("sensors.*.temp", b"")
        await client.close()
        await publisher.close()
    finally:
        await server.stop()


@clocked
async def test_a_vanished_group_member_hands_its_messages_to_the_others(memory):
    """A worker killed without unsubscribing: forwards the server cannot route to it go to another member."""
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    live = await broker.subscribe("jobs.*", group="workers")
    # A remote member, announced by hand (as a BrokerClient does), that then dies without a word.
    dead_channel = uuid.uuid4()
    dead = await memory.connect(Provider, dead_channel)
    announcer = await memory.connect(Consumer, channel)
    answer = announcer.send(
        messages.encode(messages.SUBSCRIBE, None, {"topic": "jobs.*", "channel": str(dead_channel), "group": "workers"})
    )
    probe = await dead.receive()
    dead.respond(probe, b"ok")
    assert await answer == b"ok"
    await dead.close()
    for n in range(10):
        await broker.publish(f"jobs.{n}", str(n).encode())
    got = sorted([int((await live.get()).payload) for _ in range(10)])
    assert got == list(range(10))  # every one, none twice
    stats = broker.stats()
    assert stats["lost"] == 0 and stats["requeued"] >= 1
    assert stats["groups"] == [{"topic": "jobs.*", "group": "workers", "members": 1}]
    await announcer.close()
    await broker.close()


@clocked
async def test_a_leaving_group_member_hands_over_its_backlog(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, backlog=100, window=1, batch=1)
    worker = await memory.connect(BrokerClient, channel)
    slow = await worker.subscribe("jobs", group="g", buffer=1)  # never read: its backlog grows
    fast = await broker.subscribe("jobs", group="g")
    for n in range(20):
        await broker.publish("jobs", str(n).encode())
    await memory.quiet()
    assert fast.pending == 10 and slow.pending == 2  # slow: one answered, one held, 8 in the broker's backlog
    await worker.unsubscribe("jobs")  # a worker that stops: what waited for it goes to the other member
    await memory.quiet()
    kept = [int(m.payload) for m in await _drain(slow)]  # what it had received before it left
    taken = [int(m.payload) for m in await _drain(fast)]
    assert sorted(kept + taken) == list(range(20))
    stats = broker.stats()
    assert (stats["lost"], stats["requeued"], stats["delivered"]) == (0, 8, 20)
    await worker.close()
    await broker.close()


@clocked
async def test_worst_inputs_many_patterns_and_a_large_group(memory):
    """One subscriber's many patterns and a group of many members, through the broker."""
    broker = await memory.connect(Broker, uuid.uuid4())
    patterns = [await broker.subscribe(f"p{n}.*.>") for n in range(200)]
    members = [await broker.subscribe("jobs.>", group="many") for _ in range(100)]
    for n in range(200):
        await broker.publish(f"p{n}.x.y", b"")
        await broker.publish(f"jobs.{n}", b"")
    await memory.quiet()
    assert sum(m.pending for m in members) == 200
    assert all(s.pending == 1 for s in patterns)
    assert [m.pending for m in members] == [2] * 100  # round-robin over all of them
    assert broker.stats()["groups"] == [{"topic": "jobs.>", "group": "many", "members": 100}]
    await broker.close()


@ensure
async def test_a_killed_worker_loses_no_job_over_tcp():
    server = await start_server()
    try:
        boss = await BrokerClient.connect(server.address)
        survivor = await BrokerClient.connect(server.address)
        doomed = await BrokerClient.connect(server.address)
        alive = await survivor.subscribe("jobs.*", group="workers")
        dying = await doomed.subscribe("jobs.*", group="workers")
        await dying.provider.close()  # its process dies: no unsubscribe, its channel simply goes quiet
        for n in range(20):
            await boss.publish(f"jobs.{n}", str(n).encode())
        got = sorted([int((await alive.get()).payload) for _ in range(20)])
        assert got == list(range(20))
        stats = server.broker.stats()
        assert stats["lost"] == 0 and stats["requeued"] >= 1
        for client in (boss, survivor, doomed):
            await client.close()
    finally:
        await server.stop()


@clocked
async def test_groups_in_the_stats_document_and_metrics_are_bounded(memory):
    from pulsyflux.http.prometheus import _broker_metrics, _Metrics
    from pulsyflux.http.stats import broker_stats

    broker = await memory.connect(Broker, uuid.uuid4())
    for n in range(5):
        for _ in range(n + 1):
            await broker.subscribe(f"t{n}.*", group=f'g"{n}\\')  # a name that needs escaping
    shown = broker_stats(broker, max_topics=3)
    assert shown is not None and shown["groups_count"] == 5
    assert [(g["topic"], g["members"]) for g in shown["groups"]] == [("t4.*", 5), ("t3.*", 4), ("t2.*", 3)]
    metrics = _Metrics()
    _broker_metrics(metrics, shown)
    text = metrics.text()
    assert 'pulsyflux_broker_group_members{topic="t4.*",group="g\\"4\\\\"} 5' in text
    assert text.count("pulsyflux_broker_group_members{") == 3
    await broker.close()


@clocked
async def test_a_reannounce_keeps_its_group_and_another_group_is_refused(memory):
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel)
    client = await memory.connect(BrokerClient, channel)
    sub = await client.subscribe("jobs.*", group="workers")
    raw = await memory.connect(Consumer, channel)
    same = {"topic": "jobs.*", "channel": str(sub.channel), "group": "workers"}
    assert await raw.send(messages.encode(messages.SUBSCRIBE, None, same)) == b"resumed"  # what a heartbeat sends
    for other in ({**same, "group": "others"}, {"topic": "jobs.*", "channel": str(sub.channel)}):
        with pytest.raises(RemoteError, match="already subscribed to another topic or group"):
            await raw.send(messages.encode(messages.SUBSCRIBE, None, other))
    assert broker.stats()["groups"] == [{"topic": "jobs.*", "group": "workers", "members": 1}]
    await raw.close()
    await client.close()
    await broker.close()


@clocked
async def test_a_message_a_group_member_refuses_goes_to_another_member(memory):
    """A member that unsubscribes refuses what was on its way to it, and that answer can reach the broker
    before its unsubscribe (the two travel on different connections, read in either order): the refused
    message goes to another member of the group, as after an unsubscribe, and is not lost."""
    channel = uuid.uuid4()
    broker = await memory.connect(Broker, channel, window=1, batch=1)
    leaving, announcer = await json_subscriber(memory, channel, "jobs", group="g")
    staying = await broker.subscribe("jobs", group="g")
    for n in range(4):
        await broker.publish("jobs", str(n).encode())
    forward = await leaving.receive()
    leaving.respond(forward, error="subscription closed")  # before its unsubscribe reaches the broker
    await memory.quiet()
    got = [int(m.payload) for m in await _drain(staying)]
    assert sorted(got) == [0, 1, 2, 3]
    assert broker.stats()["lost"] == 0
    for closing in (announcer, leaving, broker):
        await closing.close()
