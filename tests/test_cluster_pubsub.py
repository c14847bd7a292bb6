"""Pub/sub across servers through Redis (docs/cluster.md): two servers, one Redis of the test's own."""

from __future__ import annotations

import json
from typing import Optional

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor

from pulsyflux import BrokerClient
from pulsyflux.cluster.shape import decode_envelope, encode_envelope
from pulsyflux.http.site import http_service
from pulsyflux.service import BrokerService, Options

from .helpers import eventually


async def _node(redis_server, name: str, http: bool = False, ping_interval: Optional[float] = None) -> BrokerService:
    node = BrokerService("tcp:0:interface=127.0.0.1", cluster=redis_server.url, node_name=name)
    # The firehose flag is read every second in service; here every 50 ms, so that a test waits
    # for the next read rather than for a second.
    node.cluster.pubsub.firehose_check = 0.05
    if ping_interval is not None:
        node.cluster.link.ping_interval = ping_interval
    if http:
        http_service("tcp:0:interface=127.0.0.1", node).setServiceParent(node)
    node.startService()
    await node.whenReady()
    await node.cluster.link.when_up()
    return node


def _address(node: BrokerService) -> str:
    return f"127.0.0.1:{node.server.port.getHost().port}"


@pytest.fixture
def cluster(redis_server):
    """Two servers, ``a`` and ``b``, sharing pub/sub through one Redis."""
    nodes = pytest_twisted.blockon(defer.ensureDeferred(_pair(redis_server)))
    yield nodes
    for node in nodes:
        pytest_twisted.blockon(node.stopService())


async def _pair(redis_server):
    return await _node(redis_server, "a"), await _node(redis_server, "b")


async def _settled(*nodes: BrokerService) -> None:
    """Every (un)subscribe sent to Redis so far is in force."""
    for node in nodes:
        await node.cluster.link.settled()


async def _drain(sub, count: int) -> list:
    return [await sub.get() for _ in range(count)]


@pytest_twisted.ensureDeferred
async def test_a_publish_on_one_server_reaches_subscribers_on_both_once_in_order(cluster):
    a, b = cluster
    on_a = await BrokerClient.connect(_address(a))
    on_b = await BrokerClient.connect(_address(b))
    try:
        sub_a = await on_a.subscribe("orders.eu")
        sub_b = await on_b.subscribe("orders.eu")
        await _settled(a, b)
        for i in range(200):
            await on_a.publish("orders.eu", f"m{i}".encode())
        got_a = await _drain(sub_a, 200)
        got_b = await _drain(sub_b, 200)
        assert [m.payload for m in got_a] == [f"m{i}".encode() for i in range(200)]
        assert [m.payload for m in got_b] == [f"m{i}".encode() for i in range(200)]
        assert {m.topic for m in got_b} == {"orders.eu"}
        # Nothing more: a's own messages did not come back to it through Redis.
        await on_a.publish("orders.eu", b"last")
        assert (await sub_a.get()).payload == b"last"
        assert (await sub_b.get()).payload == b"last"
        assert a.cluster.pubsub.received == 0 and b.cluster.pubsub.received == 201
    finally:
        await on_a.close()
        await on_b.close()


@pytest_twisted.ensureDeferred
async def test_a_server_receives_only_the_topics_its_subscribers_need(cluster):
    a, b = cluster
    on_a = await BrokerClient.connect(_address(a))
    on_b = await BrokerClient.connect(_address(b))
    try:
        sub = await on_b.subscribe("orders.*")
        await _settled(a, b)
        await on_a.publish("billing.eu", b"not for b")  # another first token: never sent to b
        await on_a.publish("orders.eu.paris", b"two tokens too many")  # same channel, filtered on b
        await on_a.publish("orders.eu", b"for b")
        message = await sub.get()
        assert (message.topic, message.payload) == ("orders.eu", b"for b")
        assert b.cluster.pubsub.received == 2  # orders.eu.paris and orders.eu; billing.eu never came
        assert {c for c in b.cluster.link.channels if c.startswith(b"pulsyflux:m:")} == {b"pulsyflux:m:orders"}
    finally:
        await on_a.close()
        await on_b.close()


@pytest_twisted.ensureDeferred
async def test_a_leading_wildcard_pattern_gets_every_topic_once_through_the_firehose(cluster):
    a, b = cluster
    on_a = await BrokerClient.connect(_address(a))
    on_b = await BrokerClient.connect(_address(b))
    try:
        everything = await on_b.subscribe(">")
        orders = await on_b.subscribe("orders.eu")
        await _settled(a, b)
        await eventually(lambda: a.cluster.pubsub.firehose_on)  # a learns it from the flag in Redis
        await on_a.publish("orders.eu", b"1")
        await on_a.publish("billing", b"2")
        got = await _drain(everything, 2)
        assert [(m.topic, m.payload) for m in got] == [("orders.eu", b"1"), ("billing", b"2")]
        assert (await orders.get()).payload == b"1"
        await on_a.publish("orders.eu", b"3")  # b is on both channels: still one copy each
        assert (await everything.get()).payload == b"3"
        assert (await orders.get()).payload == b"3"
        assert b.cluster.pubsub.received == 3
    finally:
        await on_a.close()
        await on_b.close()


@pytest_twisted.ensureDeferred
async def test_redis_down_keeps_local_pubsub_then_everything_comes_back(redis_server):
    a = await _node(redis_server, "a", http=True)
    b = await _node(redis_server, "b")
    on_a = await BrokerClient.connect(_address(a))
    on_b = await BrokerClient.connect(_address(b))
    web = a.namedServices.get("http") or [s for s in a if s is not a.server and hasattr(s, "port")][0]
    try:
        local = await on_a.subscribe("orders")
        remote = await on_b.subscribe("orders")
        await _settled(a, b)
        redis_server.kill()
        await eventually(lambda: not a.cluster.link.up and not b.cluster.link.up)
        health = await treq.get(f"http://127.0.0.1:{web.port.getHost().port}/healthz")
        assert health.code == 200 and json.loads(await health.text()) == {"status": "degraded", "degraded": ["cluster"]}
        await on_a.publish("orders", b"while down")  # local subscribers still served
        assert (await local.get()).payload == b"while down"
        assert a.cluster.pubsub.unshared == 1
        redis_server.start()
        await a.cluster.link.when_up()
        await b.cluster.link.when_up()
        await _settled(a, b)  # b subscribed again by itself
        await on_a.publish("orders", b"back")
        assert (await local.get()).payload == b"back"
        assert (await remote.get()).payload == b"back"  # "while down" was not shared: at most once
        stats = await treq.get(f"http://127.0.0.1:{web.port.getHost().port}/stats")
        document = json.loads(await stats.text())
        assert document["cluster"]["up"] is True and document["cluster"]["reconnects"] >= 1
        assert document["cluster"]["redis"] == redis_server.url
        metrics = await (await treq.get(f"http://127.0.0.1:{web.port.getHost().port}/metrics")).text()
        assert "pulsyflux_cluster_up 1" in metrics and "pulsyflux_cluster_unshared_total 1" in metrics
        [entry] = [s for s in b.broker.stats()["subscriptions"] if s["topic"] == "orders"]
        assert entry["gaps"] >= 1  # b's subscriber may have missed what a published meanwhile
    finally:
        await on_a.close()
        await on_b.close()
        await a.stopService()
        await b.stopService()


@pytest_twisted.ensureDeferred
async def test_a_hung_redis_is_down_within_the_ping_timeout(redis_server):
    a = await _node(redis_server, "a", ping_interval=0.1)  # a PING every 100 ms, not every second
    try:
        a.cluster.link.ping_timeout = 0.3
        redis_server.pause()
        await eventually(lambda: not a.cluster.link.up)
        assert "did not answer a PING" in a.cluster.link.last_error
        redis_server.resume()
        await a.cluster.link.when_up()
    finally:
        redis_server.resume()
        await a.stopService()


def test_what_comes_from_redis_is_checked():
    envelope = decode_envelope(encode_envelope("node-1", ['{"topic":"t"}'], True))
    assert (envelope.node, envelope.also_firehose, envelope.body) == ("node-1", True, b'[{"topic":"t"}]')
    from pulsyflux.cluster.shape import EnvelopeError

    for bad in (b"", b"garbage", b"pf1 a x\n[]", b"pf2 a -\n[]", b"x" * 10_000):
        with pytest.raises(EnvelopeError):
            decode_envelope(bad)


@pytest_twisted.ensureDeferred
async def test_garbage_on_a_cluster_channel_is_counted_and_harms_nobody(cluster):
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from pulsyflux.cluster.redis import RedisCommands

    a, b = cluster
    on_a = await BrokerClient.connect(_address(a))
    on_b = await BrokerClient.connect(_address(b))
    intruder = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", a.cluster.link.address.port), RedisCommands()
    )
    try:
        sub = await on_b.subscribe("orders")
        await _settled(a, b)
        await intruder.execute("SPUBLISH", "pulsyflux:m:orders", b"\xff" * 100_000)
        await intruder.execute(
            "SPUBLISH", "pulsyflux:m:orders", encode_envelope("x", ['{"topic":"$pulsyflux/subscribe"}'])
        )
        await intruder.execute("SPUBLISH", "pulsyflux:m:orders", encode_envelope("x", ["not json"]))
        await on_a.publish("orders", b"fine")
        assert (await sub.get()).payload == b"fine"
        assert b.cluster.pubsub.bad == 3
    finally:
        intruder.transport.loseConnection()
        await on_a.close()
        await on_b.close()


def test_cluster_options_are_checked_before_anything_starts():
    for argv, text in (
        (["--cluster", "http://x"], "not a Redis URL"),
        (["--cluster", "redis://h:99999"], "bad port"),
        (["--node-name", "n"], "give --cluster as well"),
        (["--cluster", "redis://h", "--node-name", "a b"], "--node-name"),
    ):
        with pytest.raises(Exception, match=text):
            Options().parseOptions(argv)
    options = Options()
    options.parseOptions(["--cluster", "redis://127.0.0.1:6379/1", "--node-name", "n1"])
    assert options["cluster"] == "redis://127.0.0.1:6379/1"


@pytest_twisted.ensureDeferred
async def test_two_twistd_servers_share_pubsub_in_order_exactly_once(redis_server, tmp_path):
    import sys
    from pathlib import Path

    from .twistd_process import spawn_twistd

    bindir = Path(sys.executable).parent
    servers = [
        spawn_twistd(
            bindir, tmp_path, "--port", "tcp:0:interface=127.0.0.1", "--cluster", redis_server.url, "--node-name", name
        )  # fmt: skip
        for name in ("a", "b")
    ]
    try:
        address_a, address_b = [await server.listening for server in servers]
        on_a = await BrokerClient.connect(address_a)
        on_b = await BrokerClient.connect(address_b)
        sub = await on_b.subscribe("load.test")
        # b's subscription reaches Redis a moment after it is set up: publish probes until one arrives
        # (each probe waits for its acknowledgement, so this is paced by round trips, not by a timer).
        first = sub.get()
        for _ in range(5000):
            if first.called:
                break
            await on_a.publish("load.test", b"probe")
        # A generous bound only so that a lost message fails the test instead of hanging the suite.
        assert (await first.addTimeout(30, reactor)).payload == b"probe"
        count = 300
        for i in range(count):
            on_a.publish("load.test", str(i).encode())
        await on_a.publish("load.test", b"end")
        payloads = []
        while True:
            message = await sub.get().addTimeout(30, reactor)
            if message.payload == b"probe":
                continue
            if message.payload == b"end":
                break
            payloads.append(message.payload)
        assert payloads == [str(i).encode() for i in range(count)]
        await on_a.close()
        await on_b.close()
    finally:
        for server in servers:
            assert await server.terminate(), server.output[-3000:]
    assert "cluster: linked to Redis" in servers[0].output


@pytest_twisted.ensureDeferred
async def test_redis_killed_and_restarted_under_load_loses_nothing_locally_and_never_reorders(redis_server):
    a = await _node(redis_server, "a")
    b = await _node(redis_server, "b")
    on_a = await BrokerClient.connect(_address(a))
    on_b = await BrokerClient.connect(_address(b))
    try:
        local = await on_a.subscribe("load", buffer=100_000)
        remote = await on_b.subscribe("load", buffer=100_000)
        await _settled(a, b)
        sent = 0

        async def burst(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                await on_a.publish("load", str(sent).encode())
                sent += 1

        await burst(200)
        await eventually(lambda: b.cluster.pubsub.received >= 200)  # acknowledged here is not yet through Redis
        redis_server.kill()
        await burst(200)  # published while Redis dies and is down
        await eventually(lambda: not a.cluster.link.up)
        await burst(200)
        redis_server.start()
        await burst(200)  # published while the link comes back
        await a.cluster.link.when_up()
        await b.cluster.link.when_up()
        await _settled(a, b)
        await on_a.publish("load", b"end")
        got_local = [int(m.payload) for m in await _drain(local, sent)]
        assert got_local == list(range(sent))  # local subscribers never notice Redis
        assert (await local.get()).payload == b"end"
        got_remote = []
        while True:
            message = await remote.get()
            if message.payload == b"end":
                break
            got_remote.append(int(message.payload))
        assert got_remote == sorted(set(got_remote))  # at most once, in order
        assert got_remote[:200] == list(range(200))  # everything before the kill crossed
        assert a.cluster.pubsub.unshared > 0 and a.cluster.pubsub.sent + a.cluster.pubsub.unshared >= sent
    finally:
        await on_a.close()
        await on_b.close()
        await a.stopService()
        await b.stopService()


def _delivers_group(node: BrokerService, pattern: str, group: str) -> bool:
    interest = node.broker.fanout.index.get(pattern)
    return interest is not None and group in interest.groups and not interest.groups[group].elsewhere


@pytest_twisted.ensureDeferred
async def test_a_queue_group_across_servers_gets_each_message_once(cluster):
    a, b = cluster
    on_a = await BrokerClient.connect(_address(a))
    on_b = await BrokerClient.connect(_address(b))
    try:
        members = {
            "a1": await on_a.subscribe("jobs.*", group="workers"),
            "a2": await on_a.subscribe("jobs.*", group="workers"),
            "b1": await on_b.subscribe("jobs.*", group="workers"),
            "b2": await on_b.subscribe("jobs.*", group="workers"),
        }
        plain = await on_b.subscribe("jobs.*")  # not in the group: gets every message
        await _settled(a, b)
        # one server delivers the group: the first by name of those with members ("a")
        await eventually(
            lambda: _delivers_group(a, "jobs.*", "workers") and not _delivers_group(b, "jobs.*", "workers")
        )
        for i in range(20):
            await on_a.publish("jobs.eu", f"a{i}".encode())
            await on_b.publish("jobs.us", f"b{i}".encode())
        everything = sorted([m.payload for m in await _drain(plain, 40)])
        assert everything == sorted([f"a{i}".encode() for i in range(20)] + [f"b{i}".encode() for i in range(20)])
        got = {name: [] for name in members}
        for name in ("a1", "a2"):
            got[name] = [m.payload for m in await _drain(members[name], 20)]  # round-robin within a
        assert sorted(got["a1"] + got["a2"]) == everything  # each message once, in the group
        # a's members leave: b's take over
        await on_a.unsubscribe("jobs.*")
        await eventually(lambda: _delivers_group(b, "jobs.*", "workers"))
        await on_a.publish("jobs.eu", b"after")
        # consumeErrors: the other get() still waits when the test closes, and then fails with SubscriptionClosed
        gets = [members["b1"].get(), members["b2"].get()]
        first = await defer.DeferredList(gets, fireOnOneCallback=True, consumeErrors=True)
        assert first[0].payload == b"after"
    finally:
        await on_a.close()
        await on_b.close()


@pytest_twisted.ensureDeferred
async def test_a_broker_restart_gives_up_its_queue_groups_and_re_attaches(cluster):
    a, b = cluster
    on_a = await BrokerClient.connect(_address(a))
    on_b = await BrokerClient.connect(_address(b))
    try:
        await on_a.subscribe("jobs.*", group="workers")
        member_b = await on_b.subscribe("jobs.*", group="workers")
        await eventually(
            lambda: _delivers_group(a, "jobs.*", "workers") and not _delivers_group(b, "jobs.*", "workers")
        )
        first = a.broker
        for conn in [c for c in a.factory.router.connections if c.trusted]:
            conn.transport.abortConnection()  # a's broker loses its link: BrokerService starts a new one
        await eventually(lambda: a.broker is not None and a.broker is not first)
        assert a.cluster.pubsub.fanout is a.broker.fanout  # the new broker is in the cluster
        # a's group members went with its old broker: b delivers the group now
        await eventually(lambda: _delivers_group(b, "jobs.*", "workers"))
        await on_b.publish("jobs.eu", b"for b's member")
        assert (await member_b.get()).payload == b"for b's member"
        # and the new broker on a shares pub/sub again
        fresh = await BrokerClient.connect(_address(a))
        try:
            sub = await fresh.subscribe("news.*")
            await _settled(a, b)
            await on_b.publish("news.eu", b"across")
            assert (await sub.get()).payload == b"across"
        finally:
            await fresh.close()
    finally:
        await on_a.close()
        await on_b.close()


@pytest_twisted.ensureDeferred
async def test_messages_from_other_servers_are_retained_and_positioned_as_local_ones(redis_server):
    nodes = []
    for name in ("a", "b"):
        node = BrokerService("tcp:0:interface=127.0.0.1", cluster=redis_server.url, node_name=name, history=10)
        node.startService()
        await node.whenReady()
        await node.cluster.link.when_up()
        nodes.append(node)
    a, b = nodes
    on_a = await BrokerClient.connect(_address(a))
    on_b = await BrokerClient.connect(_address(b))
    try:
        live = await on_b.subscribe("orders")  # b wants the topic from the cluster
        await on_a.subscribe("orders")  # and so does a (a server receives only what its subscribers want)
        await _settled(a, b)
        for i in range(5):
            await on_a.publish("orders", f"from a {i}".encode())
        await on_b.publish("orders", b"from b")
        got = await _drain(live, 6)
        assert sorted(m.payload for m in got) == sorted([f"from a {i}".encode() for i in range(5)] + [b"from b"])
        # on b, messages from a have b's positions: one epoch (b's), seq 1..6 in b's order
        epochs = {m.position.epoch for m in got}
        assert len(epochs) == 1 and [m.position.seq for m in got] == [1, 2, 3, 4, 5, 6]
        replay = await on_b.subscribe("orders", last=3)
        assert [m.payload for m in await _drain(replay, 3)] == [m.payload for m in got[3:]]
        since = await on_b.subscribe("orders", since=got[1].position)
        assert [m.position for m in await _drain(since, 4)] == [m.position for m in got[2:]]
        # a positions its own publishes in its own epoch; b's message is retained there too
        on_a_replay = await on_a.subscribe("orders", last=6)
        mine = await _drain(on_a_replay, 6)
        assert sorted(m.payload for m in mine) == sorted(m.payload for m in got)
        assert {m.position.epoch for m in mine} != epochs  # each server's own epoch
    finally:
        await on_a.close()
        await on_b.close()
        for node in nodes:
            await node.stopService()
